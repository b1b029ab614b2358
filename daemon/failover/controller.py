"""The failover controller: turns failure signals into a switch to the standby, or a pause.

The procedure (the engine has already aborted the open transaction and rewound every
partition to its last checkpoint before :meth:`handle` runs):

1. check the anti-flapping policy (cool-down, cap per window); blocked -> pause loudly;
2. find a healthy standby (hot/warm: loaded; cold: load it now); none -> pause loudly;
3. stop the failed worker, make the standby active (its state namespace is already restored
   to the last checkpoint in the local store), publish the release info;
4. record the failover (release log + control topic, off the hot path);
5. the engine resumes from the checkpoint; the first committed checkpoint after the switch
   closes the failover's duration.

A paused daemon keeps its state and offsets and emits nothing; readiness is false.
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

log = logging.getLogger("failoverd.failover")

Recorder = Callable[[dict, Path], Awaitable[None]]


class FailoverController:
    def __init__(self, settings, *, loader, standby_path: Path | None, recorder: Recorder | None = None) -> None:
        f = settings.failover
        self.settings = settings
        self.mode = f.standby_mode
        self.loader = loader
        self.standby_path = standby_path
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

    def attach(self, engine) -> None:
        self.engine = engine
        engine.after_checkpoint.append(self._after_checkpoint)

    # ---- signals ---------------------------------------------------------------------------
    def observe(self, engine, summary: dict) -> None:
        results = summary["results"]
        if not results:
            return
        invalid = sum(1 for r in results if r[0] == DLQ and r[1] == "output_schema")
        verdict = self.monitor.batch_ok(summary["predict_seconds"], len(results), invalid)
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
            self.pause(engine, f"no healthy standby to take over from {engine.active.ref} ({reason}: {detail})")
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
        if self.mode == "cold" and self.standby_path == standby.bundle_path:
            self.standby_path = None  # that release is active now; a cold standby must be promoted again
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
        want_active, want_standby = change.get("active"), change.get("standby")
        try:
            if want_active and want_active != engine.active.digest:
                if engine.standby is not None and engine.standby.digest == want_active:
                    new, engine.standby = engine.standby, None
                else:
                    new = await self.loader(self.bundle_path(want_active), "active")
                old = engine.active
                new.channel = "active"
                new.worker.label = "active"
                engine.active = new
                engine.agreement = [0, 0]
                self.monitor.reset()
                if old.digest == want_standby and self.mode in ("hot", "warm") and engine.standby is None:
                    old.channel = "standby"
                    old.worker.label = "standby"
                    engine.standby = old
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
            current_standby = engine.standby.digest if engine.standby is not None else None
            if want_standby and want_standby not in (current_standby, engine.active.digest):
                path = self.bundle_path(want_standby)
                self.standby_path = path
                if self.mode == "cold" and engine.paused and self.pause_kind == "no_standby":
                    await self.failover(engine, "standby_available", f"{want_standby[:12]} promoted to standby")
                elif self.mode in ("hot", "warm"):
                    fresh = await self.loader(path, "standby")
                    if engine.standby is not None:
                        await engine.standby.worker.close(timeout=2.0)
                    engine.standby = fresh
                    log.info("standby loaded", extra={"release": fresh.ref})
                    if engine.paused and self.pause_kind == "no_standby":
                        await self.failover(engine, "standby_available", f"{fresh.ref} promoted to standby")
        except Exception as exc:  # noqa: BLE001 - a bad promotion must not take the daemon down
            log.error("could not apply the release change; keeping the current releases",
                      extra={"change": {k: v for k, v in change.items() if k != "rescore"}, "error": str(exc)})
        engine._publish_release_info()

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
        """Reload a failed release as standby only after a delay and a passing health check."""
        await asyncio.sleep(self.failback_delay)
        try:
            candidate = await self.loader(bundle_path, "standby")
        except Exception as err:  # noqa: BLE001
            log.warning("fail-back candidate failed to load", extra={"error": str(err)})
            return
        if not await candidate.worker.health():
            log.warning("fail-back candidate failed its health check", extra={"release": candidate.ref})
            await candidate.worker.close()
            return
        async with engine.lock:
            if engine.standby is None:
                engine.standby = candidate
                engine._publish_release_info()
                log.info("failed release is standby again", extra={"release": candidate.ref})
                if engine.paused and self.pause_kind == "no_standby":
                    # paused for want of a standby: one is here now, so take over (policy permitting)
                    await self.failover(engine, "standby_available", f"{candidate.ref} passed its health check")
            else:
                await candidate.worker.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def recent(self) -> list[dict]:
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.events]
