"""Keeping every instance on the same releases: the control topic, the release log, reconciling.

- :class:`ReleaseRecorder` writes a failover to the release log and publishes it on the control
  topic, off the hot path (the switch itself never waits for it). It retries with backoff until
  it succeeds or the daemon stops, one failover at a time and in order, so the other instances
  and the release log learn of every failover once the broker is back
  (``failoverd_failovers_unrecorded``, ``failoverd_control_publish_failures_total``).
- :class:`ControlWatcher` follows the control topic. A release event (promote, rollback, another
  instance's failover) becomes a *pending change* that the engine applies at its next checkpoint
  boundary; a ``failover_request`` event becomes a manual failover. Records it cannot read are
  skipped and counted (daemon/control.py); any other error (broker down, topic deleted) restarts
  it with backoff, and the events published in the meantime are applied when it is back. It
  never ends while the daemon runs; ``failoverd_control_following`` says whether it follows.
- the failover controller's ``apply_change`` then makes the loaded releases match the desired
  active/standby. Every instance needs the bundles: a shared registry directory (or one per host
  holding the same archives); the release log itself is synced from the topic.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from daemon import control
from daemon import metrics as m

log = logging.getLogger("failoverd.coordination")


class Backoff:
    """Exponential delays (``first`` doubling up to ``cap``); :meth:`reset` after a success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class ReleaseRecorder:
    RETRY_FIRST_S = 1.0
    RETRY_CAP_S = 30.0
    LOG_EVERY_S = 60.0
    """A failed attempt is logged at once, then at most once a minute (every attempt is counted)."""
    PUBLISH_TIMEOUT_S = 10.0

    def __init__(self, settings) -> None:
        self.settings = settings
        self.kafka = settings.kafka.client_kwargs()
        self.topic = settings.registry.control_topic
        self._order = asyncio.Lock()  # FIFO: failovers are recorded in the order they happened

    def _registry(self):
        from daemon.registry import Registry

        return Registry(self.settings.registry.path)

    def _append(self, to: dict, reason: str, bundle_path: Path):
        from daemon.errors import FailoverdError

        registry = self._registry()
        try:
            registry.bundle_path(to["digest"])
        except FailoverdError:
            registry.add(bundle_path)
        return registry.promote(to["digest"], "active", reason, kind="failover")

    async def record_failover(self, event: dict, bundle_path: Path) -> None:
        """Release-log entry (kind failover) for the new active, then the control-topic events.

        Each step is done once: a retry resumes at the step that failed, and re-publishing an
        event (same id) is harmless. Runs until done or cancelled (the daemon stops)."""
        to = event["to"]
        reason = f"failover ({event['reason']}): {event['detail']}"[:500]
        failover = {"type": "failover", **event, "id": event.get("id") or uuid.uuid4().hex}
        m.FAILOVERS_UNRECORDED.inc()
        try:
            async with self._order:
                release = None
                steps = ["release log", "release event", "failover event"]
                backoff = Backoff(self.RETRY_FIRST_S, self.RETRY_CAP_S)
                attempts, logged_at = 0, None
                while steps:
                    try:
                        if steps[0] == "release log":
                            release = await asyncio.to_thread(self._append, to, reason, bundle_path)
                        elif steps[0] == "release event":
                            assert release is not None  # the step before wrote it
                            await control.publish(self.kafka, self.topic, control.release_event(release),
                                                  timeout=self.PUBLISH_TIMEOUT_S)
                        else:
                            await control.publish(self.kafka, self.topic, failover, timeout=self.PUBLISH_TIMEOUT_S)
                        steps.pop(0)
                        continue
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - anything: retry; the failover itself happened
                        attempts += 1
                        m.CONTROL_PUBLISH_FAILURES.inc()
                        delay = backoff.next()
                        now = time.monotonic()
                        if logged_at is None or now - logged_at >= self.LOG_EVERY_S:
                            logged_at = now
                            log.warning("failover not recorded yet; retrying", extra={
                                "step": steps[0], "attempts": attempts, "retry_in_s": delay,
                                "to": f"{to.get('name')}@{to.get('version')}", "error": str(exc)})
                    await asyncio.sleep(delay)
                if attempts:
                    log.info("failover recorded after retries", extra={"attempts": attempts + 1,
                                                                       "to": f"{to.get('name')}@{to.get('version')}"})
        except asyncio.CancelledError:
            log.error("daemon stopping: a failover was not recorded in the release log/control topic",
                      extra={"to": f"{to.get('name')}@{to.get('version')}", "id": failover["id"]})
            raise
        finally:
            m.FAILOVERS_UNRECORDED.dec()

    async def request_failover(self, reason: str) -> dict:
        return await control.publish(self.kafka, self.topic, {"type": "failover_request", "reason": reason})


