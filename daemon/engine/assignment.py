"""The partitions this instance owns: taking them on assignment, fencing, rewinding, pausing.

- **Assignment.** A partition kept across a rebalance (the broker's committed offset is still
  our last checkpoint) keeps its producer and store and rewinds to its checkpoint; any other is
  opened: its transactional producer first (which fences every earlier owner and aborts its open
  transaction), then its state restored (:mod:`daemon.engine.restore`), then the consumer seeks
  to its committed offset.
- **Fencing.** A partition whose producer is fenced (a newer owner holds its transactional id, or
  the broker timed our transaction out) is dropped: nothing of ours commits. If the group still
  says it is ours after a session timeout, it is re-opened from the broker's committed offset.
- **Rewind.** Forget everything since the last checkpoint (abort the open transactions, discard
  pending state) and seek back to it.
- **Pause.** The consumer follows the engine's paused flag (:meth:`Assignment.follow_pause`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ConsumerStoppedError

from daemon import metrics as m
from daemon.engine.connections import EngineClients
from daemon.engine.partition import Partition, store_path
from daemon.engine.restore import Restorer
from daemon.engine.state import StateStore

log = logging.getLogger("failoverd.engine")


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka has no type hints
    """The group's callbacks, into the engine's handover (under its lock). A failure to take the
    assigned partitions is fatal (``on_error``): aiokafka would only log it and go on with nothing."""

    def __init__(self, revoked: Callable[[set[TopicPartition]], Awaitable[None]],
                 assigned: Callable[[set[TopicPartition]], Awaitable[None]], stopping: asyncio.Event,
                 on_error: Callable[[BaseException], None]) -> None:
        self.revoked, self.assigned, self.stopping, self.on_error = revoked, assigned, stopping, on_error

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            await self.assigned(set(assigned))
        except Exception as exc:  # noqa: BLE001
            if self.stopping.is_set() or isinstance(exc, ConsumerStoppedError):
                # a requested stop closed the consumer while the group handed us partitions: the
                # next owner takes them from the last checkpoint; nothing of ours was committed
                log.info("stopped while taking assigned partitions", extra={"error": repr(exc)})
                return
            log.critical("could not take the assigned partitions; stopping so the supervisor restarts us",
                         extra={"error": repr(exc)})
            self.on_error(exc)


class Assignment:
    def __init__(self, clients: EngineClients, restorer: Restorer, *, state_dir: Path, eos: bool,
                 session_timeout_ms: int, lock: asyncio.Lock, stopping: asyncio.Event,
                 is_paused: Callable[[], bool]) -> None:
        self.clients = clients
        self.restorer = restorer
        self.state_dir = Path(state_dir)
        self.eos = eos
        self.session_timeout_ms = session_timeout_ms
        self.lock = lock
        self.stopping = stopping
        self.is_paused = is_paused
        self.parts: dict[TopicPartition, Partition] = {}
        self.batch_bytes = 512 * 1024
        """Producer batch size (what every topic we write accepts; set from the topics' limits)."""
        self.replayed_total = 0
        self._reopen_timers: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._consuming = True
        """Whether the consumer's partitions are resumed (our own view; see :meth:`follow_pause`)."""

    @property
    def consumer(self) -> AIOKafkaConsumer:
        consumer = self.clients.consumer
        assert consumer is not None, "the engine has not started"
        return consumer

    def live(self, p: Partition) -> bool:
        """``p`` is still ours (not dropped or replaced meanwhile)."""
        return self.parts.get(p.tp) is p

    # ---- assignment ---------------------------------------------------------------------------
    async def take(self, assigned: set[TopicPartition], paused: bool) -> list[Partition]:
        """Own exactly ``assigned``; returns the partitions opened (restored) for it."""
        self.cancel_reopens()  # the rebalance decides who owns what
        for tp in [tp for tp in self.parts if tp not in assigned]:
            await self.close(self.parts.pop(tp))
        keep, new = [], []
        for tp in assigned:
            p = self.parts.get(tp)
            if p is not None and p.in_txn:
                # written after the handover's checkpoint (a fetch that raced the revoke): it never
                # commits, the records are read again from the checkpoint (abort drops a partition
                # that cannot abort: it is opened afresh)
                await self.abort(p)
                p = self.parts.get(tp)
            if p is not None:
                broker = await self.consumer.committed(tp)
                if broker is not None and broker == p.committed and p.producer is not None:
                    keep.append(p)
                    continue
                await self.close(self.parts.pop(tp))
            new.append(tp)
        for p in keep:
            self.rewind(p, count=False)
        results = await asyncio.gather(*(self.open(tp) for tp in sorted(new)), return_exceptions=True)
        opened = [r for r in results if isinstance(r, Partition)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for p in opened:
                await self.close(p)
            raise failed[0]
        if paused:
            self.consumer.pause(*assigned)  # a new assignment starts unpaused
        else:
            self.consumer.resume(*assigned)
        for p in opened:
            self.parts[p.tp] = p
        log.info("partitions assigned", extra={"assigned": sorted(f"{t.topic}:{t.partition}" for t in assigned),
                                               "kept": len(keep), "opened": len(new)})
        return opened

    async def open(self, tp: TopicPartition) -> Partition:
        restoring = self.restorer.restoring
        restoring[tp] = -1
        m.init_partition_labels(tp.topic, tp.partition)
        producer = await self.clients.transactional_producer(tp, self.batch_bytes) if self.eos else None
        try:
            # on a thread: SQLite's open (WAL switch, CREATE TABLE) takes ~10 ms on a busy disk, and
            # the partitions of an assignment open together: 256 of them on the event loop held it
            # (and the group's heartbeat) for seconds, long enough to be expelled from the group
            store = await asyncio.to_thread(StateStore, store_path(self.state_dir, tp))
        except BaseException:
            if producer is not None:
                await producer.stop()  # it used to be left running when the store could not open
            raise
        try:
            await self.restorer.restore(tp, store)
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
            restoring.pop(tp, None)
        return Partition(tp=tp, store=store, producer=producer, committed=committed)

    async def close(self, p: Partition, timeout: float = 5.0) -> None:
        """Abort its open transaction (if any), stop its producer, close its store, in ``timeout``."""
        end = asyncio.get_running_loop().time() + timeout

        def left() -> float:
            return max(0.1, end - asyncio.get_running_loop().time())

        if p.in_txn and p.producer is not None:
            try:
                await asyncio.wait_for(p.producer.abort_transaction(), left())
            except Exception:  # noqa: BLE001 - the broker aborts it at the transaction timeout
                pass
            p.in_txn = False
        if p.producer is not None:
            try:
                await asyncio.wait_for(p.producer.stop(), left())
            except Exception:  # noqa: BLE001
                pass
        p.store.close()

    async def close_all(self, timeout: float) -> None:
        parts, self.parts = list(self.parts.values()), {}
        await asyncio.gather(*(self.close(p, timeout) for p in parts))

    async def producer_for(self, p: Partition) -> AIOKafkaProducer:
        """Where ``p``'s writes go: its transaction (begun at the first write of an interval), or
        the shared producer (at-least-once)."""
        if not self.eos:
            producer = self.clients.shared_producer
            assert producer is not None
            return producer
        assert p.producer is not None
        if not p.in_txn:
            await p.producer.begin_transaction()
            p.in_txn = True
        return p.producer

    # ---- fencing ------------------------------------------------------------------------------
    async def drop_fenced(self, p: Partition, why: str) -> None:
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
        self.parts.pop(p.tp, None)
        try:
            if p.producer is not None:
                # bounded: stop() flushes, and a batch the broker keeps refusing with a retriable
                # error is retried for ever by an idempotent producer; the next owner's
                # InitProducerId fences it
                await asyncio.wait_for(p.producer.stop(), 5.0)
        except Exception:  # noqa: BLE001
            pass
        p.store.close()
        if p.tp in self.consumer.assignment():
            self._reopen_later(p.tp)

    def _reopen_later(self, tp: TopicPartition) -> None:
        delay = self.session_timeout_ms / 1000 + 2
        loop = asyncio.get_running_loop()
        self._reopen_timers[tp] = loop.call_later(delay, lambda: loop.create_task(self._reopen(tp)))

    def cancel_reopens(self) -> None:
        for timer in self._reopen_timers.values():
            timer.cancel()
        self._reopen_timers.clear()

    async def _reopen(self, tp: TopicPartition) -> None:
        async with self.lock:
            self._reopen_timers.pop(tp, None)
            if self.stopping.is_set() or tp in self.parts or tp not in self.consumer.assignment():
                return
            try:
                self.parts[tp] = await self.open(tp)
            except Exception as err:  # noqa: BLE001 - e.g. its old transaction cannot be aborted yet
                log.error("could not re-open a fenced partition; trying again later",
                          extra={"partition": f"{tp.topic}:{tp.partition}", "error": repr(err)})
                self._reopen_later(tp)  # until it opens or a rebalance decides (take cancels this)
                return
            if not self.is_paused():
                self.consumer.resume(tp)
            log.warning("partition still ours after a session timeout: re-opened from the committed offset",
                        extra={"partition": f"{tp.topic}:{tp.partition}"})

    # ---- rewind -------------------------------------------------------------------------------
    async def abort(self, p: Partition, timeout: float = 10.0) -> None:
        if not p.in_txn or p.producer is None:
            return
        try:
            await asyncio.wait_for(p.producer.abort_transaction(), timeout)
            p.in_txn = False
        except Exception as exc:  # noqa: BLE001 - a producer that cannot abort is fenced or broken
            await self.drop_fenced(p, f"abort failed: {exc!r}")

    def rewind(self, p: Partition, count: bool = True) -> int:
        """Forget everything since the last checkpoint and seek back to it; the records replayed."""
        if not self.live(p):
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

    async def abort_and_rewind(self, timeout: float = 10.0) -> int:
        """Abort every open transaction and seek every partition to its last checkpoint."""
        parts = list(self.parts.values())
        await asyncio.gather(*(self.abort(p, timeout) for p in parts))  # one EndTxn round trip, not one per partition
        return sum(self.rewind(p) for p in parts)

    # ---- consumption --------------------------------------------------------------------------
    def follow_pause(self, paused: bool) -> None:
        """The consumer follows ``paused``. While paused, every assigned partition is paused at
        each turn (a rebalance hands partitions over unpaused); on resume every partition is read
        again from the last record handed to the model, so a record fetched and not processed,
        whatever the reason, is never skipped."""
        consumer = self.consumer
        if paused:
            assigned = consumer.assignment()
            if assigned:
                consumer.pause(*assigned)
            self._consuming = False
        elif not self._consuming:
            for tp, p in self.parts.items():
                consumer.seek(tp, p.fetched)
            consumer.resume(*consumer.assignment())
            self._consuming = True

    def pause_all(self) -> None:
        consumer = self.clients.consumer
        if consumer is not None:
            consumer.pause(*consumer.assignment())

    def resume_all(self) -> None:
        consumer = self.clients.consumer
        if consumer is not None:
            consumer.resume(*consumer.assignment())

    def unfetch(self, data: dict[TopicPartition, Any]) -> None:
        """Put fetched records back: the next fetch of their partitions starts at the first of them
        that was not handed to the model."""
        assigned = self.consumer.assignment()
        for tp in data:
            p = self.parts.get(tp)
            if p is not None and tp in assigned:  # not ours any more: its next owner reads it
                self.consumer.seek(tp, p.fetched)

    def refetch_from_position(self, p: Partition) -> None:
        """Records handed to the model and not written are fetched again (from ``p.position``).
        During a handover (the pipeline discarded before the assignment is taken) a partition
        given away is not sought: aiokafka refuses a seek of a partition not assigned."""
        if self.live(p):
            p.fetched = p.position
            if p.tp in self.consumer.assignment():
                self.consumer.seek(p.tp, p.position)
