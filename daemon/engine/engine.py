"""The data path: fetch ─ decode/validate ─ predict ─ encode ─ produce, checkpointed exactly once.

One asyncio task runs the loop; the rebalance listener and the failure handler take the same
lock, so a batch, a checkpoint, a handover and a failover never interleave. Model code runs in
the worker (subprocess or executor thread), never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (ConsumerStoppedError, KafkaError, MessageSizeTooLargeError, ProducerFenced,
                            RecordListTooLargeError)

from daemon import metrics as m
from daemon.engine import headers as H
from daemon.engine.batch import NO_STATE, OK
from daemon.engine import limits
from daemon.engine import records as tolerant
from daemon.engine.checkpoint import CheckpointPolicy, record_key, record_value
from daemon.engine.partition import Partition, store_path, transactional_id
from daemon.engine.release import LoadedRelease
from daemon.engine.sink import BatchSink, Partitioner
from daemon.engine.state import StateStore, changelog_key
from daemon.errors import ReleaseFailure, WorkerCrashed, WorkerOutOfMemory, WorkerTimeout

_PROCESS_DEATHS = (WorkerCrashed, WorkerTimeout, WorkerOutOfMemory)
"""Failures a single record can cause in the model process (see Engine._crash_by_record)."""

log = logging.getLogger("failoverd.engine")


class CheckpointFailed(KafkaError):
    """A checkpoint committed in the background failed; the batch waiting to be written is dropped
    and every partition rewinds to its last checkpoint."""


FailureHandler = Callable[["Engine", ReleaseFailure], Awaitable[bool]]
BatchObserver = Callable[["Engine", dict], None]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked) -> None:
        await self.engine._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned) -> None:
        try:
            await self.engine._on_assigned(set(assigned))
        except Exception as exc:  # noqa: BLE001 - aiokafka would only log it and go on with nothing
            if self.engine.stopping.is_set() or isinstance(exc, ConsumerStoppedError):
                # a requested stop closed the consumer while the group handed us partitions: the
                # next owner takes them from the last checkpoint; nothing of ours was committed
                log.info("stopped while taking assigned partitions", extra={"error": repr(exc)})
                return
            log.critical("could not take the assigned partitions; stopping so the supervisor restarts us",
                         extra={"error": repr(exc)})
            self.engine.fatal = exc
            self.engine.stop()


class Engine:
    MAX_HELD = 4
    """Batches predicted while a checkpoint commits, held until it ends; then the loop waits."""

    def __init__(self, settings, *, active: LoadedRelease | None, standby: LoadedRelease | None = None,
                 instance_id: str | None = None, on_failure: FailureHandler | None = None,
                 observers: list[BatchObserver] | None = None) -> None:
        self.s = settings
        self.active = active
        self.standby = standby
        self.instance_id = instance_id or settings.kafka.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.on_failure = on_failure
        self.observers = observers or []
        self.after_checkpoint: list[Callable[["Engine"], None]] = []
        self.pending_failure: ReleaseFailure | None = None
        self.pending_change: dict | None = None
        self.release_since: dict[str, dict[TopicPartition, int]] = {}
        """For each release that became active here: the input offset per partition where it started."""
        self.checkpoint_asap = False  # after a failover: commit the first replayed batch at once
        self.on_change: Callable[["Engine", dict], Awaitable[None]] | None = None
        self.loader: Callable[[Path, str], Awaitable[LoadedRelease]] | None = None
        """Loads a release's worker (the app's loader): restarts and probes after a record killed one."""
        self._suspects: set[tuple[str, int, int]] = set()
        """(topic, partition, offset) of the batch a worker last died or hung on."""
        self._poison: dict[TopicPartition, dict[int, str]] = {}
        """Records that kill the model process, by partition and offset: dead letters model_crash."""
        self.shadow = settings.failover.standby_mode == "hot"
        self.agreement = [0, 0]  # [equal, compared] outputs of the hot standby vs the active
        self.eos = bool(settings.checkpoint.exactly_once)
        self.group = settings.kafka.group_id
        self.partitions: dict[TopicPartition, Partition] = {}
        self.policy = CheckpointPolicy(settings.checkpoint.interval_ms, settings.checkpoint.interval_records)
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.paused = False
        self.pause_reason = ""
        self.failure: ReleaseFailure | None = None
        self.closing = False
        self.fatal: BaseException | None = None
        """An error the engine cannot continue after (e.g. a partition could not be opened)."""
        self.assigned_once = asyncio.Event()
        self.restoring: dict[TopicPartition, int] = {}
        self.last_checkpoint: float | None = None
        self.replayed_total = 0
        self.last_replay = 0
        self.failed_at = 0.0
        self.consumer: AIOKafkaConsumer | None = None
        self.restorer: AIOKafkaConsumer | None = None
        self._hw_reader: AIOKafkaConsumer | None = None
        """Offsets only: the changelog's high watermark (read_uncommitted), the restore's target."""
        self.shared_producer: AIOKafkaProducer | None = None
        self._alo_futures: list = []
        self._restore_lock = asyncio.Lock()
        self._reopen_timers: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._inflight: collections.deque[_Batch] = collections.deque()
        """Batches sent to the model and not collected yet (at most two: see the batch section)."""
        self._commit: tuple[asyncio.Future, list[_Commit]] | None = None
        """The checkpoint being committed in the background, if any (see :meth:`_begin_checkpoint`)."""
        self._unwritten: list[_Batch] = []
        """Predicted batches (states stored) whose outputs wait for the commit in flight to end."""
        self._common = settings.kafka.client_kwargs()
        self._out_topic = settings.output.topic
        self._dlq_topic = settings.dead_letter.topic
        self._max_value = settings.dead_letter.max_value_bytes
        self._changelog = settings.state.changelog_topic
        self._ckpt_topic = settings.checkpoint.topic
        self._state_dir = Path(settings.state.directory)
        self._limits = limits.Limits({})
        self._markers_found = 0
        """Undecodable-record markers (daemon/engine/records.py) the batches have met so far."""
        self._consuming = True
        """Whether the consumer's partitions are resumed (the engine's own view; see :meth:`_sync_pause`)."""

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to Kafka; on failure everything started so far is stopped again (retry-safe)."""
        try:
            await self._start()
        except BaseException:
            for client in (self.consumer, self.restorer, self._hw_reader, self.shared_producer):
                if client is not None:
                    try:
                        await asyncio.wait_for(client.stop(), 5)
                    except Exception:  # noqa: BLE001
                        pass
            self.consumer = self.restorer = self._hw_reader = self.shared_producer = None
            raise

    async def _start(self) -> None:
        k = self.s.kafka
        m.init_labels()
        tolerant.install()  # a record the client cannot parse becomes a dead letter, not a crash loop
        self._limits = await limits.read(self._common, [self._out_topic, self._dlq_topic, self._changelog,
                                                        self._ckpt_topic])
        batch_bytes = self._limits.batch_bytes
        # Restore reads to the end of the changelog, whose tail is a transaction marker (no record
        # to return): a short fetch wait keeps that last empty fetch from costing 0.5-1 s.
        self.restorer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                         auto_offset_reset="earliest", fetch_max_wait_ms=10, **self._common)
        await self.restorer.start()
        self._hw_reader = AIOKafkaConsumer(group_id=None, enable_auto_commit=False,
                                           isolation_level="read_uncommitted", **self._common)
        await self._hw_reader.start()
        if not self.eos:
            self.shared_producer = AIOKafkaProducer(enable_idempotence=True, acks="all", linger_ms=10,
                                                    max_batch_size=batch_bytes, **self._common)
            await self.shared_producer.start()
        self.consumer = AIOKafkaConsumer(
            group_id=self.group, group_instance_id=k.group_instance_id, enable_auto_commit=False,
            isolation_level="read_committed", auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_partition_fetch_bytes=1024 * 1024, fetch_max_wait_ms=50, **self._common)
        self.consumer.subscribe(list(self.s.inputs.topics), listener=_Listener(self))
        await self.consumer.start()
        self._out_parts = await self._partitions_of(self._out_topic)
        self._dlq_partitioner = Partitioner(await self._partitions_of(self._dlq_topic))
        self._out_partitioner = Partitioner(self._out_parts)
        self._input_parts = {t: await self._partitions_of(t) for t in self.s.inputs.topics}
        self._publish_release_info()

    async def _partitions_of(self, topic: str) -> int:
        client = self.restorer._client
        await client._wait_on_metadata(topic)
        parts = client.cluster.partitions_for_topic(topic)
        if not parts:
            from daemon.errors import ConfigError

            raise ConfigError(f"topic {topic!r} does not exist on {self._common.get('bootstrap_servers')}; "
                              "create it with `failoverd topics apply`")
        return len(parts)

    def _fixed_out_partition(self, p: Partition) -> int | None:
        """The output partition of all of ``p``'s records when the output topic is as wide as the
        input topic (keys stay where they were); None: Kafka's default key hash, per record."""
        return p.tp.partition if self._input_parts.get(p.tp.topic) == self._out_parts else None

    def _out_partition(self, p: Partition, key: bytes | None) -> int:
        fixed = self._fixed_out_partition(p)
        return fixed if fixed is not None else self._out_partitioner(key)

    def set_releases(self, active: LoadedRelease, standby: LoadedRelease | None) -> None:
        """Install the releases once their workers are up (they load while Kafka connects)."""
        self.active, self.standby = active, standby
        for tp, p in self.partitions.items():
            self.release_since.setdefault(active.digest, {}).setdefault(tp, p.committed)
        self._publish_release_info()

    def _publish_release_info(self) -> None:
        m.RELEASE_INFO.clear()
        for rel in (self.active, self.standby):
            if rel is not None:
                m.RELEASE_INFO.labels(rel.channel, rel.name, rel.version, rel.digest).set(1)
        m.STANDBY_READY.set(1 if self.standby is not None and not getattr(self.standby.worker, "dead", False) else 0)

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Process until :meth:`stop`; then checkpoint (or abort) and close everything."""
        try:
            while not self.stopping.is_set():
                self._sync_pause()
                if self.paused or not self.partitions:
                    wait = 0.2
                elif self._inflight or self._unwritten:
                    wait = 0.001  # the model is busy or outputs wait for a commit: come back soon
                else:
                    wait = self.policy.time_left() if self.policy.records else 0.5
                data = await self.consumer.getmany(timeout_ms=max(1, int(wait * 1000)),
                                                   max_records=self.s.worker.max_batch_records)
                async with self.lock:
                    if self.stopping.is_set():
                        break
                    if self.pending_failure is not None and not self.paused:
                        exc, self.pending_failure = self.pending_failure, None
                        # a worker found dead while a batch was in flight died on that batch
                        failing = self._inflight[0] if self._inflight and isinstance(exc, _PROCESS_DEATHS) else None
                        await self._discard_inflight()
                        await self._release_failed(exc, failing)
                        continue
                    if data and self.paused:
                        self._unfetch(data)  # fetched before the pause took hold: read again on resume
                    elif data:
                        await self._handle(data)
                    elif self._inflight:
                        await self._drain()
                    if self._unwritten and (self._commit is None or self._commit[0].done()):
                        await self._guard(self._write(None))  # the commit ended: write held batches
                    if self.checkpoint_asap and self.policy.records:
                        self.checkpoint_asap = False
                        await self.checkpoint()  # after a failover: committed before anything else
                    elif self.policy.due():
                        await self._close_interval()  # commits while the model computes the next batches
                    if self.pending_change is not None and self.on_change is not None:
                        change, self.pending_change = self.pending_change, None
                        await self._drain()
                        await self.checkpoint()  # a release change takes effect at a checkpoint boundary
                        await self.on_change(self, change)
                    self._update_lag()
                    self._watch_standby()
                    self._watch_active()
                    m.READY.set(1 if self.ready()[0] else 0)
            clean = True
        except BaseException as exc:
            clean = False
            if not isinstance(exc, asyncio.CancelledError):
                log.critical("the loop stopped on an unexpected error; nothing since the last checkpoint "
                             "commits", extra={"error": repr(exc)})
                self.fatal = self.fatal or exc
            raise
        finally:
            await self.close(commit=clean)

    def _sync_pause(self) -> None:
        """The consumer follows :attr:`paused`. While paused, every assigned partition is paused at
        each turn (a rebalance hands partitions over unpaused); on resume every partition is read
        again from the last record handed to the model, so a record fetched and not processed,
        whatever the reason, is never skipped."""
        consumer = self.consumer
        if self.paused:
            assigned = consumer.assignment()
            if assigned:
                consumer.pause(*assigned)
            self._consuming = False
        elif not self._consuming:
            for tp, p in self.partitions.items():
                consumer.seek(tp, p.fetched)
            consumer.resume(*consumer.assignment())
            self._consuming = True

    def _unfetch(self, data: dict) -> None:
        """Put fetched records back: the next fetch of their partitions starts at the first of them
        that was not handed to the model."""
        for tp in data:
            p = self.partitions.get(tp)
            if p is not None:
                self.consumer.seek(tp, p.fetched)

    async def close(self, deadline: float = 20.0, commit: bool = True) -> None:
        """Final checkpoint unless a release failed (then abort), then close clients and workers,
        all within one shared deadline (systemd's TimeoutStopSec is 30 s). ``commit=False`` (the
        loop ended on an error or was cancelled mid-step, maybe between storing a batch's states
        and writing its outputs): abort, never commit what the interval holds."""
        self.closing = True
        end = time.monotonic() + deadline

        def left(cap: float) -> float:
            return max(0.1, min(cap, end - time.monotonic()))

        try:
            await asyncio.wait_for(self.lock.acquire(), left(deadline / 2))
            locked = True
        except asyncio.TimeoutError:
            locked = False  # a step holding the lock is stuck (broker down): close around it
        try:
            try:
                if self._commit is not None:
                    await asyncio.wait_for(self._settle(), left(deadline / 4))
                if locked and commit and self.failure is None and not self.paused and self.fatal is None:
                    await asyncio.wait_for(self._drain(), left(deadline / 4))
                    await asyncio.wait_for(self.checkpoint(), left(deadline / 2))
                else:
                    await asyncio.wait_for(self._discard_inflight(), left(deadline / 4))
            except Exception as exc:  # noqa: BLE001 - shutdown goes on; nothing uncommitted is visible
                log.warning("final checkpoint failed; aborting", extra={"error": repr(exc)})
            if self._commit is not None:  # stuck (broker down): the aborts below end its transactions
                self._commit[0].cancel()
                self._commit = None
            parts, self.partitions = list(self.partitions.values()), {}
            await asyncio.gather(*(self._close_partition(p, left(5)) for p in parts))
        finally:
            if locked:
                self.lock.release()
        await asyncio.gather(*(asyncio.wait_for(c.stop(), left(5)) for c in
                               (self.consumer, self.restorer, self._hw_reader, self.shared_producer)
                               if c is not None),
                             return_exceptions=True)
        for rel in (self.active, self.standby):
            if rel is not None:
                await rel.worker.close(timeout=left(3))
        m.READY.set(0)

    # ---- status -------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.active is None:
            return False, "loading the active release"
        if self.paused:
            return False, f"paused: {self.pause_reason}"
        if self.failure is not None:
            return False, f"release failed: {self.failure}"
        if not self.partitions:
            return False, "no partitions assigned"
        if self.restoring:
            return False, f"restoring state of {len(self.restoring)} partition(s)"
        return True, "ok"

    def status(self) -> dict:
        parts = []
        for tp, p in sorted(self.partitions.items()):
            hw = self.consumer.highwater(tp) if self.consumer else None
            parts.append({"topic": tp.topic, "partition": tp.partition, "committed": p.committed,
                          "position": p.position, "lag": (hw - p.committed) if hw is not None else None,
                          "last_checkpoint": p.last_checkpoint_time or None})
        return {
            "instance": self.instance_id,
            "active": self.active.describe() if self.active else None,
            "standby": self.standby.describe() if self.standby else None,
            "paused": self.paused, "pause_reason": self.pause_reason,
            "partitions": parts, "last_checkpoint": self.last_checkpoint,
            "exactly_once": self.eos, "replayed_total": self.replayed_total,
            "restoring": {f"{tp.topic}:{tp.partition}": left for tp, left in sorted(self.restoring.items())},
        }

    def _watch_active(self) -> None:
        """A model process that died between batches is a failure now, not at the next batch."""
        rel = self.active
        proc = getattr(rel.worker, "_proc", None) if rel is not None else None
        if proc is not None and proc.returncode is not None and self.pending_failure is None and not self.paused:
            rel.worker.dead = True
            self.pending_failure = WorkerCrashed(f"{rel.channel} worker (pid {proc.pid}) exited with code "
                                                 f"{proc.returncode} between batches")

    def _watch_standby(self) -> None:
        """Notice a standby worker that died while idle (so readiness metrics tell the truth)."""
        sb = self.standby
        if sb is not None and not sb.worker.dead:
            proc = getattr(sb.worker, "_proc", None)
            if proc is not None and proc.returncode is not None:
                log.error("standby worker died", extra={"release": sb.ref, "code": proc.returncode})
                sb.worker.dead = True
                m.STANDBY_READY.set(0)

    def _update_lag(self) -> None:
        for tp, p in self.partitions.items():
            hw = self.consumer.highwater(tp)
            if hw is not None:
                m.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, hw - p.committed))

    # ---- partitions: assignment, restore, revocation --------------------------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self.lock:
            await self._settle()
            await self._drain()
            if any(tp in self.partitions for tp in revoked):
                try:
                    await self.checkpoint()
                except Exception as exc:  # noqa: BLE001
                    log.warning("checkpoint before handover failed", extra={"error": repr(exc)})
            m.READY.set(0)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self.lock:
            await self._settle()
            for timer in self._reopen_timers.values():
                timer.cancel()  # the rebalance decides who owns what
            self._reopen_timers.clear()
            for tp in [tp for tp in self.partitions if tp not in assigned]:
                await self._close_partition(self.partitions.pop(tp))
            keep, new = [], []
            for tp in assigned:
                p = self.partitions.get(tp)
                if p is not None:
                    broker = await self.consumer.committed(tp)
                    if broker is not None and broker == p.committed and p.producer is not None:
                        keep.append(p)
                        continue
                    await self._close_partition(self.partitions.pop(tp))
                new.append(tp)
            for p in keep:
                self._rewind(p, count=False)
            results = await asyncio.gather(*(self._open_partition(tp) for tp in sorted(new)), return_exceptions=True)
            opened = [r for r in results if not isinstance(r, BaseException)]
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                for p in opened:
                    await self._close_partition(p)
                raise failed[0]
            if self.paused:
                self.consumer.pause(*assigned)  # a new assignment starts unpaused
            else:
                self.consumer.resume(*assigned)
            for p in opened:
                self.partitions[p.tp] = p
                if self.active is not None:
                    self.release_since.setdefault(self.active.digest, {}).setdefault(p.tp, p.committed)
            log.info("partitions assigned", extra={"assigned": sorted(f"{t.topic}:{t.partition}" for t in assigned),
                                                   "kept": len(keep), "opened": len(new)})
            self.policy.reset()
            self.assigned_once.set()
            m.READY.set(1 if self.ready()[0] else 0)

    async def _new_producer(self, tp: TopicPartition) -> AIOKafkaProducer | None:
        if not self.eos:
            return None
        producer = AIOKafkaProducer(
            transactional_id=transactional_id(self.s.app.name, self.group, tp.topic, tp.partition),
            enable_idempotence=True, acks="all", linger_ms=10, max_batch_size=self._limits.batch_bytes,
            transaction_timeout_ms=60000, retry_backoff_ms=10, **self._common)
        await producer.start()  # InitProducerId: fences every earlier owner, aborts its open transaction
        return producer

    async def _open_partition(self, tp: TopicPartition) -> Partition:
        self.restoring[tp] = -1
        m.init_partition_labels(tp.topic, tp.partition)
        producer = await self._new_producer(tp)
        store = StateStore(store_path(self._state_dir, tp))
        try:
            await self._restore(tp, store)
            committed = await self.consumer.committed(tp)
            if committed is None:
                committed = (await self.consumer.beginning_offsets([tp]))[tp]
            self.consumer.seek(tp, committed)
        except BaseException:
            if producer is not None:
                await producer.stop()
            store.close()
            raise
        finally:
            self.restoring.pop(tp, None)
        return Partition(tp=tp, store=store, producer=producer, committed=committed)

    async def _restore(self, tp: TopicPartition, store: StateStore) -> None:
        """Apply the committed changelog past the store's position (read_committed stops at the
        last committed checkpoint: uncommitted or aborted writes are never applied)."""
        async with self._restore_lock:  # one shared restore consumer: one partition at a time
            await self._restore_locked(tp, store)

    async def _restore_locked(self, tp: TopicPartition, store: StateStore) -> None:
        ctp = TopicPartition(self._changelog, tp.partition)
        start = store.position()
        # Restore up to the high watermark, not to the last stable offset that read_committed's
        # end_offsets gives: another writer of this changelog partition (a partition of another
        # input topic with the same number) may hold a transaction open, and our own committed
        # records behind its start would be cut off. Our producer has fenced the partition's previous
        # owner, so everything below the high watermark is decided or ends with its writer's interval.
        end = (await self._hw_reader.end_offsets([ctp]))[ctp]
        labels = (tp.topic, str(tp.partition))
        if start >= end:
            m.STATE_RESTORE_REMAINING.labels(*labels).set(0)
            return
        self.restorer.assign([ctp])
        self.restorer.seek(ctp, start)
        t0, applied, pos = time.monotonic(), 0, start
        log.info("restoring state", extra={"partition": f"{tp.topic}:{tp.partition}", "from": start, "to": end})
        next_report = t0 + 5.0
        while pos < end:
            batch = await self.restorer.getmany(ctp, timeout_ms=100, max_records=10000)
            recs = batch.get(ctp, [])
            new_pos = await self.restorer.position(ctp)
            if recs or new_pos != pos:
                applied += store.apply_changelog(tp.topic, [(r.key, r.value) for r in recs], min(new_pos, end))
                pos = new_pos
            remaining = max(0, end - pos)
            self.restoring[tp] = remaining
            m.STATE_RESTORE_REMAINING.labels(*labels).set(remaining)
            if time.monotonic() >= next_report:  # a long restore says how far it is
                next_report += 5.0
                log.info("restoring state: progress", extra={
                    "partition": f"{tp.topic}:{tp.partition}", "applied": applied, "remaining": remaining,
                    "percent": round(100 * (pos - start) / max(1, end - start), 1)})
        m.STATE_RESTORED.inc(applied)
        log.info("state restored", extra={"partition": f"{tp.topic}:{tp.partition}", "records": applied,
                                          "seconds": round(time.monotonic() - t0, 3)})

    async def _close_partition(self, p: Partition, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        if p.in_txn and p.producer is not None:
            try:
                await asyncio.wait_for(p.producer.abort_transaction(), max(0.1, end - time.monotonic()))
            except Exception:  # noqa: BLE001 - the broker aborts it at the transaction timeout
                pass
            p.in_txn = False
        if p.producer is not None:
            try:
                await asyncio.wait_for(p.producer.stop(), max(0.1, end - time.monotonic()))
            except Exception:  # noqa: BLE001
                pass
        p.store.close()

    # ---- the batch ----------------------------------------------------------------------------
    # The batch path is pipelined: batch N+1 is prepared and sent to the model while the model
    # still computes N, so the model always has its next batch waiting; then N's answer is
    # collected (new states stored) and its outputs written while the model computes N+1.
    # N+1 was prepared before N's new states were stored: for a key that N also has, N+1 says
    # "carry" (the model worker takes the state N left, in order) instead of a stored state, so
    # per-key state is exact. While a checkpoint commits in the background, collected batches
    # are held (up to MAX_HELD) and written when it ends. A partition's ``position`` (what a
    # checkpoint commits) only covers batches whose outputs were written.

    async def _handle(self, data: dict) -> None:
        await self._guard(self._pipeline(data))

    async def _drain(self) -> None:
        """Finish the batches in flight (outputs written), e.g. before a handover or a release change."""
        if self._inflight or self._unwritten:
            await self._guard(self._drain_unguarded())

    async def _drain_unguarded(self) -> None:
        while self._inflight:
            await self._finish_oldest(wait=True)
        await self._write(None, wait=True)

    async def _finish_oldest(self, wait: bool = False) -> None:
        """Collect the oldest batch in flight and write it (or hold it: see :meth:`_write`)."""
        await self._collect(self._inflight[0])  # if this fails, _guard discards it (still in flight)
        await self._write(self._inflight.popleft(), wait=wait)

    async def _write(self, batch: "_Batch | None", wait: bool = False) -> None:
        """Write ``batch`` (after any held ones), or hold it while a checkpoint commits, so that the
        model is fed the next batches meanwhile. ``wait``: write now, after the commit ends."""
        if (not wait and self._commit is not None and not self._commit[0].done()
                and len(self._unwritten) < self.MAX_HELD):
            if batch is not None:
                self._unwritten.append(batch)
            return
        while self._unwritten:
            await self._emit(self._unwritten.pop(0))
        if batch is not None:
            await self._emit(batch)

    async def _guard(self, coro) -> None:
        try:
            await coro
        except CheckpointFailed:
            pass  # _settle already dropped what was not written and rewound every partition
        except KafkaError as exc:
            # producing failed (broker trouble, or fenced): nothing of the interval commits
            log.warning("producing a batch failed; rewinding to the last checkpoint", extra={"error": repr(exc)})
            await self._discard_inflight()
            await self.rewind_all()
        except ReleaseFailure as exc:
            # a worker that died or hung did so on the oldest batch in flight (it answers in order)
            failing = self._inflight[0] if self._inflight and isinstance(exc, _PROCESS_DEATHS) else None
            await self._discard_inflight()
            await self._release_failed(exc, failing)  # rewinds; the next fetch replays from the checkpoint

    async def _discard_inflight(self) -> None:
        """Drop the batches not written yet; their records are fetched again from what was written.
        Held batches already stored their states: a caller that had any rewinds to the checkpoint."""
        inflight, self._inflight = list(self._inflight), collections.deque()
        held, self._unwritten = self._unwritten, []
        # never leave a reply in the pipe
        await asyncio.gather(*(b.task for b in inflight if b.task is not None), return_exceptions=True)
        for b in [*held, *inflight]:
            for p in b.ends:
                if self.partitions.get(p.tp) is p:
                    p.fetched = p.position
                    self.consumer.seek(p.tp, p.position)

    async def _pipeline(self, data: dict) -> None:
        shadow = self.standby if self.shadow and self.standby is not None and not self.standby.worker.dead else None
        while self._inflight and self._inflight[-1].shadow is not shadow:
            # the hot standby just became ready, was replaced or died: its worker did not see the batch
            # in flight, so nothing may be carried across; store every state first
            await self._finish_oldest()
        previous = self._inflight[-1] if self._inflight else None
        batch = self._prepare(data, previous, shadow)
        if batch is not None:
            if batch.items:
                batch.task = asyncio.get_running_loop().create_task(self._predict(batch))
            self._inflight.append(batch)
        while len(self._inflight) > 1:
            await self._finish_oldest()

    def _prepare(self, data: dict, previous: "_Batch | None" = None,
                 shadow: LoadedRelease | None = None) -> "_Batch | None":
        """Build the model's batch; ``previous``: the batch in flight, whose states are not stored
        yet (keys it has carry its result instead of a stored state); ``shadow``: the hot standby,
        which gets the same batch with its own namespace's states."""
        rel = self.active
        ns = rel.ns
        b = _Batch(rel)
        b.shadow = shadow
        if previous is not None and previous.release is not rel:
            previous = None  # cannot happen (a release change drains first); never carry across models
        markers = tolerant.STATS.markers > self._markers_found  # the client met a record it could not read
        for tp, records in data.items():
            p = self.partitions.get(tp)
            if p is None:
                continue
            poison = self._poison.get(tp) if self._poison else None
            keys: dict[bytes, int] = {}
            n = 0
            first = len(b.refs)
            for r in records:
                if r.offset < p.fetched:
                    continue  # already handed to the model (a seek raced with a prefetched batch)
                n += 1
                if markers and tolerant.is_marker(r):
                    self._markers_found += 1
                    b.direct.append((p, r, "undecodable", r.headers[-1][1].decode("utf-8", "replace")))
                    continue
                if poison is not None and r.offset in poison:
                    b.direct.append((p, r, "model_crash", poison[r.offset]))
                    continue
                value = r.value
                if value is None or len(value) > self._max_value:
                    b.direct.append((p, r, "oversized" if value is not None else "bad_json",
                                     f"{len(value)} bytes > {self._max_value}" if value is not None else "null value"))
                    continue
                key = r.key
                if key is None:
                    sk = NO_STATE
                else:
                    sk = keys.get(key)
                    if sk is None:
                        sk = keys[key] = len(b.skey_owner)
                        b.skey_owner.append((p, key))
                b.items.append((key, value, sk))
                b.refs.append(r)
            if len(b.refs) > first:
                b.spans.append((p, first, len(b.refs)))
            if n:
                m.RECORDS_IN.labels(tp.topic, p.partition_b.decode()).inc(n)
                end = records[-1].offset + 1
                p.fetched = max(p.fetched, end)
                b.ends[p] = (end, n)
            if keys:
                b.keys[p] = keys
                before = previous.keys.get(p) if previous is not None else None
                if before:
                    carried = [(sk, before[k]) for k, sk in keys.items() if k in before]
                    b.carry.extend(carried)
                    lookup = [k for k in keys if k not in before]
                else:
                    lookup = list(keys)
                got = p.store.get_many(ns, lookup) if lookup else {}
                b.states.extend(got.get(k) for k in keys)  # dict order = skey order; carried: None here
                if shadow is not None:
                    got = p.store.get_many(shadow.ns, lookup) if lookup else {}
                    b.states_s.extend(got.get(k) for k in keys)
        if not b.ends:
            return None
        return b

    def _max_output(self, rel: LoadedRelease) -> int:
        """Key + encoded output bytes that surely fit the output topic beside ``rel``'s provenance
        headers (the worker dead-letters a larger output before its state counts: output_oversized)."""
        headers = rel.headers + [(H.H_SOURCE_TOPIC, b"t" * 249), (H.H_SOURCE_PARTITION, b"9" * 10),
                                 (H.H_SOURCE_OFFSET, b"9" * 20)]
        return max(1, self._limits.of(self._out_topic) - limits.record_bytes(None, b"", headers) - 10)

    async def _predict(self, b: "_Batch"):
        if b.shadow is None:
            return await b.release.worker.process(b.items, b.states, b.carry, self._max_output(b.release))
        return await self._predict_with_shadow(b)

    async def _collect(self, b: "_Batch") -> None:
        """Wait for the model's answer and store the batch's new states."""
        if b.items:
            b.results, new_states, b.predict_s = await b.task
            m.PREDICT_SECONDS.labels(b.release.channel).observe(b.predict_s)
            owner = b.skey_owner
            self._check_state_sizes(b.release, new_states, owner)
            stores = [(b.release.ns, new_states)]
            if b.shadow is not None and b.new_states_s is not None and b.shadow.ns != b.release.ns:
                # the hot standby's own namespace; one that declares the active's (same name and
                # state_schema_version) reads the active's states and never writes them
                stores.append((b.shadow.ns, b.new_states_s))
            for ns, states in stores:
                for sk, st in states.items():
                    p, key = owner[sk]
                    p.store.put(ns, key, st)

    def _check_state_sizes(self, rel: LoadedRelease, states: dict, owner: list) -> None:
        """A state larger than the changelog accepts would fail every checkpoint of its partition:
        the release is at fault (``state_oversized``), before anything of the batch is stored."""
        limit = self._limits.of(self._changelog)
        room = limit - 2048  # changelog key and header: the exact size is computed only above this
        for sk, st in states.items():
            if st is not None and len(st) > room:
                p, key = owner[sk]
                size = limits.record_bytes(changelog_key(p.tp.topic, rel.ns, key), st, [(H.H_CHECKPOINT, b"9" * 20)])
                if size > limit:
                    raise ReleaseFailure(f"{rel.channel} release {rel.ref} returned a state of {len(st)} bytes for a key "
                                         f"of {p.tp.topic}:{p.tp.partition}; the changelog {self._changelog} accepts "
                                         f"{limit} bytes per record", reason="state_oversized")

    async def _emit(self, b: "_Batch") -> None:
        """Write the batch's outputs and dead letters; only then does its input count as processed."""
        if self._commit is not None and not await self._settle():
            raise CheckpointFailed("the checkpoint committed in the background failed")
        t0 = time.monotonic()
        rel_headers = b.release.headers
        results, refs, direct = b.results, b.refs, b.direct
        out = self._out_topic
        sink = BatchSink()
        add = sink.add
        counts_out: dict[Partition, int] = {}
        reasons: dict[tuple[Partition, str], int] = {}
        live = {p for p in b.ends if self.partitions.get(p.tp) is p}  # a partition may have been dropped
        producers = {id(p): await self._producer(p) for p in live}
        H_OFFSET = H.H_SOURCE_OFFSET
        out_limit = self._limits.of(out)
        for p, lo, hi in b.spans:  # one partition's records at a time: per-record work is one append
            producer = producers.get(id(p))
            if producer is None:
                continue
            prefix = rel_headers + [(H.H_SOURCE_TOPIC, p.topic_b), (H.H_SOURCE_PARTITION, p.partition_b)]
            # key + value bytes that surely fit (the exact size is computed only above this)
            room = out_limit - limits.record_bytes(None, b"", prefix + [(H_OFFSET, b"9" * 20)]) - 10
            fixed = self._fixed_out_partition(p)
            partition_of = self._out_partitioner
            ok = 0
            for i in range(lo, hi):
                r, res = refs[i], results[i]
                hdrs = prefix + [(H_OFFSET, str(r.offset).encode())]
                if res[0] == OK:
                    key, value = r.key, res[1]
                    if (len(value) + (len(key) if key is not None else 0) > room
                            and limits.record_bytes(key, value, hdrs) > out_limit):
                        # refused whole by the broker, and again on every replay: a dead letter instead
                        self._add_dlq(sink, producer, r, "output_oversized",
                                      f"output of {len(value)} bytes (record with key and headers: "
                                      f"{limits.record_bytes(key, value, hdrs)} bytes) exceeds the {out_limit} bytes "
                                      f"{out} accepts (max.message.bytes, capped by the producer's max_request_size)",
                                      hdrs)
                        reasons[(p, "output_oversized")] = reasons.get((p, "output_oversized"), 0) + 1
                        continue
                    add(producer, out, fixed if fixed is not None else partition_of(key), key, value, hdrs)
                    ok += 1
                else:
                    self._add_dlq(sink, producer, r, res[1], res[2], hdrs)
                    reasons[(p, res[1])] = reasons.get((p, res[1]), 0) + 1
            if ok:
                counts_out[p] = counts_out.get(p, 0) + ok
        for p, r, reason, detail in direct:
            if id(p) not in producers:
                continue
            self._add_dlq(sink, producers[id(p)], r, reason, detail,
                          rel_headers + H.source_headers(p.topic_b, p.partition_b, r.offset))
            reasons[(p, reason)] = reasons.get((p, reason), 0) + 1
        futures = await sink.flush()
        if self.eos:
            for p in live:  # every write is acknowledged before its checkpoint commits (_commit_eos)
                p.acks.extend(sink.futures_of(producers[id(p)]))
        else:
            self._alo_futures.extend(futures)
        for p, (end, n) in b.ends.items():
            if p not in live:
                continue
            p.position = max(p.position, end)
            p.highest = max(p.highest, p.position)
            p.uncommitted += n
            self.policy.add(n)  # written, so due for a checkpoint
        for p, n in counts_out.items():
            m.RECORDS_OUT.labels(p.tp.topic, p.partition_b.decode()).inc(n)
        for (p, reason), n in reasons.items():
            m.RECORDS_DEAD_LETTERED.labels(p.tp.topic, p.partition_b.decode(), reason).inc(n)
        m.BATCH_SECONDS.observe(time.monotonic() - t0 + b.predict_s)
        if self.observers:
            summary = {"records": len(refs) + len(direct), "predict_seconds": b.predict_s,
                       "results": results, "release": b.release}
            for observe in self.observers:
                observe(self, summary)
        if self.pending_failure is not None:
            exc, self.pending_failure = self.pending_failure, None
            raise exc  # a rate signal fired: this batch's outputs are aborted with the interval

    async def _predict_with_shadow(self, b: "_Batch"):
        """Hot standby: run the standby on the same batch (its own state namespace, the same carried
        keys), compare outputs, keep its state current (stored with the active's at collect); only
        the active's outputs are written. Returns the active's (results, new states, own latency):
        a slow standby must not count against the active."""
        sb = b.shadow
        active_res, standby_res = await asyncio.gather(
            b.release.worker.process(b.items, b.states, b.carry, self._max_output(b.release)),
            sb.worker.process(b.items, b.states_s, b.carry, self._max_output(sb)), return_exceptions=True)
        if isinstance(active_res, BaseException):
            raise active_res
        if isinstance(standby_res, BaseException):
            log.warning("hot standby failed in shadow; it is no longer ready", extra={"error": str(standby_res)})
            sb.worker.dead = True
            m.STANDBY_READY.set(0)
            return active_res
        equal = compared = 0
        for ra, rb in zip(active_res[0], standby_res[0]):
            if ra[0] == OK and rb[0] == OK:
                compared += 1
                equal += _same_output(ra[1], rb[1])
        self.agreement[0] += equal
        self.agreement[1] += compared
        if self.agreement[1]:
            m.STANDBY_AGREEMENT.set(self.agreement[0] / self.agreement[1])
        b.new_states_s = standby_res[1]
        return active_res

    def _add_dlq(self, sink: BatchSink, producer, r, reason: str, detail: str, provenance) -> None:
        """A dead letter carrying the input's key, value and headers, cut to what the dead-letter
        topic accepts: the value first (to ``dead_letter.max_value_bytes``, then to fit), then the
        input's own headers, then the key; the original size is in ``fd.dlq.original_size``."""
        original = r.headers
        if original and original[-1][0] == tolerant.MARK:
            original = original[:-1]  # an undecodable record's marker: its text is the detail
        value, size = r.value, len(r.value) if r.value is not None else 0
        limit = self._limits.of(self._dlq_topic)
        full = min(size, self._max_value)
        # the whole (allowed) value with as much of the input's headers and key as fits; else the
        # value cut to fit beside them
        options = ((original, r.key, detail), ((), r.key, f"{detail} (the input's headers did not fit)"),
                   ((), None, f"{detail} (the input's headers and key did not fit)"))
        for keep_value in (True, False):
            for hs, key, text in options:
                keep = full
                hdrs = H.dead_letter_headers(hs, reason, text, provenance, keep < size, size)
                over = limits.record_bytes(key, value[:keep] if value is not None else None, hdrs) - limit
                if over > 0 and not keep_value:
                    keep = max(0, keep - over)
                    hdrs = H.dead_letter_headers(hs, reason, text, provenance, True, size)
                    over = limits.record_bytes(key, value[:keep] if value is not None else None, hdrs) - limit
                if over <= 0:
                    break
            else:
                continue
            break
        if keep < size:
            value = value[:keep]
            m.DEAD_LETTERS_TRUNCATED.inc()
        sink.add(producer, self._dlq_topic, self._dlq_partitioner(r.key), key, value, hdrs)

    async def _producer(self, p: Partition) -> AIOKafkaProducer:
        if not self.eos:
            return self.shared_producer
        if not p.in_txn:
            await p.producer.begin_transaction()
            p.in_txn = True
        return p.producer

    # ---- checkpoints ----------------------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Commit everything processed so far and wait for the outcome."""
        if await self._close_interval():
            await self._settle()

    async def _close_interval(self) -> bool:
        """Write held batches, wait for the previous commit, start committing this interval
        (a checkpoint covers exactly the batches whose outputs and states it carries)."""
        if self._unwritten:
            await self._guard(self._write(None, wait=True))
        if not await self._settle() or self._unwritten:
            return False
        return self._begin_checkpoint()

    def _begin_checkpoint(self) -> bool:
        """Close the interval and start committing it in the background; False if there is nothing
        to commit. Until :meth:`_settle` the loop goes on fetching, predicting and storing state
        (into the next interval); writing outputs waits for the commit (a partition's producer
        cannot start its next transaction before this one ends)."""
        parts = [p for p in self.partitions.values() if p.uncommitted or p.in_txn or p.store.dirty]
        self.policy.reset()
        if not parts:
            return False
        snaps = [_Commit(p, p.position, p.uncommitted, p.store.begin_commit(), p.acks) for p in parts]
        for p in parts:
            p.acks = []
        t0 = time.monotonic()
        futures, self._alo_futures = self._alo_futures, []  # at-least-once: every output written so far

        async def commit() -> tuple[list, float]:
            if self.eos:
                results = await asyncio.gather(*(self._commit_eos(c) for c in snaps), return_exceptions=True)
            else:
                results = await self._commit_alo(snaps, futures)
            return results, time.monotonic() - t0

        self._commit = (asyncio.ensure_future(commit()), snaps)
        return True

    async def _settle(self) -> bool:
        """Wait for the checkpoint in flight and act on its outcome. False if a partition's commit
        failed: then the batches in flight or held are dropped, a fenced partition is dropped, and
        every partition rewinds to its last checkpoint."""
        if self._commit is None:
            return True
        entry = self._commit
        task, snaps = entry
        results, seconds = await asyncio.shield(task)
        if self._commit is not entry:
            return True  # another caller (shutdown) acted on it meanwhile
        self._commit = None
        now = time.time()
        failed = [(c.p, r) for c, r in zip(snaps, results) if isinstance(r, BaseException)]
        for c, r in zip(snaps, results):
            if not isinstance(r, BaseException):
                c.p.last_checkpoint_time = now
        if failed:
            # nothing written after the checkpoint may commit: drop what is in flight or held
            # (held batches stored states of the next interval) and rewind every partition
            await self._discard_inflight()
            for p, exc in failed:
                if isinstance(exc, asyncio.CancelledError):
                    raise exc
                await self._commit_failed(p, exc)
            await self.rewind_all()
            if any(isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError)) for _, exc in failed):
                # a topic's max.message.bytes went down since start: what no longer fits becomes a
                # dead letter from the replay on (output_oversized), instead of failing again
                self._limits = await limits.read(self._common, list(self._limits.max_bytes))
                log.warning("a write was refused as too large; topic limits re-read",
                            extra={"limits": self._limits.max_bytes})
            return False
        self.last_checkpoint = now
        m.CHECKPOINTS.inc()
        m.LAST_CHECKPOINT_TIMESTAMP.set(now)
        m.CHECKPOINT_SECONDS.observe(seconds)
        for hook in self.after_checkpoint:
            hook(self)
        return True

    async def _send_changelog(self, producer, p: Partition, changes: dict, position: int) -> BatchSink | None:
        """Submit an interval's state changes (one changelog record per changed key) without waiting
        for their acknowledgement; the returned sink tells the position once they are acked."""
        if not changes:
            return None
        hdr = [(H.H_CHECKPOINT, str(position).encode())]
        topic, part, tname = self._changelog, p.tp.partition, p.tp.topic
        sink = BatchSink()
        for (ns, key), v in changes.items():
            sink.add(producer, topic, part, changelog_key(tname, ns, key), v, hdr)
        await sink.flush()
        return sink

    async def _changelog_position(self, sink: BatchSink | None, p: Partition) -> int | None:
        """The changelog offset after an interval's records (once they are acknowledged)."""
        if sink is None:
            return None
        fut, n = sink.last[(self._changelog, p.tp.partition)]
        return (await fut).offset + n

    async def _commit_eos(self, c: "_Commit") -> None:
        # Everything is queued before anything is awaited, so the changelog and checkpoint
        # partitions join the transaction in one request and the commit waits for one round of
        # produce acknowledgements (the changelog position is read after the commit).
        p = c.p
        producer = await self._producer(p)
        sink = await self._send_changelog(producer, p, c.changes, c.position)
        written = await producer.send(self._ckpt_topic, record_value(
            group=self.group, topic=p.tp.topic, partition=p.tp.partition, offset=c.position,
            changelog_records=len(c.changes), release=self.active.info, instance=self.instance_id,
            records=c.records), key=record_key(self.group, p.tp.topic, p.tp.partition))
        await producer.send_offsets_to_transaction({p.tp: c.position}, self.group)
        # Every write of the interval (outputs, dead letters, changelog, checkpoint record) is
        # acknowledged before the transaction commits: Kafka would commit a transaction one of
        # whose batches was refused, and the interval's inputs would be neither output nor dead letter.
        try:
            await asyncio.gather(*c.acks, written, *(sink.futures_of(producer) if sink is not None else ()))
        except Exception:
            m.WRITES_REFUSED.inc()
            raise  # the checkpoint fails: _settle aborts and rewinds every partition
        await producer.commit_transaction()
        p.in_txn = False
        p.committed = c.position
        p.uncommitted -= c.records
        self._store_committed(p, await self._changelog_position(sink, p))

    def _store_committed(self, p: Partition, changelog_position: int | None) -> None:
        """Keep the committed interval's state locally. If the local store cannot (disk trouble),
        stop: after a restart, restore brings the store up to the committed changelog."""
        try:
            p.store.commit(changelog_position)
        except Exception as exc:  # noqa: BLE001
            log.critical("local state store failed after a committed checkpoint; stopping",
                         extra={"partition": f"{p.tp.topic}:{p.tp.partition}", "error": repr(exc)})
            self.fatal = exc
            self.stop()

    async def _commit_alo(self, snaps: list["_Commit"], futures: list) -> list:
        producer = self.shared_producer
        try:
            sinks = [await self._send_changelog(producer, c.p, c.changes, c.position) for c in snaps]
            positions = [await self._changelog_position(sink, c.p) for sink, c in zip(sinks, snaps)]
            await asyncio.gather(*futures)  # every output and dead letter acknowledged ...
            await self.consumer.commit({c.p.tp: c.position for c in snaps})  # ... before the offsets move
        except Exception as exc:  # noqa: BLE001
            return [exc] * len(snaps)
        for c, pos in zip(snaps, positions):
            c.p.committed = c.position
            c.p.uncommitted -= c.records
            self._store_committed(c.p, pos)
        return [None] * len(snaps)

    async def _commit_failed(self, p: Partition, exc: BaseException) -> None:
        if isinstance(exc, ProducerFenced):
            await self._drop_fenced(p, "fenced at commit")
            return
        log.warning("checkpoint failed; rewinding to the last checkpoint",
                    extra={"partition": f"{p.tp.topic}:{p.tp.partition}", "error": repr(exc)})
        m.CHECKPOINT_ABORTS.labels("error").inc()  # the caller aborts and rewinds (rewind_all)

    async def _drop_fenced(self, p: Partition, why: str) -> None:
        """Another producer holds this partition's transactional id (a newer owner, or the broker
        timed our transaction out). Stop processing it; nothing of ours commits. If the group still
        says it is ours after a session timeout (no rebalance moved it), start over from the
        broker's committed offset; a rebalance in the meantime decides instead."""
        log.error("fenced or unable to abort: dropping the partition until it is ours again",
                  extra={"partition": f"{p.tp.topic}:{p.tp.partition}", "why": why})
        m.CHECKPOINT_ABORTS.labels("fenced").inc()
        if p.tp in self.consumer.assignment():
            self.consumer.pause(p.tp)
        p.in_txn = False
        p.acks = []
        p.store.discard_pending()
        self.partitions.pop(p.tp, None)
        try:
            await p.producer.stop()
        except Exception:  # noqa: BLE001
            pass
        p.store.close()
        if p.tp in self.consumer.assignment():
            delay = self.s.kafka.session_timeout_ms / 1000 + 2
            loop = asyncio.get_running_loop()
            self._reopen_timers[p.tp] = loop.call_later(delay, lambda tp=p.tp: loop.create_task(self._reopen(tp)))

    async def _reopen(self, tp: TopicPartition) -> None:
        async with self.lock:
            self._reopen_timers.pop(tp, None)
            if self.stopping.is_set() or tp in self.partitions or tp not in self.consumer.assignment():
                return
            try:
                self.partitions[tp] = await self._open_partition(tp)
            except Exception as err:  # noqa: BLE001 - the next rebalance assigns it again
                log.error("could not re-open a fenced partition", extra={"error": repr(err)})
                return
            if not self.paused:
                self.consumer.resume(tp)
            log.warning("partition still ours after a session timeout: re-opened from the committed offset",
                        extra={"partition": f"{tp.topic}:{tp.partition}"})

    async def _abort(self, p: Partition) -> None:
        if not p.in_txn or p.producer is None:
            return
        try:
            await asyncio.wait_for(p.producer.abort_transaction(), 10)
            p.in_txn = False
        except Exception as exc:  # noqa: BLE001 - a producer that cannot abort is fenced or broken
            await self._drop_fenced(p, f"abort failed: {exc!r}")

    def _rewind(self, p: Partition, count: bool = True) -> int:
        """Forget everything since the last checkpoint and seek back to it."""
        if self.partitions.get(p.tp) is not p:
            # dropped meanwhile (fenced or abort failed): it is re-read from its checkpoint when re-opened
            replay = max(0, p.highest - p.committed) if count else 0
            self.replayed_total += replay
            return replay
        p.store.discard_pending()
        p.acks = []  # their transaction is aborted
        replay = max(0, p.highest - p.committed) if count else 0
        p.position = p.committed
        p.fetched = p.committed
        p.uncommitted = 0
        self.consumer.seek(p.tp, p.committed)
        if replay:
            self.replayed_total += replay
            m.RECORDS_REPLAYED.inc(replay)
        return replay

    async def rewind_all(self) -> int:
        """Abort every open transaction and seek every partition to its last checkpoint."""
        await self._settle()
        parts = list(self.partitions.values())
        await asyncio.gather(*(self._abort(p) for p in parts))  # one EndTxn round trip, not one per partition
        replay = sum(self._rewind(p) for p in parts)
        self.policy.reset()
        return replay

    def mark_activated(self, release: LoadedRelease) -> None:
        """Record where ``release`` starts handling each partition (for --rescore windows)."""
        self.release_since[release.digest] = {tp: p.committed for tp, p in self.partitions.items()}

    async def rescore(self, since: dict[TopicPartition, int], label: str) -> int:
        """Re-run committed inputs from ``since`` up to the last checkpoint through the active release and
        write the results as corrections (header ``fd.correction``), in the partitions' open transactions.
        State is read, never written: corrections do not count twice into per-key state."""
        await self._settle()
        rel = self.active
        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                    auto_offset_reset="earliest", **self._common)
        await consumer.start()
        written = 0
        try:
            for tp, start in sorted(since.items()):
                p = self.partitions.get(tp)
                if p is None or start >= p.committed:
                    continue
                consumer.assign([tp])
                consumer.seek(tp, start)
                end = p.committed
                pos = start
                while pos < end:
                    batch = (await consumer.getmany(tp, timeout_ms=1000, max_records=self.s.worker.max_batch_records)
                             ).get(tp, [])
                    recs = [r for r in batch if r.offset < end and r.value is not None
                            and len(r.value) <= self._max_value]
                    pos = await consumer.position(tp)
                    if not recs:
                        continue
                    keys = list(dict.fromkeys(r.key for r in recs if r.key is not None))
                    got = p.store.get_many(rel.ns, keys)
                    index = {k: i for i, k in enumerate(keys)}
                    items = [(r.key, r.value, index[r.key] if r.key is not None else NO_STATE) for r in recs]
                    results, _, _ = await rel.worker.process(items, [got[k] for k in keys])
                    producer = await self._producer(p)
                    mark = [(H.H_CORRECTION, label.encode())]
                    sink = BatchSink()
                    for r, res in zip(recs, results):
                        if res[0] == OK:
                            sink.add(producer, self._out_topic, self._out_partition(p, r.key), r.key, res[1],
                                     rel.headers + H.source_headers(p.topic_b, p.partition_b, r.offset) + mark)
                            written += 1
                    futures = await sink.flush()
                    if self.eos:
                        p.acks.extend(futures)
                    else:
                        self._alo_futures.extend(futures)
        finally:
            await consumer.stop()
        log.warning("rescored", extra={"release": rel.ref, "corrections": written, "label": label})
        return written

    # ---- failures -------------------------------------------------------------------------------
    # A record can kill the model process of every release (a native crash, os._exit, a hang):
    # failing over would only hand it to the standby, which dies on it too. So the records of
    # the batch a worker died or hung on are remembered as suspects; when a worker dies again on
    # a batch holding some of them (the standby, replaying), or at once when there is no standby
    # to fail over to, a throwaway worker of the active release runs the suspects one at a time.
    # The record it dies or hangs on is dead-lettered (model_crash) and a fresh worker of the
    # active release goes on, without a failover. If none kills it, the release is at fault and
    # the failure handler acts as usual.

    async def _crash_by_record(self, exc: ReleaseFailure, batch: "_Batch") -> bool:
        ids = {(r.topic, r.partition, r.offset) for r in batch.refs}
        # nothing to fail over to (cold mode loads its standby at failover time)
        no_standby = self.s.failover.standby_mode != "cold" and (self.standby is None or self.standby.worker.dead)
        suspects = ids & self._suspects if self._suspects else set()
        self._suspects = ids
        if self.loader is None or not (suspects or no_standby):
            return False
        suspects = suspects or ids
        found = await self._probe(batch, suspects)
        if found is None:
            return False
        r, why = found
        # a release that dies on any record would die on this one too: it is the record only if a
        # fresh worker gets through the other suspects
        others = suspects - {(r.topic, r.partition, r.offset)}
        if others and await self._probe(batch, others) is not None:
            return False
        tp = TopicPartition(r.topic, r.partition)
        self._poison.setdefault(tp, {})[r.offset] = (f"the model process of {self.active.ref} {why} on this record "
                                                     f"alone (after: {exc})")[:900]
        log.error("one record kills the model process: dead-lettering it instead of failing over",
                  extra={"partition": f"{r.topic}:{r.partition}", "offset": r.offset, "release": self.active.ref,
                         "why": why})
        old = self.active
        try:
            fresh = await self.loader(old.bundle_path, "active")
        except Exception as err:  # noqa: BLE001 - then the failure handler decides, as for any failure
            log.error("could not restart the active release's worker", extra={"error": repr(err)})
            return False
        self.active = fresh
        old.worker.kill()
        await old.worker.close(timeout=1.0)
        self._publish_release_info()
        return True

    async def _probe(self, batch: "_Batch", suspects: set) -> "tuple[object, str] | None":
        """Run ``suspects`` of ``batch`` one at a time through a throwaway worker of the active
        release; the first record its process dies or hangs on, with what happened."""
        try:
            probe = await self.loader(self.active.bundle_path, "probe")
        except Exception as err:  # noqa: BLE001
            log.error("could not start a worker to find the record at fault", extra={"error": repr(err)})
            return None
        try:
            for i, r in enumerate(batch.refs):
                if (r.topic, r.partition, r.offset) not in suspects:
                    continue
                key, value, skey = batch.items[i]
                single = [(key, value, 0 if skey != NO_STATE else NO_STATE)]
                states = [batch.states[skey]] if skey != NO_STATE else []
                try:
                    await probe.worker.process(single, states, ())
                except WorkerCrashed:
                    return r, "died"
                except WorkerTimeout:
                    return r, "hung"
                except WorkerOutOfMemory:
                    return r, "ran out of memory"
                except ReleaseFailure:
                    continue  # failed otherwise on it: not what killed the worker
            return None
        finally:
            probe.worker.kill()
            await probe.worker.close(timeout=1.0)

    async def _release_failed(self, exc: ReleaseFailure, failing: "_Batch | None" = None) -> bool:
        """Abort the open interval; let the failure handler decide. True = process again.
        ``failing``: the batch a worker died or hung on, if known (see :meth:`_crash_by_record`)."""
        self.failed_at = time.monotonic()  # a failover's duration counts from here
        m.MODEL_ERRORS.labels(self.active.channel, exc.reason).inc()
        log.error("release failed", extra={"release": self.active.ref, "reason": exc.reason, "error": str(exc)})
        self.last_replay = await self.rewind_all()
        if failing is not None and await self._crash_by_record(exc, failing):
            return False  # one record was to blame: it is a dead letter now, the release goes on
        if self.on_failure is not None and await self.on_failure(self, exc):
            return False  # the handler switched or paused; the next fetch replays from the checkpoint
        self.failure = exc
        self.stopping.set()
        return False


