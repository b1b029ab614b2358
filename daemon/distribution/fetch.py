"""Fetching a bundle by digest: try each source in turn, accept only bytes that match the digest.

A download goes to ``<registry>/incoming/`` first. Its manifest digest is checked (first member)
and then every member is hashed *without unpacking anything* (:func:`daemon.bundle.archive.unpack`
with no destination, under the zip-bomb limits); only an archive whose digest is the one asked
for is added to the registry (:meth:`daemon.registry.Registry.add`). A wrong or truncated
download is refused, counted, logged, deleted, and the next source is tried; it is never run.

One download per digest at a time: concurrent callers (the start-up, the standby keeper, a
release event) wait for the same one. ``status()`` lists the fetches in progress and the last
failure per digest for ``/status``.

After a fetch, the daemon announces on the control topic that it holds the digest (a
``holding`` event, :func:`announcer`): the promoting host may be gone by the time a later host
joins, and every instance that fetched the bundle can serve it instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from daemon import metrics as m
from daemon.bundle import archive
from daemon.distribution import peers
from daemon.distribution.sources import BundleSource, FetchError, SourceError
from daemon.errors import BundleError, IntegrityError
from daemon.registry import Registry

log = logging.getLogger("failoverd.distribution")


def verify_download(path: Path, digest: str) -> None:
    """IntegrityError/BundleError unless ``path`` is a complete archive whose digest is ``digest``.
    Nothing is unpacked: the manifest is read first, then each member hashed against it."""
    label = f"downloaded bundle {digest[:12]}"
    _, named = archive.peek_manifest(path, label)
    if named != digest:
        raise IntegrityError(f"{label}: its manifest has digest {named}, not the one asked for")
    _, whole = archive.unpack(path, None, label)
    if whole != digest:
        raise IntegrityError(f"{label}: hashes to {whole}, not the one asked for")


def announcer(settings: Any, me: str) -> Callable[[str], Coroutine[Any, Any, None]]:
    """Publishes ``{"type": "holding", "digest": ..., "holders": [me]}`` on the control topic, so
    that every instance adds ``me`` to the holders of ``digest`` (:func:`peers.note_event`). A
    publication that fails is logged, never raised: the fetch succeeded, and static ``[registry]
    peers``, the release event's holders and ``bundle_store`` remain sources."""
    from daemon import control

    async def announce(digest: str) -> None:
        try:
            await control.publish(settings.kafka.client_kwargs(), settings.registry.control_topic,
                                  control.holding_event(digest, me))
            log.info("announced holding the bundle on the control topic", extra={"digest": digest[:12],
                                                                                "holder": me})
        except Exception as exc:  # noqa: BLE001 - a missed announcement only leaves one source fewer
            log.warning("could not announce holding the bundle; peers will not fetch it from here",
                        extra={"digest": digest[:12], "error": str(exc)})

    return announce