class ControlWatcher:
    """Follows the control topic and hands release changes to the engine, whatever happens to it."""

    STEADY_S = 30.0
    """Following this long resets the backoff (a watcher that fails at once keeps backing off)."""

    def __init__(self, settings, engine, controller, *, timeout: float = 10.0, probe_interval: float = 5.0,
                 backoff: Backoff | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.controller = controller
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.reader: control.ControlReader | None = None
        self.desired: dict[str, str | None] = {"active": None, "standby": None}
        self.seen: set[str] = set()
        """Ids of the events already handled (or present at the first start): never twice."""
        self.started = False
        self.restarts = 0

    async def start(self) -> None:
        """Read the topic to its end; then handle the events that arrived while not following
        (none on the first start: the daemon loaded the releases the registry names)."""
        self.reader = control.ControlReader(self.settings.kafka.client_kwargs(), self.settings.registry.control_topic,
                                            timeout=self.timeout, probe_interval=self.probe_interval, seen=self.seen)
        try:
            await self.reader.start()
        except BaseException:
            self.reader = None
            raise
        if not self.started:
            self.started = True
            for channel, ev in self.reader.releases().items():
                self.desired[channel] = ev.get("digest") if ev else None
            return
        missed = list(self.reader.events)
        if missed:
            log.info("control topic: applying the events published while not following", extra={"events": len(missed)})
        for event in missed:
            await self._handle(event)

    async def _remember(self, event: dict) -> None:
        """Keep the local release log in step with the topic (a no-op when the log is shared)."""
        from daemon.registry import Registry

        try:
            await asyncio.to_thread(Registry(self.settings.registry.path).apply_events, [event])
        except Exception as exc:  # noqa: BLE001
            log.warning("release event not written to the local release log", extra={"error": str(exc)})

    async def _handle(self, event: control.ControlEvent) -> None:
        value = event.value or {}  # validated by control.check_event
        if event.type == "release":
            await self._remember(value)
            self.desired[value["channel"]] = value["digest"]
            self.engine.request_change(dict(self.desired, rescore=bool(value.get("rescore")),
                                            kind=value.get("kind"), channel=value["channel"],
                                            ref=f"{value['name']}@{value['version']}"))
        elif event.type == "failover_request":
            self.controller.request(value.get("reason") or "manual request on the control topic")

    async def follow(self) -> None:
        """Follow until cancelled: restart with backoff after any error."""
        topic = self.settings.registry.control_topic
        try:
            while True:
                began = time.monotonic()
                try:
                    await self.start()
                    m.CONTROL_FOLLOWING.set(1)
                    if self.restarts:
                        log.warning("following the control topic again", extra={"topic": topic,
                                                                                 "restarts": self.restarts})
                    await self.run()
                    raise control.ControlTopicError(f"control topic {topic!r}: the reader stopped")
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - never end while the daemon runs
                    m.CONTROL_FOLLOWING.set(0)
                    if time.monotonic() - began >= self.STEADY_S:
                        self.backoff.reset()
                    delay = self.backoff.next()
                    self.restarts += 1
                    log.error("not following the control topic: release changes and failover requests do not "
                              "reach this instance until it is back; retrying",
                              extra={"topic": topic, "retry_in_s": delay, "error": str(exc)})
                    await self._stop_reader()
                    await asyncio.sleep(delay)
        finally:
            m.CONTROL_FOLLOWING.set(0)
            await self._stop_reader()

    async def _stop_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            try:
                await reader.stop()
            except Exception as exc:  # noqa: BLE001
                log.debug("control reader stop failed", extra={"error": str(exc)})

    async def run(self) -> None:
        """Handle each new event until the reader fails (raises)."""
        if self.reader is None:
            return
        async for event in self.reader.watch():
            await self._handle(event)
