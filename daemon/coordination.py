"""Keeping every instance on the same releases: the control topic, the release log, reconciling.

- :class:`ReleaseRecorder` writes a failover to the release log and publishes it on the control
  topic (off the hot path: the switch itself never waits for it).
- :class:`ControlWatcher` follows the control topic. A release event (promote, rollback, another
  instance's failover) becomes a *pending change* that the engine applies at its next checkpoint
  boundary; a ``failover_request`` event becomes a manual failover.
- the failover controller's ``apply_change`` then makes the loaded releases match the desired
  active/standby. Every instance needs the bundles: a shared registry directory (or one per host
  holding the same archives); the release log itself is synced from the topic.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from daemon import control
from daemon.errors import FailoverdError

log = logging.getLogger("failoverd.coordination")


class ReleaseRecorder:
    def __init__(self, settings) -> None:
        self.settings = settings
        self.kafka = settings.kafka.client_kwargs()
        self.topic = settings.registry.control_topic

    def _registry(self):
        from daemon.registry import Registry

        return Registry(self.settings.registry.path)

    async def record_failover(self, event: dict, bundle_path: Path) -> None:
        """Release-log entry (kind failover) for the new active, then the control-topic events."""
        to = event["to"]
        reason = f"failover ({event['reason']}): {event['detail']}"[:500]
        try:
            def append():
                registry = self._registry()
                try:
                    registry.bundle_path(to["digest"])
                except FailoverdError:
                    registry.add(bundle_path)
                return registry.promote(to["digest"], "active", reason, kind="failover")

            release = await asyncio.to_thread(append)
            await control.publish(self.kafka, self.topic, control.release_event(release), timeout=10)
            await control.publish(self.kafka, self.topic, {"type": "failover", **event}, timeout=10)
        except Exception as exc:  # noqa: BLE001 - the failover happened; recording it is best effort
            log.warning("failover not recorded in the release log/control topic", extra={"error": str(exc)})

    async def request_failover(self, reason: str) -> dict:
        return await control.publish(self.kafka, self.topic, {"type": "failover_request", "reason": reason})


class ControlWatcher:
    """Follows the control topic and hands release changes to the engine."""

    def __init__(self, settings, engine, controller) -> None:
        self.settings = settings
        self.engine = engine
        self.controller = controller
        self.reader: control.ControlReader | None = None
        self.desired: dict[str, str | None] = {"active": None, "standby": None}

    async def start(self) -> bool:
        self.reader = control.ControlReader(self.settings.kafka.client_kwargs(), self.settings.registry.control_topic,
                                            timeout=10)
        try:
            await self.reader.start()
        except FailoverdError as exc:
            log.warning("not following the control topic: release changes need a restart", extra={"error": str(exc)})
            self.reader = None
            return False
        for channel, ev in self.reader.releases().items():
            self.desired[channel] = ev.get("digest") if ev else None
        return True

    async def _remember(self, event: dict) -> None:
        """Keep the local release log in step with the topic (a no-op when the log is shared)."""
        from daemon.registry import Registry

        try:
            await asyncio.to_thread(Registry(self.settings.registry.path).apply_events, [event])
        except Exception as exc:  # noqa: BLE001
            log.warning("release event not written to the local release log", extra={"error": str(exc)})

    async def follow(self) -> None:
        if await self.start():
            await self.run()

    async def run(self) -> None:
        if self.reader is None:
            return
        try:
            async for event in self.reader.watch():
                value = event.value or {}
                if event.type == "release":
                    await self._remember(value)
                    self.desired[value["channel"]] = value["digest"]
                    self.engine.pending_change = dict(self.desired, rescore=bool(value.get("rescore")),
                                                      kind=value.get("kind"), ref=f"{value['name']}@{value['version']}")
                elif event.type == "failover_request":
                    self.controller.request(value.get("reason") or "manual request on the control topic")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.error("control topic watcher stopped", extra={"error": str(exc)})
        finally:
            await self.reader.stop()
