"""What the rest of the daemon may see and ask of the engine: its control surface.

The failover controller, the standby keeper and the control-topic watcher steer the engine only
through :class:`EngineControl` (switch the active, install or drop the standby, pause, resume,
request a failover or a release change, publish release info, mark a release activated); they
never write its fields. Observers of the data path get a :class:`BatchSummary` per written
batch, not the model's raw results, so nothing outside ``daemon/engine/`` needs to know the
worker's result format.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from aiokafka import TopicPartition

from daemon import metrics as m
from daemon.engine.assignment import Assignment
from daemon.engine.connections import EngineClients
from daemon.engine.partition import Partition
from daemon.engine.release import LoadedRelease
from daemon.engine.restore import Restorer
from daemon.engine.shadow import Agreement
from daemon.errors import ReleaseFailure, WorkerCrashed

log = logging.getLogger("failoverd.engine")

Change = dict[str, Any]
"""A release change from the control topic: the desired ``active``/``standby`` digests and the event's
``kind``, ``channel``, ``ref``, ``rescore``."""


@dataclasses.dataclass(frozen=True)
class BatchSummary:
    """One written batch as the health monitor sees it."""

    release: LoadedRelease
    records: int
    """Every input of the batch, dead letters included."""
    predicted: int
    """Records the model answered for (the health signals' sample size; 0: nothing reached it)."""
    predict_seconds: float
    output_invalid: int
    """Of ``predicted``: outputs that failed the output schema (dead letters ``output_schema``)."""
    model_exceptions: int
    """Of ``predicted``: records ``predict`` raised on alone (dead letters ``model_exception``)."""


@dataclasses.dataclass(frozen=True)
class Releases:
    """The releases loaded now (a snapshot: read it again after any await)."""

    active: LoadedRelease | None
    standby: LoadedRelease | None

    @property
    def standby_ready(self) -> bool:
        """A standby is loaded and its worker is alive."""
        return self.standby is not None and not self.standby.worker.dead


class EngineControl(Protocol):
    """The engine as the failover controller, the standby keeper and coordination see it."""

    lock: asyncio.Lock
    """Held by every step of the data path: take it to change releases between batches."""
    stopping: asyncio.Event
    instance_id: str

    @property
    def closing(self) -> bool: ...
    @property
    def releases(self) -> Releases: ...
    @property
    def is_paused(self) -> bool: ...
    @property
    def failed_at(self) -> float: ...
    @property
    def last_replay(self) -> int: ...

    def switch_active(self, release: LoadedRelease) -> None: ...
    def install_standby(self, release: LoadedRelease | None) -> LoadedRelease | None: ...
    def drop_standby(self, release: LoadedRelease) -> bool: ...
    def pause(self, why: str) -> None: ...
    def resume(self) -> None: ...
    def request_failover(self, failure: ReleaseFailure) -> bool: ...
    def request_change(self, change: Change, *, replace: bool = True) -> bool: ...
    def publish_release_info(self) -> None: ...
    def mark_activated(self, release: LoadedRelease) -> None: ...
    def checkpoint_soon(self) -> None: ...
    def committed_offsets(self) -> dict[str, int]: ...
    def release_started(self, digest: str) -> dict[TopicPartition, int] | None: ...
    def on_checkpoint(self, hook: Callable[[], None]) -> None: ...
    async def checkpoint(self) -> None: ...
    async def rescore(self, since: dict[TopicPartition, int], label: str) -> int: ...


class ControlSurface:
    """The engine's side of :class:`EngineControl`, plus what it shows (``ready``, ``status``):
    the releases, the pause, the requests waiting for the loop. The loop
    (:class:`daemon.engine.engine.Engine`) acts on the requests between batches, under :attr:`lock`."""

    assignment: Assignment
    clients: EngineClients
    restore: Restorer
    eos: bool
    failure: ReleaseFailure | None
    last_checkpoint: float | None

    def __init__(self, settings: Any, active: LoadedRelease | None, standby: LoadedRelease | None,
                 instance_id: str | None) -> None:
        self._active, self._standby = active, standby
        self.instance_id: str = (instance_id or settings.kafka.group_instance_id
                                 or f"{socket.gethostname()}-{os.getpid()}")
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self._closing = False
        self._paused = False
        self.pause_reason = ""
        self._pending_failure: ReleaseFailure | None = None
        self._wake: asyncio.Future[None] | None = None
        self._woken = False
        self._pending_change: Change | None = None
        self._checkpoint_asap = False  # after a failover: commit the first replayed batch at once
        self._checkpoint_hooks: list[Callable[[], None]] = []
        self._failed_at = 0.0
        self._last_replay = 0
        self.agreement = Agreement()
        self.release_since: dict[str, dict[TopicPartition, int]] = {}
        """For each release that became active here: the input offset per partition where it started."""

    # ---- the control surface (daemon.engine.control.EngineControl) ----------------------------
    @property
    def releases(self) -> Releases:
        return Releases(self._active, self._standby)

    @property
    def is_paused(self) -> bool:
        return self._paused

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def failed_at(self) -> float:
        """When the last release failure was noticed (monotonic): a failover's duration counts from here."""
        return self._failed_at

    @property
    def last_replay(self) -> int:
        """Records the last rewind sent back to be processed again."""
        return self._last_replay

    @property
    def partitions(self) -> dict[TopicPartition, Partition]:
        return self.assignment.parts

    def set_releases(self, active: LoadedRelease, standby: LoadedRelease | None) -> None:
        """Install the releases once their workers are up (they load while Kafka connects)."""
        self._active, self._standby = active, standby
        self._note_release_start(self.partitions.values())
        self.publish_release_info()

    def _note_release_start(self, parts: Iterable[Partition]) -> None:
        """The active release starts on ``parts`` at their checkpoint (unless it started earlier)."""
        if self._active is not None:
            since = self.release_since.setdefault(self._active.digest, {})
            for p in parts:
                since.setdefault(p.tp, p.committed)

    def switch_active(self, release: LoadedRelease) -> None:
        """``release`` produces the outputs from the next batch on (the old active is the caller's)."""
        release.channel = "active"
        release.worker.label = "active"
        self._active = release
        self.agreement.reset()

    def install_standby(self, release: LoadedRelease | None) -> LoadedRelease | None:
        """``release`` is the standby now; returns the one it replaces (the caller closes it)."""
        old, self._standby = self._standby, release
        if release is not None:
            release.channel = "standby"
            release.worker.label = "standby"
        self.publish_release_info()
        return old

    def drop_standby(self, release: LoadedRelease) -> bool:
        """Take ``release`` out if it is still the standby (the caller closes it)."""
        if self._standby is not release:
            return False
        self.install_standby(None)
        return True

    def pause(self, why: str) -> None:
        """Stop consuming at once; state and offsets are kept, nothing is emitted, readiness is false."""
        self._paused = True
        self.pause_reason = why
        self.assignment.pause_all()

    def resume(self) -> None:
        self._paused = False
        self.pause_reason = ""
        self.assignment.resume_all()

    def request_failover(self, failure: ReleaseFailure) -> bool:
        """Handle ``failure`` at the next loop turn (False: one is waiting already)."""
        if self._pending_failure is not None:
            return False
        self._pending_failure = failure
        self.wake()
        return True

    def wake(self) -> None:
        """Cut the loop's wait for records short (or the next one, if it is not waiting):
        something needs its attention now."""
        self._woken = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def request_change(self, change: Change, *, replace: bool = True) -> bool:
        """Apply ``change`` at the next checkpoint boundary; ``replace=False``: only if none waits."""
        if not replace and self._pending_change is not None:
            return False
        self._pending_change = change
        return True

    def checkpoint_soon(self) -> None:
        """Commit the first batch processed from now on at once (after a failover)."""
        self._checkpoint_asap = True

    def on_checkpoint(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after every committed checkpoint."""
        self._checkpoint_hooks.append(hook)

    def publish_release_info(self) -> None:
        m.RELEASE_INFO.clear()
        for rel in (self._active, self._standby):
            if rel is not None:
                m.RELEASE_INFO.labels(rel.channel, rel.name, rel.version, rel.digest).set(1)
        m.STANDBY_READY.set(1 if self.releases.standby_ready else 0)

    def mark_activated(self, release: LoadedRelease) -> None:
        """Record where ``release`` starts handling each partition (for --rescore windows)."""
        self.release_since[release.digest] = {tp: p.committed for tp, p in self.partitions.items()}

    def release_started(self, digest: str) -> dict[TopicPartition, int] | None:
        return self.release_since.get(digest)

    def committed_offsets(self) -> dict[str, int]:
        return {f"{tp.topic}:{tp.partition}": p.committed for tp, p in self.partitions.items()}

    def kill_workers(self) -> None:
        """SIGKILL every model process (a forced exit: none outlives the daemon)."""
        for rel in (self._active, self._standby):
            if rel is not None:
                rel.worker.kill()

    # ---- status -------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self._active is None:
            return False, "loading the active release"
        if self._paused:
            return False, f"paused: {self.pause_reason}"
        if self.failure is not None:
            return False, f"release failed: {self.failure}"
        if not self.partitions:
            return False, "no partitions assigned"
        if self.restore.restoring:
            return False, f"restoring state of {len(self.restore.restoring)} partition(s)"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        consumer = self.clients.consumer
        parts = []
        for tp, p in sorted(self.partitions.items()):
            hw = consumer.highwater(tp) if consumer else None
            parts.append({"topic": tp.topic, "partition": tp.partition, "committed": p.committed,
                          "position": p.position, "lag": (hw - p.committed) if hw is not None else None,
                          "last_checkpoint": p.last_checkpoint_time or None})
        return {
            "instance": self.instance_id,
            "active": self._active.describe() if self._active else None,
            "standby": self._standby.describe() if self._standby else None,
            "paused": self._paused, "pause_reason": self.pause_reason,
            "partitions": parts, "last_checkpoint": self.last_checkpoint,
            "exactly_once": self.eos, "replayed_total": self.assignment.replayed_total,
            "restoring": {f"{tp.topic}:{tp.partition}": left for tp, left in sorted(self.restore.restoring.items())},
        }

    def _watch_active(self) -> None:
        """A model process that died between batches is a failure now, not at the next batch."""
        rel = self._active
        code = rel.worker.returncode if rel is not None else None
        if rel is not None and code is not None and self._pending_failure is None and not self._paused:
            # not marked dead yet: answers it wrote before it exited are still in the pipe, and the
            # batches waiting for them read them (engine._turn drains before it blames a batch)
            self._pending_failure = WorkerCrashed(f"{rel.channel} worker (pid {rel.worker.pid}) exited with code "
                                                  f"{code} between batches")

    def _watch_standby(self) -> None:
        """Notice a standby worker that died while idle (so readiness metrics tell the truth)."""
        sb = self._standby
        if sb is not None and not sb.worker.dead and sb.worker.returncode is not None:
            log.error("standby worker died", extra={"release": sb.ref, "code": sb.worker.returncode})
            sb.worker.dead = True
            m.STANDBY_READY.set(0)

    def _update_lag(self) -> None:
        consumer = self.assignment.consumer
        for tp, p in self.partitions.items():
            hw = consumer.highwater(tp)
            if hw is not None:
                m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, hw - p.committed))

