"""Committing a checkpoint: one transaction per input partition, and its outcome as a value.

:meth:`Checkpointer.begin` closes the interval (each partition's position, record count, the
store's pending writes and the delivery futures of its writes are fixed) and starts committing it
in the background; the engine goes on predicting meanwhile. :meth:`Checkpointer.settle` waits for
it and returns an :class:`Outcome`; the checkpointer knows nothing of the loop that owns it.

The contract of one partition's exactly-once commit (:meth:`Checkpointer._commit_eos`):

1. queue the interval's state changes on the changelog (one record per changed key, with the
   checkpoint's input offset in a header) and the checkpoint record, before awaiting anything,
   so both join the transaction in one request;
2. add the consumer offset to the transaction (``send_offsets_to_transaction``);
3. wait until *every* write of the interval (outputs, dead letters, changelog, checkpoint record)
   is acknowledged, and fail if one was refused: Kafka would commit a transaction one of whose
   batches was refused, and the interval's inputs would be neither output nor dead letter.
   Steps 1-3 end within ``kafka.request_timeout_ms`` or the checkpoint fails (:class:`WriteTimeout`);
4. commit the transaction (commit = checkpoint; never cut short: its outcome is the broker's);
5. keep the committed interval in the local store, with the changelog offset it reached.

At-least-once (:meth:`Checkpointer._commit_alo`): changelog first, every output and dead letter
acknowledged, then the consumer offsets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Literal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, ProducerFenced, RecordListTooLargeError

from daemon import metrics as m
from daemon.engine import headers as H
from daemon.engine.assignment import Assignment
from daemon.engine.checkpoint import record_key, record_value
from daemon.engine.connections import EngineClients
from daemon.engine.partition import Partition
from daemon.engine.sink import BatchSink
from daemon.engine.state import changelog_key

log = logging.getLogger("failoverd.engine")

Status = Literal["committed", "failed", "fenced"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a checkpoint ended.

    ``committed``: every partition committed. ``fenced``: every partition that failed was fenced
    (another owner holds its transactional id: drop it). ``failed``: at least one failed for
    another cause (``failures`` holds each failed partition with its error, fenced ones included).
    On ``failed`` or ``fenced`` nothing written after the checkpoint began may commit: the caller
    drops what is in flight and rewinds every partition."""

    status: Status
    failures: tuple[tuple[Partition, BaseException], ...] = ()
    seconds: float = 0.0
    time: float = 0.0
    store_errors: tuple[tuple[Partition, BaseException], ...] = ()
    """Partitions whose checkpoint committed but whose local store could not keep it (disk
    trouble): the engine must stop; after a restart, restore brings the store up to the changelog."""

    @property
    def ok(self) -> bool:
        return self.status == "committed"

    @property
    def fenced(self) -> list[Partition]:
        return [p for p, exc in self.failures if isinstance(exc, ProducerFenced)]

    @property
    def too_large(self) -> bool:
        """A write was refused as too large (a topic's max.message.bytes went down since start)."""
        return any(isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError)) for _, exc in self.failures)


class WriteTimeout(KafkaTimeoutError):  # type: ignore[misc]  # aiokafka is untyped
    """Writes of an interval not acknowledged in time: its checkpoint fails, the interval replays."""


async def acknowledged(futures: list[asyncio.Future[Any]], timeout: float | None = None) -> None:
    """Wait until every write of ``futures`` is acknowledged; raise the first refusal, or
    :class:`WriteTimeout` when some are still unanswered after ``timeout`` seconds. Unlike gather,
    a timeout or a cancellation leaves the futures alone: the producer resolves them."""
    if not futures:
        return
    _, pending = await asyncio.wait(futures, timeout=timeout)
    if pending:
        raise WriteTimeout(f"{len(pending)} of {len(futures)} writes not acknowledged within {timeout:.0f}s "
                           "(kafka.request_timeout_ms): the broker keeps refusing them or does not answer")
    for fut in futures:
        fut.result()  # the first refusal, as gather would raise it


class _Commit:
    """What one partition's checkpoint commits, taken when the interval closed."""

    __slots__ = ("p", "position", "records", "changes", "acks")

    def __init__(self, p: Partition, position: int, records: int, changes: dict[tuple[str, bytes], bytes | None],
                 acks: list[asyncio.Future[Any]]) -> None:
        self.p, self.position, self.records, self.changes, self.acks = p, position, records, changes, acks


