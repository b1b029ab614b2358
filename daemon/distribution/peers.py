"""Peers: other instances serving the archives they hold on their admin API.

``GET /bundles/<digest>`` (daemon/admin.py) answers with the archive (range requests
supported), to a bearer token: the admin token or the read token. An instance's address is its
``[registry] advertise_url``, else ``http://`` + its ``[admin] bind`` (:func:`advertise_url`).

Which peers to ask: the configured ``[registry] peers`` first, then the ``holders`` the control
topic names, newest first: those of the release events (the instance that promoted it: the
daemon of the CLI's ``--config``, or the one whose admin API took the promotion) and of the
``holding`` events every instance publishes after it fetched a bundle, so a host that joins
after the promoting one is gone still finds a peer. Every control-topic reader notes them here
as it reads (:func:`note_event`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp

from daemon.distribution.sources import SourceError

log = logging.getLogger("failoverd.distribution")

CHUNK = 1 << 20

_holders: dict[str, list[str]] = {}
"""digest -> admin URLs that announced holding it (newest first), from control-topic events.
Per process, rebuilt from the topic at every start (its events are never compacted away)."""

_noted: set[str] = set()
"""Ids of the events noted: the same event read again (the start-up sync, then the watcher, and
the release log sync of each) must not move its holders back in front of newer ones."""


def advertise_url(settings: Any) -> str:
    """The URL other instances reach this one's admin API at."""
    url = getattr(settings.registry, "advertise_url", None)
    if url:
        return str(url).rstrip("/")
    bind = settings.admin.bind.strip()
    if bind.isdigit():
        bind = f"127.0.0.1:{bind}"
    return f"http://{bind}"


def note_event(event: dict[str, Any]) -> None:
    """Remember who announced holding the digest of a release or holding event (its ``holders``)."""
    digest, holders = event.get("digest"), event.get("holders")
    if not isinstance(digest, str) or not isinstance(holders, list):
        return
    event_id = event.get("id")
    if isinstance(event_id, str):
        if event_id in _noted:
            return
        _noted.add(event_id)
    known = _holders.setdefault(digest, [])
    for url in reversed([h for h in holders if isinstance(h, str) and h]):
        url = url.rstrip("/")
        if url in known:
            known.remove(url)
        known.insert(0, url)


def holders(digest: str) -> list[str]:
    return list(_holders.get(digest, ()))


def forget_all() -> None:
    """For tests."""
    _holders.clear()
    _noted.clear()


class PeerSource:
    """One peer's admin API."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @property
    def name(self) -> str:
        return f"peer {self.url}"

    def __repr__(self) -> str:
        return f"<PeerSource {self.url}>"

    async def fetch(self, digest: str, dest: Path) -> int:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=min(10.0, self.timeout), sock_read=self.timeout)
        written = 0
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"{self.url}/bundles/{digest}", headers=headers) as resp:
                    if resp.status != 200:
                        text = (await resp.text())[:200].strip()
                        raise SourceError(f"{self.name} answered HTTP {resp.status}: {text}")
                    expected = resp.content_length
                    with open(dest, "wb") as fh:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            fh.write(chunk)
                            written += len(chunk)
                        fh.flush()
                        os.fsync(fh.fileno())
                    if expected is not None and written != expected:
                        raise SourceError(f"{self.name} sent {written} of {expected} bytes (connection cut)")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise SourceError(f"{self.name}: {type(exc).__name__}: {exc}") from None
        return written
