"""Where archives can be fetched from, by digest. Every source is untrusted: the fetcher checks
the bytes against the digest, so a source only has to deliver bytes (or fail)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from daemon.errors import RegistryError


class FetchError(RegistryError):
    """A bundle could not be fetched from any source (the message names each source and why)."""


class SourceError(Exception):
    """One source could not deliver (unreachable, 404, refused the token, ...): try the next one."""


class BundleSource(Protocol):
    """Writes the archive stored under ``digest`` to ``dest`` (a new file); raises SourceError."""

    @property
    def name(self) -> str: ...

    async def fetch(self, digest: str, dest: Path) -> int:
        """Bytes written."""
        ...
