"""``failoverd bundle push|pull``: move a bundle between registries (staging to production) with
its digest unchanged. The receiving registry verifies it by digest like any fetch and remembers
where it came from; the release log then records that ``source`` with every release of it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from daemon.distribution.fetch import Fetcher
from daemon.distribution.sources import BundleSource, SourceError
from daemon.errors import RegistryError
from daemon.registry import Registry


class RegistryDirSource:
    """Another registry directory (a mount, a copy): ``<dir>/bundles/<digest>.fdb``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def name(self) -> str:
        return f"registry {self.root}"

    async def fetch(self, digest: str, dest: Path) -> int:
        src = Registry(self.root).store.path(digest)
        if src is None:
            raise SourceError(f"{self.name} does not hold {digest[:12]}")
        await asyncio.to_thread(shutil.copyfile, src, dest)
        return dest.stat().st_size


def source_for(where: str, token: str | None) -> BundleSource:
    """An admin URL (http(s)://, a running instance), an fsspec URL (s3://, gs://, file://...) or a
    registry directory."""
    from daemon.distribution.objectstore import ObjectStoreSource
    from daemon.distribution.peers import PeerSource

    if where.startswith(("http://", "https://")):
        return PeerSource(where, token)
    if "://" in where:
        return ObjectStoreSource(where)
    if not Path(where).is_dir():
        raise RegistryError(f"{where} is neither an http(s):// admin URL, an fsspec URL nor a registry directory; "
                            "fix: name one of those")
    return RegistryDirSource(Path(where))


def pull(registry: Registry, digest: str, where: str, token: str | None = None) -> Path:
    """Fetch ``digest`` from ``where`` into ``registry`` (FetchError when refused or missing)."""
    source = source_for(where, token)
    return asyncio.run(Fetcher(registry, lambda d: [source]).ensure(digest))


def push(registry: Registry, ref: str, where: str) -> tuple[str, bool]:
    """Copy ``ref`` from ``registry`` to ``where`` (a registry directory or an fsspec URL).
    Returns (digest, whether it was new there)."""
    from daemon.distribution.objectstore import ObjectStoreSource

    digest = registry.resolve(ref)
    archive = registry.bundle_path(digest)
    if "://" in where:
        return digest, ObjectStoreSource(where).upload(digest, archive)
    target = Registry(Path(where))
    new = target.store.path(digest) is None
    target.add(archive, source=f"registry {registry.path}")
    return digest, new
