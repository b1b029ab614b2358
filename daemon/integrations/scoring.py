"""failoverd's release machinery for a stream app that is not the daemon (framework-free).

:class:`Scorer` holds the active and standby releases, each in its own model worker loaded by
:func:`daemon.engine.release.load_release` with the settings a failoverd configuration gives
(worker mode, isolation, environments, resource limits, timeouts), and scores batches on the
active one. Around it, the daemon's own pieces, not copies of them:

- :class:`~daemon.failover.signals.HealthMonitor` and :class:`~daemon.failover.policy.FailoverPolicy`
  decide when the active release has failed (worker crashed, timed out, broke the protocol or ran
  out of memory: at once; exception rate, p99 latency, invalid-output rate: over their windows)
  and whether a failover may happen now (cool-down, cap per window). A batch the active release
  failed is scored again on the standby before the caller sees anything, so a failover costs no
  record and writes no duplicate. While the policy refuses, or there is no standby, scoring
  waits (the app's stream stops consuming), as the daemon pauses.
- :class:`~daemon.control.ControlReader` follows the control topic: ``failoverd release
  promote/rollback`` (and other instances' failovers, which are release events) change the loaded
  releases between two batches; ``failoverd failover`` is a manual failover.
- every result is the daemon's: ``(OK, output_bytes)`` or ``(DLQ, reason, detail)`` per input,
  new states per state key (daemon/engine/batch.py).

A failover here is this process's own: it is logged and counted, not written to the release log
or the control topic (an app's instances each fail over on their own signals; docs/faust.md).
The framework glue (state in a faust Table, provenance headers, sending) is in
:mod:`daemon.integrations.faust`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from daemon.engine.batch import DLQ
from daemon.engine.release import LoadedRelease, load_release
from daemon.engine.worker import Item
from daemon.errors import ReleaseFailure
from daemon.failover.policy import FailoverPolicy
from daemon.failover.signals import HealthMonitor
from daemon.integrations import metrics as im

log = logging.getLogger("failoverd.integration")

INPUT_REASONS = ("bad_json", "schema", "bad_avro", "unknown_schema_id")
"""Dead letters decided before the model runs: they do not count as records the model saw."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What a failoverd configuration gives the integration (:meth:`from_settings`), or explicit values."""

    worker_mode: str = "subprocess"
    predict_timeout_s: float = 5.0
    start_timeout_s: float = 60.0
    unpack_dir: Path | None = None
    isolate_max_records: int = 10
    isolate_max_fraction: float = 0.1
    error_window: int = 200
    min_samples: int = 20
    error_rate: float = 0.5
    latency_p99_s: float = 2.0
    invalid_rate: float = 0.5
    cooldown_s: float = 5.0
    max_failovers: int = 3
    window_s: float = 600.0
    registry: Path | None = None
    kafka: dict[str, Any] | None = None
    """aiokafka client arguments (``[kafka]``): the control topic is read with them."""
    control_topic: str | None = None

    @classmethod
    def from_settings(cls, s: Any) -> Options:
        w, f = s.worker, s.failover
        return cls(worker_mode=w.mode, predict_timeout_s=w.predict_timeout_ms / 1000,
                   start_timeout_s=w.start_timeout_ms / 1000, unpack_dir=Path(s.state.directory) / "bundles",
                   isolate_max_records=f.isolate_max_records, isolate_max_fraction=f.isolate_max_fraction,
                   error_window=f.error_window, min_samples=f.min_samples, error_rate=f.error_rate_threshold,
                   latency_p99_s=f.latency_p99_slo_ms / 1000, invalid_rate=f.output_invalid_rate_threshold,
                   cooldown_s=f.cooldown_ms / 1000, max_failovers=f.max_failovers, window_s=f.window_ms / 1000,
                   registry=Path(s.registry.path), kafka=s.kafka.client_kwargs(),
                   control_topic=s.registry.control_topic)


@dataclasses.dataclass
class Answer:
    """One scored batch: a result per item, the new state per skey, and the release that produced them."""

    results: list[tuple[Any, ...]]
    states: dict[int, bytes | None]
    release: LoadedRelease


class NoRelease(RuntimeError):
    """Nothing to score with: no active release could be loaded (the message says why and the fix)."""


