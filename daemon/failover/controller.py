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
from collections.abc import Awaitable, Callable
from pathlib import Path

from daemon import metrics as m
from daemon.engine.batch import DLQ
from daemon.errors import ReleaseFailure
from daemon.failover.policy import FailoverPolicy
from daemon.failover.signals import HealthMonitor
from daemon.failover.standby import StandbyKeeper

log = logging.getLogger("failoverd.failover")

Recorder = Callable[[dict, Path], Awaitable[None]]


class FailoverController:
    def __init__(self, settings, *, loader, standby_path: Path | None, recorder: Recorder | None = None) -> None:
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
        self.events: collections.deque[dict] = collections.deque(maxlen=50)
        self.engine = None
        self._open_event: dict | None = None
        self.pause_kind: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._keeper_task: asyncio.Task | None = None
        self._active_wanted: str | None = None  # the active digest of the last release change ...
        self._active_kind: str | None = None  # ... and the kind of event that asked for it
        self._deferred: dict | None = None  # a release change the policy holds back

    @property
    def standby_path(self) -> Path | None:
        """The standby bundle wanted now (hot/warm: kept loaded by the keeper; cold: loaded at failover)."""
        return self.keeper.path

    @standby_path.setter
    def standby_path(self, path: Path | None) -> None:
        self.keeper.path = path

    def attach(self, engine) -> None:
        self.engine = engine
        engine.after_checkpoint.append(self._after_checkpoint)

    def keep_standby(self) -> asyncio.Task | None:
        """Start loading (and keep loaded) the hot/warm standby in the background; None in cold mode."""
        if self.mode not in ("hot", "warm") or self._keeper_task is not None:
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
        sb = engine.standby
        if sb is not None and not getattr(sb.worker, "dead", False):
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
    def observe(self, engine, summary: dict) -> None:
        results = summary["results"]
        if not results:
            return
        invalid = failed = 0
        for r in results:
            if r[0] == DLQ:
                if r[1] == "output_schema":
                    invalid += 1
                elif r[1] == "model_exception":
                    failed += 1
        verdict = self.monitor.batch_ok(summary["predict_seconds"], len(results), invalid, failed)
        if verdict is not None and engine.pending_failure is None:
            engine.pending_failure = ReleaseFailure(verdict.detail, reason=verdict.reason)

    async def handle(self, engine, exc: ReleaseFailure) -> bool:
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
        if self.engine is not None and self.engine.pending_failure is None and not self.engine.paused:
            self.engine.pending_failure = ReleaseFailure(f"manual request: {reason}", reason="manual")

    # ---- the switch ------------------------------------------------------------------------
    async def failover(self, engine, reason: str, detail: str) -> bool:
        t0 = engine.failed_at or time.monotonic()
        blocked = self.policy.check()
        if blocked is not None:
            capped = self.policy.capped()
            self.pause(engine, blocked, cap=capped)
            if not capped:  # cooling down: try again (policy permitting) when the cool-down ends
                self.pause_kind = "cooldown"
                self._spawn(self._retry_after_cooldown(engine, reason, detail))
            return True
        standby = engine.standby
        if (standby is None or getattr(standby.worker, "dead", False)) and self.mode == "cold" and self.standby_path:
            try:
                standby = await self.loader(self.standby_path, "standby")
            except Exception as err:  # noqa: BLE001
                log.error("cold standby failed to load", extra={"error": str(err)})
                standby = None
        if standby is None or getattr(standby.worker, "dead", False):
            gap = self.standby_gap()
            self.pause(engine, f"no healthy standby to take over from {engine.active.ref} ({reason}: {detail})"
                       + (f"; {gap}" if gap else ""))
            return True
        if engine.paused:
            self.resume(engine)
        old = engine.active
        old.worker.kill()
        await old.worker.close(timeout=1.0)
        standby.channel = "active"
        standby.worker.label = "active"
        engine.active = standby
        engine.standby = None
        if self.standby_path == standby.bundle_path:
            self.standby_path = None  # that release is active now; a new standby must be promoted (or fail back)
        engine.agreement = [0, 0]
        self.policy.record()
        self.monitor.reset()
        checkpoint = {f"{tp.topic}:{tp.partition}": p.committed for tp, p in engine.partitions.items()}
        engine.mark_activated(standby)
        event = {"kind": "failover", "from": old.describe(), "to": standby.describe(), "reason": reason,
                 "detail": detail, "checkpoint": checkpoint, "time": time.time(), "instance": engine.instance_id,
                 "replayed": engine.last_replay, "duration_s": None, "_t0": t0}
        self.events.append(event)
        self._open_event = event
        engine.checkpoint_asap = True
        m.FAILOVERS.labels(reason).inc()
        engine._publish_release_info()
        log.error("FAILOVER", extra={"from": old.ref, "to": standby.ref, "reason": reason,
                                     "replayed": engine.last_replay, "detail": detail})
        if self.recorder is not None:
            self._spawn(self.recorder({k: v for k, v in event.items() if not k.startswith("_")}, standby.bundle_path))
        if self.failback:
            self._spawn(self._failback_later(engine, old.bundle_path))
        return True

    async def apply_change(self, engine, change: dict) -> None:
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
            if want_active and want_active != engine.active.digest:
                if self._active_kind == "failover" and (blocked := self.policy.check()) is not None:
                    self._defer(engine, change, blocked)
                else:
                    await self._switch_active(engine, change, want_active, want_standby)
            current_standby = engine.standby.digest if engine.standby is not None else None
            if want_standby and want_standby == current_standby:
                self.standby_path = engine.standby.bundle_path  # re-promoted: stop loading anything else
            elif want_standby and want_standby != engine.active.digest:
                path = self.bundle_path(want_standby)
                self.standby_path = path  # hot/warm: the keeper loads it in the background
                if self.mode == "cold" and engine.paused and self.pause_kind == "no_standby":
                    await self.failover(engine, "standby_available", f"{want_standby[:12]} promoted to standby")
        except Exception as exc:  # noqa: BLE001 - a bad promotion must not take the daemon down
            log.error("could not apply the release change; keeping the current releases",
                      extra={"change": {k: v for k, v in change.items() if k != "rescore"}, "error": str(exc)})
        engine._publish_release_info()

    async def _switch_active(self, engine, change: dict, want_active: str, want_standby: str | None) -> None:
        sb = engine.standby
        if sb is not None and sb.digest == want_active and not getattr(sb.worker, "dead", False):
            new, engine.standby = sb, None
            if self.standby_path == new.bundle_path:
                self.standby_path = None  # the standby is active now
        else:
            new = await self.loader(self.bundle_path(want_active), "active")
        old = engine.active
        new.channel = "active"
        new.worker.label = "active"
        engine.active = new
        engine.agreement = [0, 0]
        self.monitor.reset()
        if self._active_kind == "failover":
            self.policy.record()  # following another instance's failover counts toward the cap here too
        if old.digest == want_standby and self.mode in ("hot", "warm") and engine.standby is None:
            old.channel = "standby"
            old.worker.label = "standby"
            engine.standby = old
            self.standby_path = old.bundle_path
        else:
            await old.worker.close(timeout=2.0)
        engine.mark_activated(new)
        self.events.append({"kind": change.get("kind") or "release", "from": old.describe(),
                            "to": new.describe(), "time": time.time(), "instance": engine.instance_id})
        since = engine.release_since.get(old.digest)
        if change.get("rescore") and since:
            n = await engine.rescore(since, f"rollback-of:{old.ref}:{old.digest[:12]}")
            self.events[-1]["corrections"] = n
            await engine.checkpoint()
        log.warning("release switched", extra={"from": old.ref, "to": new.ref, "kind": change.get("kind")})
        if engine.paused:
            self.resume(engine)

    def _defer(self, engine, change: dict, why: str) -> None:
        """Hold back a switch that follows another instance's failover until the policy allows it."""
        wait = self.policy.wait_s()
        self._deferred = change
        log.warning("release switch deferred by the anti-flapping policy", extra={
            "to": change.get("ref"), "kind": change.get("kind"), "why": why, "retry_in_s": round(wait, 1)})
        self.events.append({"kind": "deferred", "to": change.get("ref"), "reason": why, "retry_in_s": round(wait, 1),
                            "time": time.time(), "instance": engine.instance_id})
        self._spawn(self._requeue(engine, change, wait))

    async def _requeue(self, engine, change: dict, wait: float) -> None:
        await asyncio.sleep(wait + 0.01)
        if self._deferred is change and engine.pending_change is None:
            engine.pending_change = change  # applied (and checked again) at the next checkpoint boundary

    def bundle_path(self, digest: str) -> Path:
        from daemon.registry import Registry

        return Registry(self.settings.registry.path).bundle_path(digest)

    async def _retry_after_cooldown(self, engine, reason: str, detail: str) -> None:
        await asyncio.sleep(self.policy.cooldown_left() + 0.01)
        async with engine.lock:
            if engine.paused and self.pause_kind == "cooldown":
                await self.failover(engine, reason, f"{detail} (deferred by the cool-down)")

    def _after_checkpoint(self, engine) -> None:
        ev = self._open_event
        if ev is not None:
            ev["duration_s"] = time.monotonic() - ev["_t0"]
            m.FAILOVER_SECONDS.observe(ev["duration_s"])
            self._open_event = None
            log.info("failover complete", extra={"to": ev["to"]["name"] + "@" + ev["to"]["version"],
                                                 "seconds": round(ev["duration_s"], 3)})

    def pause(self, engine, why: str, cap: bool = False) -> None:
        self.pause_kind = "cap" if cap else "no_standby"
        engine.paused = True
        engine.pause_reason = why
        if engine.consumer is not None:
            engine.consumer.pause(*engine.consumer.assignment())
        m.FAILOVER_CAP_REACHED.set(1)
        m.READY.set(0)
        log.critical("CONSUMPTION PAUSED: %s; state and offsets kept, nothing emitted", why)
        self.events.append({"kind": "paused", "reason": "cap" if cap else "no_standby", "detail": why,
                            "time": time.time(), "instance": engine.instance_id})

    def resume(self, engine) -> None:
        self.pause_kind = None
        engine.paused = False
        engine.pause_reason = ""
        m.FAILOVER_CAP_REACHED.set(0)
        if engine.consumer is not None:
            engine.consumer.resume(*engine.consumer.assignment())

    async def _failback_later(self, engine, bundle_path: Path) -> None:
        """After a delay, make the failed release the standby target again (unless another standby
        came meanwhile). Hot/warm: the keeper loads it, checks its health and installs it; cold:
        it is loaded at the next failover."""
        await asyncio.sleep(self.failback_delay)
        async with engine.lock:
            if engine.standby is not None or self.standby_path is not None or engine.stopping.is_set():
                return
            self.standby_path = bundle_path
            log.info("fail-back: the failed release is the standby again once it loads and passes its health check",
                     extra={"bundle": str(bundle_path)})
            if self.mode == "cold" and engine.paused and self.pause_kind == "no_standby":
                await self.failover(engine, "standby_available", f"fail-back of {bundle_path.name}")

    async def _standby_installed(self, engine, release) -> None:
        """The keeper installed a standby (under the engine lock): end a pause for want of one."""
        if engine.paused and self.pause_kind == "no_standby":
            # paused for want of a standby: one is here now, so take over (policy permitting)
            await self.failover(engine, "standby_available", f"{release.ref} loaded and passed its health check")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def recent(self) -> list[dict]:
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.events]