class Fetcher:
    def __init__(self, registry: Registry, sources: Callable[[str], Sequence[BundleSource]], *,
                 on_fetched: Callable[[str], Coroutine[Any, Any, None]] | None = None) -> None:
        self.registry = registry
        self.sources = sources
        self.on_fetched = on_fetched
        """Run (in the background) after each verified fetch, with the digest: the announcement."""
        self._announcing: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[Path]] = {}
        self._progress: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any, token: str | None) -> Fetcher:
        """``[registry] peers`` (the operator's choice: nearest first), then the holders release
        and holding events name (newest first), then the object store. With a ``token`` (this
        instance's admin API serves bundles), each fetch is announced on the control topic."""
        r = settings.registry
        me = peers.advertise_url(settings)
        timeout = getattr(r, "fetch_timeout_ms", 60000) / 1000
        static = [str(u).rstrip("/") for u in (getattr(r, "peers", None) or ())]
        stores: list[BundleSource] = []
        if getattr(r, "bundle_store", None):
            from daemon.distribution.objectstore import ObjectStoreSource

            stores.append(ObjectStoreSource(str(r.bundle_store)))

        def sources(digest: str) -> list[BundleSource]:
            urls = [u for u in dict.fromkeys(static + peers.holders(digest)) if u != me]
            return [peers.PeerSource(u, token, timeout) for u in urls] + stores

        return cls(Registry(r.path), sources, on_fetched=announcer(settings, me) if token else None)

    def digest_of(self, path: Path) -> str | None:
        """The digest ``path`` stands for when it is this registry's (possibly missing) archive path."""
        p = Path(path)
        if p.suffix == archive.SUFFIX and p.parent == self.registry.bundle_dir:
            return p.stem
        return None

    async def ensure_path(self, path: Path) -> Path:
        """``path``, fetched first when it is a registry archive path that is not there yet."""
        digest = self.digest_of(path)
        if digest is None or Path(path).is_file():
            return Path(path)
        return await self.ensure(digest)

    async def ensure(self, digest: str) -> Path:
        """The local archive of ``digest``, fetched when missing (FetchError when no source has it)."""
        held = self.registry.store.path(digest)
        if held is not None:
            return held
        task = self._running.get(digest)
        if task is None:
            task = self._running[digest] = asyncio.create_task(self._fetch(digest), name=f"fetch-{digest[:12]}")
            task.add_done_callback(lambda _t: self._running.pop(digest, None))
        return await asyncio.shield(task)

    def _announce(self, digest: str) -> None:
        """Start ``on_fetched`` in the background: a slow broker must not delay loading the bundle."""
        if self.on_fetched is None:
            return
        task = asyncio.create_task(self.on_fetched(digest), name=f"announce-{digest[:12]}")
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    def status(self) -> dict[str, Any]:
        return {"in_progress": [dict(v) for v in self._progress.values()],
                "failed": [dict(v) for v in self.failures.values()]}

    async def _fetch(self, digest: str) -> Path:
        sources = list(self.sources(digest))
        tried: list[str] = []
        incoming = self.registry.path / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        m.BUNDLE_FETCHES_IN_PROGRESS.inc()
        progress = self._progress[digest] = {"digest": digest, "started": time.time(), "source": None,
                                             "tried": tried}
        try:
            for source in sources:
                progress["source"] = source.name
                tmp = incoming / f"{digest}.{uuid.uuid4().hex[:8]}.part"
                log.info("fetching bundle", extra={"digest": digest[:12], "source": source.name})
                try:
                    size = await source.fetch(digest, tmp)
                    await asyncio.to_thread(verify_download, tmp, digest)
                    added = await asyncio.to_thread(self.registry.add, tmp, source=source.name)
                    if added != digest:  # verify_download said otherwise: a file changed under us
                        raise IntegrityError(f"stored as {added[:12]}")
                except SourceError as exc:
                    m.BUNDLE_FETCHES.labels("failed").inc()
                    text = str(exc)
                    tried.append(text if text.startswith(source.name) else f"{source.name}: {text}")
                    log.warning("bundle source failed; trying the next one", extra={
                        "digest": digest[:12], "source": source.name, "error": str(exc)})
                    continue
                except (BundleError, FetchError, OSError) as exc:
                    m.BUNDLE_FETCHES.labels("refused").inc()
                    tried.append(f"{source.name}: refused: {exc}")
                    log.error("bundle download refused: its bytes do not match the digest; trying the next source",
                              extra={"digest": digest[:12], "source": source.name, "error": str(exc)})
                    continue
                finally:
                    tmp.unlink(missing_ok=True)
                m.BUNDLE_FETCHES.labels("ok").inc()
                self.failures.pop(digest, None)
                log.info("bundle fetched and verified", extra={"digest": digest[:12], "source": source.name,
                                                              "bytes": size})
                self._announce(digest)
                return self.registry.bundle_path(digest)
            why = "; ".join(tried) if tried else (
                "no source is configured: no release event names a holder, and [registry] peers and "
                "[registry] bundle_store are empty")
            self.failures[digest] = {"digest": digest, "time": time.time(), "error": why}
            raise FetchError(f"bundle {digest[:12]} is not in the registry at {self.registry.path} and could not be "
                             f"fetched: {why}; fix: start a peer that holds it, set [registry] peers or "
                             f"bundle_store, or add the archive (`failoverd release promote ... --bundle PATH`)")
        finally:
            self._progress.pop(digest, None)
            m.BUNDLE_FETCHES_IN_PROGRESS.dec()