_IGNORED_IN_AGREEMENT = ("model_version",)


def _same_output(a: bytes, b: bytes) -> int:
    """1 when two outputs agree, ignoring fields that only name the model version."""
    if a == b:
        return 1
    da, db = orjson.loads(a), orjson.loads(b)
    if isinstance(da, dict) and isinstance(db, dict):
        for k in _IGNORED_IN_AGREEMENT:
            da.pop(k, None)
            db.pop(k, None)
    return 1 if da == db else 0


class _Commit:
    """What one partition's checkpoint commits, taken when the interval closed."""

    __slots__ = ("p", "position", "records", "changes", "acks")

    def __init__(self, p: Partition, position: int, records: int, changes: dict, acks: list) -> None:
        self.p, self.position, self.records, self.changes, self.acks = p, position, records, changes, acks


class _Batch:
    """One fetched batch on its way through the model."""

    __slots__ = ("release", "items", "refs", "spans", "direct", "skey_owner", "states", "ends", "task",
                 "results", "predict_s", "keys", "carry", "shadow", "states_s", "new_states_s")

    def __init__(self, release: LoadedRelease) -> None:
        self.release = release
        self.items: list[tuple] = []
        self.refs: list = []
        """The consumer record of each item (same order)."""
        self.spans: list[tuple[Partition, int, int]] = []
        """(partition, first, end) index ranges of ``items``/``refs``: one per partition, contiguous."""
        self.direct: list[tuple[Partition, object, str, str]] = []
        self.skey_owner: list[tuple[Partition, bytes]] = []
        self.states: list[bytes | None] = []
        self.ends: dict[Partition, tuple[int, int]] = {}
        self.task: asyncio.Task | None = None
        self.results: list[tuple] = []
        self.predict_s = 0.0
        self.keys: dict[Partition, dict[bytes, int]] = {}
        """Per partition: state key -> skey (what the next batch may carry from)."""
        self.carry: list[tuple[int, int]] = []
        """(skey, skey in the previous batch): states the model worker takes from the previous batch."""
        self.shadow: LoadedRelease | None = None
        """The hot standby this batch was also sent to (its states: ``states_s``, ``new_states_s``)."""
        self.states_s: list[bytes | None] = []
        self.new_states_s: dict[int, bytes | None] | None = None