StatesFor = Callable[[LoadedRelease], list[bytes | None]]
"""The states of a batch's state keys as the given release sees them (state is namespaced by
release name and state-schema version: :attr:`LoadedRelease.ns`)."""


class Scorer:
    """Active and standby releases with the daemon's failover signals, policy and control topic."""

    RECHECK_S = 0.5
    """While scoring waits (policy, no standby), how often it looks again."""

    def __init__(self, options: Options, *, active: Path | None = None, standby: Path | None = None,
                 integration: str = "faust") -> None:
        self.options = options
        self.integration = integration
        self.active_path, self.standby_path = active, standby
        self.active: LoadedRelease | None = None
        self.standby: LoadedRelease | None = None
        o = options
        self.monitor = HealthMonitor(window=o.error_window, min_samples=o.min_samples, error_rate=o.error_rate,
                                     latency_p99_s=o.latency_p99_s, invalid_rate=o.invalid_rate)
        self.policy = FailoverPolicy(cooldown_s=o.cooldown_s, max_failovers=o.max_failovers, window_s=o.window_s)
        self.failovers: list[dict[str, Any]] = []
        """Every failover of this process: ``{"from", "to", "reason", "detail", "time"}``."""
        self._lock = asyncio.Lock()  # one batch, or one release change, at a time
        self._due: tuple[str, str] | None = None
        """A failover to do before the next batch: (reason, detail)."""
        self._topic_ids: dict[str, str | None] = {"active": None, "standby": None}
        """The id of the control topic's release event applied last, per channel."""
        self._control: asyncio.Task[None] | None = None
        im.init_labels(integration)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the releases (the registry's active and standby unless bundle paths were given)
        and start following the control topic (when one is configured). NoRelease when there is
        no active release to load."""
        active, standby = self.active_path, self.standby_path
        if active is None and self.options.registry is not None:
            active, standby = self._registry_paths()
        if active is None:
            raise NoRelease("no active release: give a bundle (active=PATH) or a failoverd registry whose active "
                            "channel holds one (`failoverd release promote NAME@VERSION --channel active`)")
        self.active = await self._load(active, "active")
        if standby is not None:
            try:
                self.standby = await self._load(standby, "standby")
            except Exception as exc:  # noqa: BLE001 - a bad standby must not stop the app
                log.error("standby failed to load; scoring without one", extra={"error": str(exc)[:300]})
        self._publish_info()
        if self.options.kafka and self.options.control_topic:
            self._control = asyncio.get_running_loop().create_task(self._follow(), name="failoverd-control")

    async def stop(self) -> None:
        task, self._control = self._control, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for rel in (self.active, self.standby):
            if rel is not None:
                await rel.worker.close(timeout=2.0)
        self.active = self.standby = None

    def kill_workers(self) -> None:
        """SIGKILL every model worker (a process that must exit at once)."""
        for rel in (self.active, self.standby):
            if rel is not None:
                rel.worker.kill()

    def _registry_paths(self) -> tuple[Path | None, Path | None]:
        from daemon.registry import Registry

        assert self.options.registry is not None
        reg = Registry(self.options.registry)
        status = reg.status()
        paths = {c: reg.bundle_path(r.digest) if r is not None else None for c, r in status.items()}
        if paths["standby"] == paths["active"]:
            paths["standby"] = None
        return paths["active"], paths["standby"]

    async def _load(self, path: Path, channel: str) -> LoadedRelease:
        o = self.options
        return await load_release(path, channel=channel, mode=o.worker_mode, unpack_dir=o.unpack_dir,
                                  predict_timeout=o.predict_timeout_s, start_timeout=o.start_timeout_s,
                                  isolate_max_records=o.isolate_max_records,
                                  isolate_max_fraction=o.isolate_max_fraction)

    def _publish_info(self) -> None:
        im.RELEASE_INFO.clear()
        for rel in (self.active, self.standby):
            if rel is not None:
                im.RELEASE_INFO.labels(self.integration, rel.channel, rel.name, rel.version, rel.digest).set(1)
        im.STANDBY_READY.labels(self.integration).set(1 if self.standby and not self.standby.worker.dead else 0)

    # ---- scoring ---------------------------------------------------------------------------
    async def score(self, items: Sequence[Item], states_for: StatesFor) -> Answer:
        """Score one batch on the active release; on a release failure, fail over (policy
        permitting, else wait) and score the same batch on the new active. Never returns a
        partial answer: every item gets its result from one release."""
        async with self._lock:
            while True:
                if self._due is not None:  # a manual request, or a verdict on the last batch
                    (reason, detail), self._due = self._due, None
                    await self._failover(reason, detail, time.monotonic(), must=False)
                rel = self.active
                if rel is None:
                    raise NoRelease("no active release is loaded (the scorer was stopped or never started)")
                failed_at = time.monotonic()
                try:
                    results, new_states, seconds = await rel.worker.process(list(items), states_for(rel))
                except ReleaseFailure as exc:
                    im.MODEL_ERRORS.labels(self.integration, "active", exc.reason).inc()
                    log.error("active release failed on a batch", extra={"release": rel.ref, "reason": exc.reason,
                                                                          "error": str(exc)[:300]})
                    reason, detail = exc.reason, str(exc)
                    if exc.reason == "exception" and not rel.worker.dead:
                        verdict = self.monitor.batch_failed()
                        if verdict is None:
                            continue  # counted against the release; the same batch again
                        reason, detail = verdict.reason, verdict.detail
                    await self._failover(reason, detail, failed_at, must=True)
                    continue
                im.PREDICT_SECONDS.labels(self.integration, "active").observe(seconds)
                verdict = self._observe(results, seconds)
                if verdict is not None:  # this batch's answers stand; the next batch goes to the standby
                    log.error("active release unhealthy; failing over before the next batch",
                              extra={"reason": verdict.reason, "detail": verdict.detail})
                    self._due = (verdict.reason, verdict.detail)
                return Answer(results, new_states, rel)

    def _observe(self, results: list[tuple[Any, ...]], seconds: float) -> Any:
        records = invalid = failed = 0
        for r in results:
            if r[0] == DLQ:
                if r[1] in INPUT_REASONS:
                    continue
                invalid += r[1] == "output_schema"
                failed += r[1] == "model_exception"
            records += 1
        return self.monitor.batch_ok(seconds, records, invalid, failed)

    async def _failover(self, reason: str, detail: str, failed_at: float, *, must: bool) -> None:
        """Switch to the standby (the daemon's rules). ``must``: the active release cannot answer
        this batch (it crashed, hung, or keeps raising): wait while the policy refuses or no
        standby exists -- the app's stream stops, as the daemon pauses. Otherwise (a verdict on a
        batch it did answer, a manual request) a refused failover leaves the active release on."""
        cap = im.FAILOVER_CAP_REACHED.labels(self.integration)
        logged = False
        while True:
            blocked = self.policy.check()
            standby, old = self.standby, self.active
            if blocked is None and standby is not None and not standby.worker.dead:
                break
            why = blocked or f"no healthy standby to take over from {old.ref if old else '?'}"
            if not must:
                log.warning("failover not possible now; the active release goes on",
                            extra={"reason": reason, "why": why})
                return
            cap.set(1)
            if not logged:
                log.error("cannot fail over now; scoring waits", extra={"reason": reason, "why": why})
                logged = True
            await asyncio.sleep(max(0.05, min(self.RECHECK_S, self.policy.wait_s() or self.RECHECK_S)))
        cap.set(0)
        assert old is not None and standby is not None
        old.worker.kill()
        await old.worker.close(timeout=1.0)
        standby.channel = standby.worker.label = "active"
        self.active, self.standby = standby, None
        self.policy.record()
        self.monitor.reset()
        im.FAILOVERS.labels(self.integration, reason).inc()
        im.FAILOVER_SECONDS.labels(self.integration).observe(time.monotonic() - failed_at)
        event = {"from": old.ref, "to": standby.ref, "reason": reason, "detail": detail[:300], "time": time.time()}
        self.failovers.append(event)
        log.warning("failed over", extra={"from_release": old.ref, "to_release": standby.ref, "reason": reason})
        self._publish_info()

    def request_failover(self, reason: str) -> None:
        """A manual failover, done before the next batch (``failoverd failover`` on the control topic)."""
        self._due = ("manual", f"manual request: {reason or 'manual'}")

    # ---- release changes -------------------------------------------------------------------
    async def apply(self, want: dict[str, Path | None]) -> None:
        """Make the loaded releases match ``want`` (``{"active": path, "standby": path or None}``),
        reusing a loaded worker of the same bundle. New workers load before the switch; the switch
        itself happens between two batches. An operator's change is not subject to the policy."""
        loaded = {rel.bundle_path: rel for rel in (self.active, self.standby) if rel is not None and not rel.worker.dead}
        new: dict[str, LoadedRelease | None] = {}
        for channel in ("active", "standby"):
            path = want.get(channel)
            if path is None or (channel == "standby" and path == want.get("active")):
                new[channel] = None
            elif path in loaded:
                new[channel] = loaded.pop(path)
            else:
                try:
                    new[channel] = await self._load(path, channel)
                except Exception as exc:  # noqa: BLE001
                    log.error("release change: bundle failed to load; keeping the current releases",
                              extra={"channel": channel, "bundle": str(path), "error": str(exc)[:300]})
                    for rel in new.values():
                        if rel is not None and rel not in (self.active, self.standby):
                            await rel.worker.close(timeout=1.0)
                    return
        if new["active"] is None:
            return
        async with self._lock:
            if any(rel is not None and rel.worker.dead for rel in new.values()):  # a failover came meanwhile
                log.error("release change: a release it would reuse failed meanwhile; keeping the current releases")
                for rel in new.values():
                    if rel is not None and rel not in (self.active, self.standby):
                        await rel.worker.close(timeout=1.0)
                return
            for rel in loaded.values():  # not wanted any more
                await rel.worker.close(timeout=2.0)
            for channel, rel in new.items():
                if rel is not None:
                    rel.channel = rel.worker.label = channel
            changed = self.active is not new["active"]
            self.active, self.standby = new["active"], new["standby"]
            if changed:
                self.monitor.reset()
            self._publish_info()
        log.info("releases changed", extra={"active": self.active.ref if self.active else None,
                                            "standby": self.standby.ref if self.standby else None})

    async def _follow(self) -> None:
        """Follow the control topic until stopped; restart with backoff when it cannot."""
        from daemon.control import ControlReader, ControlTopicError

        following = im.CONTROL_FOLLOWING.labels(self.integration)
        seen: set[str] = set()
        """Ids of the events handled, or present at the first start (history): never twice."""
        delay, first = 0.5, True
        assert self.options.kafka is not None and self.options.control_topic is not None
        while True:
            reader = ControlReader(self.options.kafka, self.options.control_topic, timeout=10, seen=seen)
            try:
                await reader.start()  # to the end: the current release per channel
                following.set(1)
                delay = 0.5
                await self._apply_topic(reader.releases())
                if not first:  # a restart: the failover requests published while not following (as the daemon)
                    for event in reader.events:
                        await self._handle(event, reader)
                first = False
                async for event in reader.watch():
                    await self._handle(event, reader)
            except ControlTopicError as exc:
                log.error("control topic: cannot follow; retrying", extra={"error": str(exc)[:300]})
            finally:
                following.set(0)
                await reader.stop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _handle(self, event: Any, reader: Any) -> None:
        if event.type == "release":
            await self._apply_topic(reader.releases())
        elif event.type == "failover_request" and event.value is not None:
            log.warning("manual failover requested on the control topic", extra={"reason": event.value.get("reason", "")})
            self.request_failover(str(event.value.get("reason", "")))

    async def _apply_topic(self, releases: dict[str, Any]) -> None:
        """The control topic's release events -> the loaded releases. Only a channel whose event
        changed since the last one applied moves (this process's own failovers are not on the
        topic: a promotion of the standby must not silently undo one)."""
        if self.options.registry is None:
            return
        from daemon.errors import RegistryError
        from daemon.registry import Registry

        changed = {c: e for c, e in releases.items() if e is not None and e["id"] != self._topic_ids.get(c)}
        if not changed:
            return
        reg = Registry(self.options.registry)
        want: dict[str, Path | None] = {"active": self.active.bundle_path if self.active else None,
                                         "standby": self.standby.bundle_path if self.standby else None}
        try:
            for channel, event in changed.items():
                want[channel] = reg.bundle_path(event["digest"])
        except RegistryError as exc:
            log.error("release change: bundle not in this app's registry; keeping the current releases",
                      extra={"error": str(exc)[:300]})
            return
        for channel, event in changed.items():
            self._topic_ids[channel] = event["id"]
        if want["active"] is not None and want["standby"] == want["active"] and "active" in changed:
            want["standby"] = None  # the standby was promoted: it is the active now
        await self.apply(want)
