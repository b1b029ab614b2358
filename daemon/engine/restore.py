"""Restoring partitions' state stores from their changelog, up to the last committed checkpoint.

read_committed stops at the last committed checkpoint: uncommitted or aborted writes are never
applied. Only the delta past the local store's position is read.

Partitions opened together (an assignment opens them side by side) restore together: one shared
restore consumer is assigned every partition being restored, so their fetches overlap and no
partition waits for the previous one's last (empty) long-poll. Each store is written in chunks
(:meth:`Restorer._chunk` records, sorted by key: :meth:`StateStore.apply_changelog`); at most about
:attr:`Restorer.BUFFER_RECORDS` changelog records are held in memory over all of them, a partition
whose records pile up is paused.

The chunks are written on the event loop, not in a thread: Python's sqlite3 releases the GIL around
every row it steps, and with the event loop decoding records at full speed a writer thread waits
for the GIL at every row (measured: more CPU and a slower restore than writing in line). Only the
WAL checkpoint that ends a store's restore (disk I/O, one call) runs in a thread.

Progress, while a restore runs: :attr:`Restorer.restoring` (changelog records left per
partition: ``/status`` and readiness), the ``failoverd_state_restore_remaining`` gauge and the
``failoverd_state_restored`` counter (both move with every fetched batch and chunk written).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from typing import Any

from aiokafka import TopicPartition

from daemon import metrics as m
from daemon.engine.connections import EngineClients
from daemon.engine.state import StateStore, release_free_memory

log = logging.getLogger("failoverd.engine")

PROGRESS_EVERY_S = 5.0

# The WAL checkpoint that ends a store's restore (disk writes and an fsync, outside the GIL).
_CHECKPOINTS = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="state-restore")


def _end_restore(store: StateStore, applied: int) -> int:
    store.end_restore()
    return applied


@dataclasses.dataclass(eq=False)
class _Job:
    """One partition being restored."""

    tp: TopicPartition
    ctp: TopicPartition
    store: StateStore
    start: int
    end: int
    done: asyncio.Future[None]
    pos: int = 0
    """Next changelog offset to fetch (everything before it is buffered, being written or written)."""
    buffer: list[Any] = dataclasses.field(default_factory=list)
    writing: asyncio.Future[int] | None = None
    written: int = 0
    """The position the last write submitted carries (persisted with it)."""
    applied: int = 0
    t0: float = 0.0
    next_report: float = 0.0
    paused: bool = False

    def __post_init__(self) -> None:
        self.pos = self.written = self.start
        self.t0 = time.monotonic()
        self.next_report = self.t0 + PROGRESS_EVERY_S

    @property
    def labels(self) -> tuple[str, str]:
        return self.tp.topic, str(self.tp.partition)


class Restorer:
    BUFFER_RECORDS = 100_000
    """Changelog records held in memory at most, over every partition being restored (about 220
    bytes each): a chunk is ``BUFFER_RECORDS / (2 * partitions being restored)`` records."""
    PARALLEL = 8
    """Partitions restored at once (more wait for their turn): the restore consumer prefetches up to
    1 MiB per assigned partition, and each holds up to a chunk of records."""
    POLL_MS = 10
    """How long one fetch round waits for records (the tail of a changelog is a commit marker)."""

    def __init__(self, clients: EngineClients, changelog: str) -> None:
        self.clients = clients
        self.changelog = changelog
        self.restoring: dict[TopicPartition, int] = {}
        """Partitions being opened: changelog records left (-1: not known yet)."""
        self._jobs: list[_Job] = []
        """Partitions being restored (at most :attr:`PARALLEL`)."""
        self._queue: list[_Job] = []
        """Partitions waiting for their turn."""
        self._reassign = False
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None

    async def restore(self, tp: TopicPartition, store: StateStore) -> None:
        """Apply the committed changelog past the store's position (with any other partition
        being restored at the same time)."""
        hw_reader = self.clients.hw_reader
        assert self.clients.restorer is not None and hw_reader is not None, "restore before the clients started"
        ctp = TopicPartition(self.changelog, tp.partition)
        start = store.position()
        # Restore up to the high watermark, not to the last stable offset that read_committed's
        # end_offsets gives: another writer of this changelog partition (a partition of another
        # input topic with the same number) may hold a transaction open, and our own committed
        # records behind its start would be cut off. Our producer has fenced the partition's previous
        # owner, so everything below the high watermark is decided or ends with its writer's interval.
        end: int = (await hw_reader.end_offsets([ctp]))[ctp]
        labels = (tp.topic, str(tp.partition))
        if start >= end:
            m.STATE_RESTORE_REMAINING.labels(*labels).set(0)
            return
        job = _Job(tp, ctp, store, start, end, asyncio.get_running_loop().create_future())
        self.restoring[tp] = end - start
        m.STATE_RESTORE_REMAINING.labels(*labels).set(end - start)
        log.info("restoring state", extra={"partition": f"{tp.topic}:{tp.partition}", "from": start, "to": end})
        self._queue.append(job)
        self._wake.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        try:
            await asyncio.shield(job.done)
        except BaseException:
            # cancelled (a stop, a failed sibling) or failed: nothing writes the store once this
            # returns (the caller closes it)
            if job in self._queue:
                self._queue.remove(job)
            if job in self._jobs:
                self._jobs.remove(job)
                self._reassign = True
            if job.writing is not None and not job.writing.done():
                await asyncio.wait([job.writing])
            store.end_restore()
            raise
        finally:
            self._wake.set()

    # ---- the one fetch loop for every partition being restored ---------------------------------
    async def _drive(self) -> None:
        consumer = self.clients.restorer
        assert consumer is not None
        try:
            while self._jobs or self._queue:
                while self._queue and len(self._jobs) < self.PARALLEL:
                    job = self._queue.pop(0)
                    job.t0 = time.monotonic()
                    job.next_report = job.t0 + PROGRESS_EVERY_S
                    self._jobs.append(job)
                    self._reassign = True
                if self._reassign:
                    self._reassign = False
                    consumer.assign([j.ctp for j in self._jobs])
                    for j in self._jobs:  # a new assignment forgets positions: each goes on where it was
                        consumer.seek(j.ctp, j.pos)
                        j.paused = False
                if all(j.paused or j.pos >= j.end for j in self._jobs):
                    await self._wait_for_a_write()  # nothing to fetch until a write frees a buffer
                    data: dict[TopicPartition, list[Any]] = {}
                else:
                    data = await consumer.getmany(timeout_ms=self.POLL_MS, max_records=self._chunk())
                if self._reassign:  # a partition joined or left meanwhile: its records are fetched again
                    continue
                for job in list(self._jobs):
                    await self._advance(consumer, job, data.get(job.ctp, []))
        except BaseException as exc:  # noqa: BLE001 - every waiting restore gets the error
            for job in self._jobs + self._queue:
                if not job.done.done():
                    job.done.set_exception(exc)
            self._jobs.clear()
            self._queue.clear()
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            # an assigned consumer keeps long-polling the changelog: stop it until the next restore
            if not self._jobs and not self._queue:
                try:
                    consumer.unsubscribe()
                except Exception:  # noqa: BLE001 - stopped meanwhile: nothing to stop
                    pass
                release_free_memory()  # the restore's peak is not the store's steady size

    @staticmethod
    def _submit(store: StateStore, topic: str, records: list[tuple[bytes, bytes | None]], position: int,
                last: bool) -> asyncio.Future[int]:
        """Write ``records`` to ``store`` (on the event loop: see the module's docstring); the last
        write's WAL checkpoint, disk I/O, runs in a :data:`_CHECKPOINTS` thread."""
        loop = asyncio.get_running_loop()
        try:
            applied = store.apply_changelog(topic, records, position)
        except Exception as exc:  # noqa: BLE001 - the partition's restore fails with it
            fut: asyncio.Future[int] = loop.create_future()
            fut.set_exception(exc)
            return fut
        if last:
            return loop.run_in_executor(_CHECKPOINTS, _end_restore, store, applied)
        fut = loop.create_future()
        fut.set_result(applied)
        return fut

    def _chunk(self) -> int:
        """Changelog records per SQLite write of one store (sorted by key first: B-tree order)."""
        return self.BUFFER_RECORDS // (2 * max(1, len(self._jobs)))

    async def _wait_for_a_write(self) -> None:
        writes = [j.writing for j in self._jobs if j.writing is not None and not j.writing.done()]
        self._wake.clear()
        waits: list[asyncio.Future[Any]] = [*writes, asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waits[-1].cancel()

    async def _advance(self, consumer: Any, job: _Job, recs: list[Any]) -> None:
        """Take ``job``'s fetched records, start its next write when one is due, finish it at the end."""
        if job not in self._jobs:  # its restore was cancelled meanwhile: its store is not ours to write
            return
        if recs:
            job.buffer += [(r.key, r.value) for r in recs]  # far smaller than the ConsumerRecords
        new_pos: int = await consumer.position(job.ctp)
        if job not in self._jobs:
            return
        job.pos = max(job.pos, new_pos)
        if job.writing is not None and job.writing.done():
            write, job.writing = job.writing, None
            try:
                applied = write.result()
            except BaseException as exc:  # noqa: BLE001 - the store failed: this partition's open fails
                self._fail(job, exc)
                return
            job.applied += applied
            m.STATE_RESTORED.inc(applied)
        at_end = job.pos >= job.end
        remaining = max(0, job.end - job.pos) + len(job.buffer)
        self.restoring[job.tp] = remaining
        m.STATE_RESTORE_REMAINING.labels(*job.labels).set(remaining)
        position = min(job.pos, job.end)  # records past the end are read again next time (idempotent)
        chunk = self._chunk()
        if job.writing is None and (len(job.buffer) >= chunk or (at_end and (job.buffer or job.written < position))):
            records, job.buffer = job.buffer, []
            job.written = position
            job.writing = self._submit(job.store, job.tp.topic, records, position, at_end)
            await asyncio.sleep(0)  # a chunk's write holds the loop for tens of ms: let the rest run
            if job not in self._jobs:  # cancelled meanwhile
                return
        paused = len(job.buffer) >= chunk or at_end
        if paused != job.paused:
            job.paused = paused
            (consumer.pause if paused else consumer.resume)(job.ctp)
        if at_end and job.writing is None and not job.buffer:
            self._finish(job)
        elif time.monotonic() >= job.next_report:  # a long restore says how far it is
            job.next_report += PROGRESS_EVERY_S
            log.info("restoring state: progress", extra={
                "partition": f"{job.tp.topic}:{job.tp.partition}", "applied": job.applied, "remaining": remaining,
                "percent": round(100 * (job.pos - job.start) / max(1, job.end - job.start), 1)})

    def _finish(self, job: _Job) -> None:
        self._jobs.remove(job)
        self.restoring[job.tp] = 0
        m.STATE_RESTORE_REMAINING.labels(*job.labels).set(0)
        log.info("state restored", extra={"partition": f"{job.tp.topic}:{job.tp.partition}", "records": job.applied,
                                          "seconds": round(time.monotonic() - job.t0, 3)})
        if not job.done.done():
            job.done.set_result(None)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._jobs.remove(job)
        self._reassign = True
        if not job.done.done():
            job.done.set_exception(exc)
