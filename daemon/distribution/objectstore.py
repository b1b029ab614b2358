"""An object store as a bundle source (and destination), through fsspec, keyed by digest:
``<bundle_store>/<digest>.fdb``. ``s3://``, ``gs://``, ``az://``, ``http(s)://`` or ``file://``
URLs, with fsspec's backends (``pip install 'failoverd[objectstore]'``, plus s3fs/gcsfs/adlfs
for those schemes). Untrusted like every source: the fetcher checks the bytes."""

from __future__ import annotations

import asyncio
import importlib
import shutil
from pathlib import Path
from typing import Any

from daemon.distribution.sources import SourceError
from daemon.errors import ConfigError


def _fsspec() -> Any:
    try:
        return importlib.import_module("fsspec")
    except ImportError:
        raise ConfigError("[registry] bundle_store needs fsspec; fix: pip install 'failoverd[objectstore]' "
                          "(and s3fs, gcsfs or adlfs for s3://, gs://, az://), or unset bundle_store") from None


class ObjectStoreSource:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @property
    def name(self) -> str:
        return f"object store {self.url}"

    def _key(self, digest: str) -> str:
        return f"{self.url}/{digest}.fdb"

    async def fetch(self, digest: str, dest: Path) -> int:
        def get() -> int:
            try:
                with _fsspec().open(self._key(digest), "rb") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    return out.tell()
            except (OSError, ValueError) as exc:  # FileNotFoundError, backend errors
                raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from None

        return await asyncio.to_thread(get)

    def upload(self, digest: str, archive: Path) -> bool:
        """Store ``archive`` under ``digest`` once (False when it is there already)."""
        fs_mod = _fsspec()
        key = self._key(digest)
        fs, path = fs_mod.core.url_to_fs(key)
        if fs.exists(path):
            return False
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{digest[:8]}.part"
        fs.put_file(str(archive), tmp)
        fs.mv(tmp, path)
        return True
