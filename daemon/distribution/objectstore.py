"""An object store as a bundle source (and destination), through fsspec, keyed by digest:
``<bundle_store>/<digest>.fdb``. ``s3://``, ``gs://``, ``az://``, ``http(s)://`` or ``file://``
URLs, with fsspec's backends (``pip install 'failoverd[objectstore]'``, plus s3fs/gcsfs/adlfs
for those schemes). Untrusted like every source: the fetcher checks the bytes.

Where the store is and who may read it is the backend's own configuration, from its standard
environment variables and files, so that no secret lands in failoverd's configuration: for
``s3://``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile, an instance role) and,
for an S3-compatible server that is not AWS (MinIO, Ceph, ...), ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``), which botocore >= 1.31 honours and s3fs inherits
(tests/integration/test_distribution_s3.py runs against such a server).
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
from pathlib import Path
from typing import Any

from daemon.distribution.sources import SourceError
from daemon.errors import ConfigError, FailoverdError, RegistryError

_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs"}


def _fsspec() -> Any:
    try:
        return importlib.import_module("fsspec")
    except ImportError:
        raise ConfigError("[registry] bundle_store needs fsspec; fix: pip install 'failoverd[objectstore]' "
                          "(and s3fs, gcsfs or adlfs for s3://, gs://, az://), or unset bundle_store") from None


class ObjectStoreSource:
    def __init__(self, url: str) -> None:
        """ConfigError, naming the package to install, when fsspec or the URL's backend is missing:
        a daemon finds out at start, not at its first fetch."""
        self.url = url.rstrip("/")
        protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        try:
            _fsspec().get_filesystem_class(protocol)
        except ImportError:
            package = _BACKENDS.get(protocol, f"the fsspec backend for {protocol}://")
            raise ConfigError(f"object store {url!r} ([registry] bundle_store, or bundle push/pull's URL): fsspec has "
                              f"no {protocol}:// backend installed; "
                              f"fix: pip install {package}") from None
        except ValueError:
            raise ConfigError(f"object store {url!r} ([registry] bundle_store, or bundle push/pull's URL): "
                              f"{protocol}:// is not a scheme fsspec knows; "
                              f"fix: use an s3://, gs://, az://, http(s):// or file:// URL") from None

    @property
    def name(self) -> str:
        return f"object store {self.url}"

    def _key(self, digest: str) -> str:
        return f"{self.url}/{digest}.fdb"

    def _fs(self, digest: str) -> tuple[Any, str]:
        """The backend and the object's path, with no cached listing: a long-running daemon must see
        an object uploaded after it first looked (fsspec caches filesystems and their listings)."""
        fs, path = _fsspec().core.url_to_fs(self._key(digest))
        fs.invalidate_cache()
        return fs, path

    async def fetch(self, digest: str, dest: Path) -> int:
        def get() -> int:
            try:
                fs, path = self._fs(digest)
                with fs.open(path, "rb") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    return int(out.tell())
            except FileNotFoundError:
                raise SourceError(f"{self.name} has no {digest[:12]}.fdb") from None
            except Exception as exc:  # noqa: BLE001 - backends raise their own errors (credentials, HTTP, ...)
                raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from None

        return await asyncio.to_thread(get)

    def upload(self, digest: str, archive: Path) -> bool:
        """Store ``archive`` under ``digest`` once (False when it is there already). An object of
        another size under that key (a cut upload by another tool) is overwritten; same-size wrong
        bytes are not detected here: every fetcher refuses them by digest (the fix is to delete the
        object and promote again)."""
        try:
            fs, path = self._fs(digest)
            size = Path(archive).stat().st_size
            if fs.exists(path) and fs.size(path) == size:
                return False
            parent = path.rsplit("/", 1)[0]
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.{digest[:8]}.part"
            fs.put_file(str(archive), tmp)
            fs.mv(tmp, path)
            return True
        except FailoverdError:
            raise
        except Exception as exc:  # noqa: BLE001 - backends raise their own errors (credentials, HTTP, ...)
            raise RegistryError(f"could not upload bundle {digest[:12]} to {self.url}: {type(exc).__name__}: {exc}; "
                                f"fix: check the URL, the credentials and (for an S3-compatible server) "
                                f"AWS_ENDPOINT_URL_S3, or unset [registry] bundle_store") from None
