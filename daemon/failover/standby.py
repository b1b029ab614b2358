"""Keeping a hot or warm standby loaded, without ever making the active wait for it.

The standby is a safety net, not a dependency: a standby bundle that cannot load (its
constructor raises, its worker times out) or a standby worker that dies while idle must not take
the service down. :class:`StandbyKeeper` runs in the background, owned by the failover
controller:

- it loads the *target* (the standby bundle wanted now: the configured one, a promoted one, the
  failed release coming back through fail-back) and installs it under ``engine.lock`` only once
  it has loaded and passed its health check;
- a failed load is logged with its error, counted (``failoverd_standby_load_failures_total``)
  and retried after 1 s, 2 s, 4 s ... up to 60 s;
- a standby worker found dead (the engine's ``_watch_standby`` or a failed shadow batch marks
  it) is dropped and reloaded; one that dies again soon after loading is reloaded with the same
  growing backoff, so a standby that crashes on load or on every batch does not spin;
- a new target (``path``) replaces the old one at once, with a fresh backoff; a standby that is
  loaded and healthy stays installed until its replacement has loaded.

Before it has loaded, a failure of the active finds no healthy standby and pauses, as it would
with none configured; ``on_installed`` (the controller) then ends such a pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from daemon import metrics as m
from daemon.engine.control import EngineControl
from daemon.engine.release import LoadedRelease

log = logging.getLogger("failoverd.standby")

INITIAL_DELAY_S = 1.0
MAX_DELAY_S = 60.0
POLL_S = 0.25
"""How often the keeper looks for a dead standby (the engine loop marks it within 0.5 s)."""

Loader = Callable[[Path, str], Awaitable[LoadedRelease]]
OnInstalled = Callable[[EngineControl, LoadedRelease], Awaitable[None]]


class StandbyKeeper:
    def __init__(self, *, loader: Loader, path: Path | None, on_installed: OnInstalled | None = None,
                 initial_delay: float = INITIAL_DELAY_S, max_delay: float = MAX_DELAY_S, poll: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.loader = loader
        self._path = Path(path) if path is not None else None
        self.on_installed = on_installed
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.poll = poll
        self.clock = clock
        self.wall = wall
        self.failures = 0
        """Failed loads (or early deaths) of the current target since it was last installed."""
        self.error: str | None = None
        """Why the target is not installed: the last load error, or how its worker died."""
        self.loading = False
        self.delay = initial_delay
        """The wait before the next retry after a failure (doubles up to ``max_delay``)."""
        self._retry_at: float | None = None  # monotonic
        self._retry_wall: float | None = None
        self._installed_at: float | None = None
        self._wake = asyncio.Event()
        self.first_attempt = asyncio.Event()
        """Set once the first load has ended (loaded or failed), or at once with nothing to load: a
        hot standby must shadow from the first batch on, so the daemon waits for this (only)."""
        if self._path is None:
            self.first_attempt.set()

    # ---- the target ------------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self._path

    @path.setter
    def path(self, value: Path | None) -> None:
        """A new target: forget the old one's failures and try the new one at once."""
        value = Path(value) if value is not None else None
        if value == self._path:
            return
        self._path = value
        if value is None:
            self.first_attempt.set()
        self.failures, self.error, self.delay = 0, None, self.initial_delay
        self._retry_at = self._retry_wall = None
        self._wake.set()

    def pending(self, engine: EngineControl) -> dict[str, Any] | None:
        """What /status shows while the target is not the installed, healthy standby (else None)."""
        if self._path is None or _healthy(engine.releases.standby, self._path):
            return None
        left = None if self._retry_at is None else round(max(0.0, self._retry_at - self.clock()), 1)
        return {"bundle": str(self._path), "loading": self.loading, "failures": self.failures,
                "error": self.error, "next_retry_at": self._retry_wall if left is not None else None,
                "next_retry_in_s": left}

    # ---- the loop --------------------------------------------------------------------------
    async def run(self, engine: EngineControl) -> None:
        """Until the engine stops: drop a dead standby, load the target, install it."""
        while not (engine.stopping.is_set() or engine.closing):
            sb = engine.releases.standby
            if sb is not None and sb.worker.dead:
                await self._drop_dead(engine, sb)
                continue
            path = self._path
            if path is None or (sb is not None and sb.bundle_path == path):
                await self._sleep(self.poll)
                continue
            if self._retry_at is not None and self.clock() < self._retry_at:
                await self._sleep(min(self.poll, self._retry_at - self.clock()))
                continue
            await self._attempt(engine, path)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or less when the target changes."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    def _back_off(self, why: str) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.max_delay)
        self.failures += 1
        self.error = why
        self._retry_at = self.clock() + delay
        self._retry_wall = self.wall() + delay
        return delay

    async def _attempt(self, engine: EngineControl, path: Path) -> None:
        try:
            await self._load_and_install(engine, path)
        finally:
            self.first_attempt.set()

    async def _load_and_install(self, engine: EngineControl, path: Path) -> None:
        self.loading = True
        self._retry_at = self._retry_wall = None
        release: LoadedRelease | None = None
        try:
            release = await self.loader(path, "standby")
            try:
                healthy = await release.worker.health()
            except Exception:  # noqa: BLE001 - an unhealthy candidate, whatever the way
                healthy = False
            if not healthy:
                await release.worker.close(timeout=2.0)
                raise RuntimeError(f"standby {release.ref} loaded but failed its health check")
        except asyncio.CancelledError:
            self.loading = False
            if release is not None:
                release.worker.kill()  # the daemon stops: a loaded worker must not outlive it
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the bundle does, the active goes on
            self.loading = False
            m.STANDBY_LOAD_FAILURES.inc()
            if path != self._path:
                return  # the target changed meanwhile: the new one starts afresh
            delay = self._back_off(str(exc))
            log.error("standby failed to load; the active serves without a standby until it does",
                      extra={"error": str(exc), "failures": self.failures, "retry_in_s": delay})
            return
        self.loading = False
        old = None
        installed = False
        try:
            async with engine.lock:
                installed = not (engine.stopping.is_set() or engine.closing) and path == self._path
                if installed:
                    old = engine.install_standby(release)
                    self.failures, self.error = 0, None
                    self._installed_at = self.clock()
                    log.info("standby loaded", extra={"release": release.ref, "pid": release.worker.pid})
                    if self.on_installed is not None:
                        await self.on_installed(engine, release)
        except BaseException:
            if not installed:  # cancelled waiting for the lock: the engine never saw it (closes it)
                release.worker.kill()
            raise
        if not installed:
            await release.worker.close(timeout=2.0)  # stopping, or no longer the target
        if old is not None and old is not release:
            await old.worker.close(timeout=2.0)  # the standby it replaces

    async def _drop_dead(self, engine: EngineControl, sb: LoadedRelease) -> None:
        """Take a dead standby out of the engine and schedule its reload (at once if it had been up
        for a while, else after the backoff)."""
        async with engine.lock:
            if not engine.drop_standby(sb):
                return
        code = sb.worker.returncode
        pid = sb.worker.pid
        why = (f"standby worker {sb.ref} (pid {pid}) died (exit code {code})" if code is not None
               else f"standby worker {sb.ref} (pid {pid}) failed (a shadow batch failed or timed out)")
        if self._path is None:
            self._path = sb.bundle_path  # it was the standby: it is still wanted
        if sb.bundle_path == self._path:
            if self._installed_at is not None and self.clock() - self._installed_at >= self.max_delay:
                self.delay = self.initial_delay  # it had been up for a while: reload it at once
                self.failures, self.error = 0, why
            else:
                delay = self._back_off(why)
                log.error("standby died soon after loading; reloading it after a backoff",
                          extra={"release": sb.ref, "retry_in_s": delay})
        log.warning("dead standby dropped; reloading it", extra={"release": sb.ref, "why": why})
        await sb.worker.close(timeout=1.0)


def _healthy(standby: LoadedRelease | None, path: Path) -> bool:
    return standby is not None and not standby.worker.dead and standby.bundle_path == path