_Results = tuple[list[BaseException | None], list[tuple[Partition, BaseException]], float]


class Checkpointer:
    def __init__(self, clients: EngineClients, assignment: Assignment, *, eos: bool, group: str, changelog: str,
                 checkpoint_topic: str, instance_id: str, write_timeout: float = 40.0) -> None:
        self.clients = clients
        self.write_timeout = write_timeout
        """Seconds the interval's writes may take to be acknowledged (kafka.request_timeout_ms): an
        idempotent producer retries a retriable refusal (NOT_ENOUGH_REPLICAS, say) for ever."""
        self.assignment = assignment
        self.eos = eos
        self.group = group
        self.changelog = changelog
        self.checkpoint_topic = checkpoint_topic
        self.instance_id = instance_id
        self._inflight: tuple[asyncio.Future[_Results], list[_Commit]] | None = None
        self._alo_futures: list[asyncio.Future[Any]] = []
        """At-least-once: delivery futures of every output written since the last checkpoint began."""

    @property
    def in_flight(self) -> bool:
        """A checkpoint was begun and its outcome not taken yet."""
        return self._inflight is not None

    @property
    def busy(self) -> bool:
        """A checkpoint is still committing (a partition's producer cannot begin its next transaction)."""
        return self._inflight is not None and not self._inflight[0].done()

    def written(self, futures: list[asyncio.Future[Any]]) -> None:
        """At-least-once: ``futures`` must be acknowledged before the next checkpoint's offsets move."""
        self._alo_futures.extend(futures)

    def begin(self, parts: list[Partition], release_info: dict[str, Any]) -> bool:
        """Close the interval of ``parts`` and start committing it in the background; False if there
        is nothing to commit. Until :meth:`settle` the caller goes on fetching, predicting and
        storing state (into the next interval); writing outputs waits for the commit."""
        parts = [p for p in parts if p.uncommitted or p.in_txn or p.store.dirty]
        if not parts:
            return False
        snaps = [_Commit(p, p.position, p.uncommitted, p.store.begin_commit(), p.acks) for p in parts]
        for p in parts:
            p.acks = []
        t0 = time.monotonic()
        futures, self._alo_futures = self._alo_futures, []  # at-least-once: every output written so far

        async def commit() -> _Results:
            store_errors: list[tuple[Partition, BaseException]] = []
            results: list[BaseException | None]
            if self.eos:
                results = list(await asyncio.gather(*(self._commit_eos(c, release_info, store_errors) for c in snaps),
                                                    return_exceptions=True))
            else:
                results = await self._commit_alo(snaps, futures, store_errors)
            return results, store_errors, time.monotonic() - t0

        self._inflight = (asyncio.ensure_future(commit()), snaps)
        return True

    async def settle(self) -> Outcome | None:
        """Wait for the checkpoint in flight; its outcome, or None when there was none (or another
        caller took it meanwhile)."""
        entry = self._inflight
        if entry is None:
            return None
        task, snaps = entry
        results, store_errors, seconds = await asyncio.shield(task)
        if self._inflight is not entry:
            return None  # another caller (shutdown) acted on it meanwhile
        self._inflight = None
        now = time.time()
        failures = tuple((c.p, r) for c, r in zip(snaps, results) if isinstance(r, BaseException))
        for c, r in zip(snaps, results):
            if not isinstance(r, BaseException):
                c.p.last_checkpoint_time = now
        status: Status = "committed"
        if failures:
            status = "fenced" if all(isinstance(exc, ProducerFenced) for _, exc in failures) else "failed"
        return Outcome(status, failures, seconds, now, tuple(store_errors))

    def cancel(self) -> None:
        """Give up on the checkpoint in flight (shutdown with the broker down): aborting the
        partitions' transactions ends it."""
        if self._inflight is not None:
            self._inflight[0].cancel()
            self._inflight = None

    # ---- the steps ----------------------------------------------------------------------------
    async def _send_changelog(self, producer: AIOKafkaProducer, p: Partition,
                              changes: dict[tuple[str, bytes], bytes | None], position: int) -> BatchSink | None:
        """Submit an interval's state changes (one changelog record per changed key) without waiting
        for their acknowledgement; the returned sink tells the position once they are acked."""
        if not changes:
            return None
        hdr = [(H.H_CHECKPOINT, str(position).encode())]
        topic, part, tname = self.changelog, p.tp.partition, p.tp.topic
        sink = BatchSink()
        for (ns, key), v in changes.items():
            sink.add(producer, topic, part, changelog_key(tname, ns, key), v, hdr)
        await sink.flush()
        return sink

    async def _changelog_position(self, sink: BatchSink | None, p: Partition) -> int | None:
        """The changelog offset after an interval's records (once they are acknowledged)."""
        if sink is None:
            return None
        fut, n = sink.last[(self.changelog, p.tp.partition)]
        offset: int = (await fut).offset
        return offset + n

    async def _commit_eos(self, c: _Commit, release_info: dict[str, Any],
                          store_errors: list[tuple[Partition, BaseException]]) -> None:
        p = c.p
        producer = await self.assignment.producer_for(p)
        try:
            # 1.-3. within write_timeout: a write, or the partition's joining the transaction
            # (AddPartitionsToTxn), that the broker refuses with a retriable error (a topic deleted,
            # too few in-sync replicas) is retried for ever by the idempotent producer
            sink = await asyncio.wait_for(self._write_interval(producer, c, release_info), self.write_timeout)
        except asyncio.TimeoutError:
            m.WRITES_REFUSED.inc()
            raise WriteTimeout(f"checkpoint of {p.tp.topic}:{p.tp.partition} not acknowledged within "
                               f"{self.write_timeout:.0f}s (kafka.request_timeout_ms): the broker keeps refusing a "
                               "write or does not answer") from None
        except Exception:
            m.WRITES_REFUSED.inc()
            raise  # the checkpoint fails: the engine aborts and rewinds every partition
        # 4. not bounded: once the commit is sent its outcome is the broker's, and a commit reported
        # as failed that went through would make the engine replay what it committed
        await producer.commit_transaction()
        p.in_txn = False
        p.committed = c.position
        p.uncommitted -= c.records
        self._store_committed(p, await self._changelog_position(sink, p), store_errors)  # 5.

    async def _write_interval(self, producer: AIOKafkaProducer, c: _Commit,
                              release_info: dict[str, Any]) -> BatchSink | None:
        """Steps 1.-3. of one partition's commit; the changelog sink (None: no state changes)."""
        p = c.p
        sink = await self._send_changelog(producer, p, c.changes, c.position)  # 1.
        written = await producer.send(self.checkpoint_topic, record_value(
            group=self.group, topic=p.tp.topic, partition=p.tp.partition, offset=c.position,
            changelog_records=len(c.changes), release=release_info, instance=self.instance_id,
            records=c.records), key=record_key(self.group, p.tp.topic, p.tp.partition))
        await producer.send_offsets_to_transaction({p.tp: c.position}, self.group)  # 2.
        await acknowledged([*c.acks, written, *(sink.futures_of(producer) if sink is not None else ())])  # 3.
        return sink

    def _store_committed(self, p: Partition, changelog_position: int | None,
                         store_errors: list[tuple[Partition, BaseException]]) -> None:
        try:
            p.store.commit(changelog_position)
        except Exception as exc:  # noqa: BLE001
            log.critical("local state store failed after a committed checkpoint; stopping",
                         extra={"partition": f"{p.tp.topic}:{p.tp.partition}", "error": repr(exc)})
            store_errors.append((p, exc))

    async def _commit_alo(self, snaps: list[_Commit], futures: list[asyncio.Future[Any]],
                          store_errors: list[tuple[Partition, BaseException]]) -> list[BaseException | None]:
        producer = self.clients.shared_producer
        consumer = self.clients.consumer
        assert producer is not None and consumer is not None
        try:
            sinks = [await self._send_changelog(producer, c.p, c.changes, c.position) for c in snaps]
            positions = [await self._changelog_position(sink, c.p) for sink, c in zip(sinks, snaps)]
            try:
                await acknowledged(futures, self.write_timeout)  # every output and dead letter acknowledged ...
            except Exception:
                m.WRITES_REFUSED.inc()
                raise
            await consumer.commit({c.p.tp: c.position for c in snaps})  # ... before the offsets move
        except Exception as exc:  # noqa: BLE001
            return [exc] * len(snaps)
        for c, pos in zip(snaps, positions):
            c.p.committed = c.position
            c.p.uncommitted -= c.records
            self._store_committed(c.p, pos, store_errors)
        return [None] * len(snaps)
