"""The failover controller: turns failure signals into a switch to the standby, or a pause.

The procedure (the engine has already aborted the open transaction and rewound every
partition to its last checkpoint before :meth:`handle` runs):

1. check the anti-flapping policy (cool-down, cap per window); blocked -> pause loudly;
2. find a healthy standby (hot/warm: loaded; cold: load it now); none -> pause loudly (a hot/warm
   standby that is still loading or retrying, see :mod:`daemon.failover.standby`, ends that
   pause once it has loaded);
3. stop the failed worker, make the standby active (its state namespace is already restored
   to the last checkpoint in the local store), publish the release info;
4. record the failover (release log + control topic, off the hot path);
5. the engine resumes from the checkpoint; the first committed checkpoint after the switch
   closes the failover's duration.

A paused daemon keeps its state and offsets and emits nothing; readiness is false.

Release changes from the control topic (:meth:`FailoverController.apply_change`) switch the
active at a checkpoint boundary. A switch that follows another instance's failover goes through
the same anti-flapping policy: it counts toward the cap, and while the policy blocks it, it is
deferred (re-queued when the cool-down or the window allows it), never dropped. An operator's
promote or rollback is applied at once and does not count: a human decided.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from daemon import metrics as m
from daemon.engine.control import BatchSummary, Change, EngineControl
from daemon.engine.release import LoadedRelease
from daemon.distribution.sources import FetchError
from daemon.errors import ReleaseFailure
from daemon.failover.policy import FailoverPolicy
from daemon.failover.signals import HealthMonitor
from daemon.failover.standby import StandbyKeeper

log = logging.getLogger("failoverd.failover")

FETCH_RETRY_S = 10.0
"""A release change whose bundle no source could deliver is applied again after this long."""

Recorder = Callable[[dict[str, Any], Path], Coroutine[Any, Any, None]]
Loader = Callable[[Path, str], Awaitable[LoadedRelease]]
Event = dict[str, Any]
"""A failover, pause, switch or deferral, as /status lists it (keys with ``_`` are internal)."""


class FailoverController:
    def __init__(self, settings: Any, *, loader: Loader, standby_path: Path | None,
                 recorder: Recorder | None = None) -> None:
        f = settings.failover
        self.settings = settings
        self.mode = f.standby_mode
        self.loader = loader
        self.keeper = StandbyKeeper(loader=loader, path=standby_path, on_installed=self._standby_installed)
        self.recorder = recorder
        self.monitor = HealthMonitor(window=f.error_window, min_samples=f.min_samples,
                                     error_rate=f.error_rate_threshold, latency_p99_s=f.latency_p99_slo_ms / 1000,
                                     invalid_rate=f.output_invalid_rate_threshold)
        self.policy = FailoverPolicy(cooldown_s=f.cooldown_ms / 1000, max_failovers=f.max_failovers,
                                     window_s=f.window_ms / 1000)
        self.failback = f.failback
        self.failback_delay = f.failback_delay_ms / 1000
        self.events: collections.deque[Event] = collections.deque(maxlen=50)
        self.engine: EngineControl | None = None
        self._open_event: Event | None = None
        self.pause_kind: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeper_task: asyncio.Task[None] | None = None
        self._active_wanted: str | None = None  # the active digest of the last release change ...
        self._active_kind: str | None = None  # ... and the kind of event that asked for it
        self._deferred: Change | None = None  # a release change the policy holds back

    @property
    def standby_path(self) -> Path | None:
        """The standby bundle wanted now (hot/warm: kept loaded by the keeper; cold: loaded at failover)."""
        return self.keeper.path

    @standby_path.setter
    def standby_path(self, path: Path | None) -> None:
        self.keeper.path = path

    def attach(self, engine: EngineControl) -> None:
        self.engine = engine
        engine.on_checkpoint(self._after_checkpoint)

    def keep_standby(self) -> asyncio.Task[None] | None:
        """Start loading (and keep loaded) the hot/warm standby in the background; None in cold mode."""
        if self.mode not in ("hot", "warm") or self._keeper_task is not None or self.engine is None:
            return self._keeper_task
        self._keeper_task = asyncio.get_running_loop().create_task(self.keeper.run(self.engine),
                                                                   name="standby-keeper")
        return self._keeper_task

    async def stop_standby(self) -> None:
        """Stop the keeper (before the engine closes, so it installs nothing into a closed engine)."""
        task, self._keeper_task = self._keeper_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def standby_gap(self) -> str | None:
        """Why no standby could take over now (hot/warm, one configured), for /readyz; else None."""
        engine = self.engine
        if self.mode == "cold" or engine is None:
            return None
        if engine.releases.standby_ready:
            return None
        pending = self.keeper.pending(engine)
        if pending is None:
            return None
        if pending["error"] is None:
            return f"standby loading ({pending['bundle']})"
        when = (f"next retry in {pending['next_retry_in_s']:.0f}s" if pending["next_retry_in_s"] is not None
                else "retrying now")
        return f"standby unavailable, no failover possible: {pending['error']} ({when})"

    # ---- signals ---------------------------------------------------------------------------
    def observe(self, summary: BatchSummary) -> None:
        """Each written batch: feed the health monitor; a signal that fires fails the release."""
        if not summary.predicted:
            return
        verdict = self.monitor.batch_ok(summary.predict_seconds, summary.predicted, summary.output_invalid,
                                        summary.model_exceptions)
        if verdict is not None and self.engine is not None:
            self.engine.request_failover(ReleaseFailure(verdict.detail, reason=verdict.reason))

    async def handle(self, engine: EngineControl, exc: ReleaseFailure) -> bool:
        """Called with the interval already aborted. True = the engine goes on (switched or paused)."""
        if exc.reason == "exception":
            verdict = self.monitor.batch_failed()
            if verdict is None:
                log.warning("batch failed; replaying from the checkpoint", extra={"error": str(exc)})
                return True
            exc = ReleaseFailure(verdict.detail, reason=verdict.reason)
        return await self.failover(engine, exc.reason, str(exc))

    def request(self, reason: str) -> None:
        """A manual failover (admin API, control topic): handled at the next loop iteration.
        Ignored while paused (there is nothing to fail over to, or the cap holds)."""
        if self.engine is not None and not self.engine.is_paused:
            self.engine.request_failover(ReleaseFailure(f"manual request: {reason}", reason="manual"))

    # ---- the switch ------------------------------------------------------------------------
    async def failover(self, engine: EngineControl, reason: str, detail: str) -> bool:
        t0 = engine.failed_at or time.monotonic()
        blocked = self.policy.check()
        if blocked is not None:
            capped = self.policy.capped()
            self.pause(engine, blocked, cap=capped)
            if not capped:  # cooling down: try again (policy permitting) when the cool-down ends
                self.pause_kind = "cooldown"
                self._spawn(self._retry_after_cooldown(engine, reason, detail))
            return True
        standby = engine.releases.standby
        if (standby is None or standby.worker.dead) and self.mode == "cold" and self.standby_path:
            try:
                standby = await self.loader(self.standby_path, "standby")
            except Exception as err:  # noqa: BLE001
                log.error("cold standby failed to load", extra={"error": str(err)})
                standby = None
        old = engine.releases.active
        assert old is not None, "a failover needs an active release"
        if standby is None or standby.worker.dead:
            gap = self.standby_gap()
            self.pause(engine, f"no healthy standby to take over from {old.ref} ({reason}: {detail})"
                       + (f"; {gap}" if gap else ""))
            return True
        if engine.is_paused:
            self.resume(engine)
        old.worker.kill()
        await old.worker.close(timeout=1.0)
        engine.switch_active(standby)
        engine.install_standby(None)
        if self.standby_path == standby.bundle_path:
            self.standby_path = None  # that release is active now; a new standby must be promoted (or fail back)
        self.policy.record()
        self.monitor.reset()
        checkpoint = engine.committed_offsets()
        engine.mark_activated(standby)
        event = {"kind": "failover", "from": old.describe(), "to": standby.describe(), "reason": reason,
                 "detail": detail, "checkpoint": checkpoint, "time": time.time(), "instance": engine.instance_id,
                 "replayed": engine.last_replay, "duration_s": None, "_t0": t0}
        self.events.append(event)
        self._open_event = event
        engine.checkpoint_soon()
        m.FAILOVERS.labels(reason).inc()
        engine.publish_release_info()
        log.error("FAILOVER", extra={"from": old.ref, "to": standby.ref, "reason": reason,
                                     "replayed": engine.last_replay, "detail": detail})
        if self.recorder is not None:
            self._spawn(self.recorder({k: v for k, v in event.items() if not k.startswith("_")}, standby.bundle_path))
        if self.failback:
            self._spawn(self._failback_later(engine, old.bundle_path))
        return True

    async def apply_change(self, engine: EngineControl, change: Change) -> None:
        """Make the loaded releases match the desired ones (promote, rollback, another instance's
        failover). Runs at a checkpoint boundary, under the engine lock."""
        self._deferred = None  # a newer change carries the whole desired state: it supersedes a deferred one
        want_active, want_standby = change.get("active"), change.get("standby")
        # A change carries the whole desired state: the kind of the event that last set the active
        # channel decides whether the policy applies (its "channel" when the watcher says, else
        # the first change that named this active).
        if change.get("channel") == "active" or want_active != self._active_wanted:
            self._active_wanted, self._active_kind = want_active, change.get("kind")
        try:
            active = engine.releases.active
            assert active is not None, "a release change needs an active release"
            if want_active and want_active != active.digest:
                if self._active_kind == "failover" and (blocked := self.policy.check()) is not None:
                    self._defer(engine, change, blocked)
                else:
                    await self._switch_active(engine, change, want_active, want_standby)
            now = engine.releases
            assert now.active is not None
            if want_standby and now.standby is not None and want_standby == now.standby.digest:
                self.standby_path = now.standby.bundle_path  # re-promoted: stop loading anything else
            elif want_standby and want_standby != now.active.digest:
                path = self.bundle_path(want_standby)
                self.standby_path = path  # hot/warm: the keeper loads it in the background
                if self.mode == "cold" and engine.is_paused and self.pause_kind == "no_standby":
                    await self.failover(engine, "standby_available", f"{want_standby[:12]} promoted to standby")
        except Exception as exc:  # noqa: BLE001 - a bad promotion must not take the daemon down
            log.error("could not apply the release change; keeping the current releases",
                      extra={"change": {k: v for k, v in change.items() if k != "rescore"}, "error": str(exc)})
            if isinstance(exc, FetchError):  # no source has the bundle yet (its holder down?): try again later
                self._deferred = change
                self._spawn(self._requeue(engine, change, FETCH_RETRY_S))
        engine.publish_release_info()

    async def _switch_active(self, engine: EngineControl, change: Change, want_active: str,
                             want_standby: str | None) -> None:
        sb = engine.releases.standby
        if sb is not None and sb.digest == want_active and not sb.worker.dead:
            new = sb
            engine.install_standby(None)
            if self.standby_path == new.bundle_path:
                self.standby_path = None  # the standby is active now
        else:
            new = await self.loader(self.bundle_path(want_active), "active")
        old = engine.releases.active
        assert old is not None
        engine.switch_active(new)
        self.monitor.reset()
        if self._active_kind == "failover":
            self.policy.record()  # following another instance's failover counts toward the cap here too
        if old.digest == want_standby and self.mode in ("hot", "warm") and engine.releases.standby is None:
            engine.install_standby(old)
            self.standby_path = old.bundle_path
        else:
            await old.worker.close(timeout=2.0)
        engine.mark_activated(new)
        self.events.append({"kind": change.get("kind") or "release", "from": old.describe(),
                            "to": new.describe(), "time": time.time(), "instance": engine.instance_id})
        since = engine.release_started(old.digest)
        if change.get("rescore") and since:
            n = await engine.rescore(since, f"rollback-of:{old.ref}:{old.digest[:12]}")
            self.events[-1]["corrections"] = n
            await engine.checkpoint()
        log.warning("release switched", extra={"from": old.ref, "to": new.ref, "kind": change.get("kind")})
        if engine.is_paused:
            self.resume(engine)

    def _defer(self, engine: EngineControl, change: Change, why: str) -> None:
        """Hold back a switch that follows another instance's failover until the policy allows it."""
        wait = self.policy.wait_s()
        self._deferred = change
        log.warning("release switch deferred by the anti-flapping policy", extra={
            "to": change.get("ref"), "kind": change.get("kind"), "why": why, "retry_in_s": round(wait, 1)})
        self.events.append({"kind": "deferred", "to": change.get("ref"), "reason": why, "retry_in_s": round(wait, 1),
                            "time": time.time(), "instance": engine.instance_id})
        self._spawn(self._requeue(engine, change, wait))

    async def _requeue(self, engine: EngineControl, change: Change, wait: float) -> None:
        await asyncio.sleep(wait + 0.01)
        if self._deferred is change:
            # applied (and checked again) at the next checkpoint boundary, unless a change waits already
            engine.request_change(change, replace=False)

    def bundle_path(self, digest: str) -> Path:
        from daemon.registry import Registry

        # not held yet: the path it will have; the loader fetches it by digest (daemon/distribution)
        return Registry(self.settings.registry.path).bundle_path(digest, missing_ok=True)

    async def _retry_after_cooldown(self, engine: EngineControl, reason: str, detail: str) -> None:
        await asyncio.sleep(self.policy.cooldown_left() + 0.01)
        async with engine.lock:
            if engine.is_paused and self.pause_kind == "cooldown":
                await self.failover(engine, reason, f"{detail} (deferred by the cool-down)")

    def _after_checkpoint(self) -> None:
        ev = self._open_event
        if ev is not None:
            ev["duration_s"] = time.monotonic() - ev["_t0"]
            m.FAILOVER_SECONDS.observe(ev["duration_s"])
            self._open_event = None
            log.info("failover complete", extra={"to": ev["to"]["name"] + "@" + ev["to"]["version"],
                                                 "seconds": round(ev["duration_s"], 3)})

    def pause(self, engine: EngineControl, why: str, cap: bool = False) -> None:
        self.pause_kind = "cap" if cap else "no_standby"
        engine.pause(why)
        m.FAILOVER_CAP_REACHED.set(1)
        m.READY.set(0)
        log.critical("CONSUMPTION PAUSED: %s; state and offsets kept, nothing emitted", why)
        self.events.append({"kind": "paused", "reason": "cap" if cap else "no_standby", "detail": why,
                            "time": time.time(), "instance": engine.instance_id})

    def resume(self, engine: EngineControl) -> None:
        self.pause_kind = None
        engine.resume()
        m.FAILOVER_CAP_REACHED.set(0)

    async def _failback_later(self, engine: EngineControl, bundle_path: Path) -> None:
        """After a delay, make the failed release the standby target again (unless another standby
        came meanwhile). Hot/warm: the keeper loads it, checks its health and installs it; cold:
        it is loaded at the next failover."""
        await asyncio.sleep(self.failback_delay)
        async with engine.lock:
            if engine.releases.standby is not None or self.standby_path is not None or engine.stopping.is_set():
                return
            self.standby_path = bundle_path
            log.info("fail-back: the failed release is the standby again once it loads and passes its health check",
                     extra={"bundle": str(bundle_path)})
            if self.mode == "cold" and engine.is_paused and self.pause_kind == "no_standby":
                await self.failover(engine, "standby_available", f"fail-back of {bundle_path.name}")

    async def _standby_installed(self, engine: EngineControl, release: LoadedRelease) -> None:
        """The keeper installed a standby (under the engine lock): end a pause for want of one."""
        if engine.is_paused and self.pause_kind == "no_standby":
            # paused for want of a standby: one is here now, so take over (policy permitting)
            await self.failover(engine, "standby_available", f"{release.ref} loaded and passed its health check")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def recent(self) -> list[Event]:
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.events]
