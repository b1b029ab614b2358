"""Restoring a partition's state store from its changelog, up to the last committed checkpoint.

read_committed stops at the last committed checkpoint: uncommitted or aborted writes are never
applied. Only the delta past the local store's position is read. One restore consumer is shared,
so partitions restore one at a time; :attr:`Restorer.restoring` says how many changelog records
each restoring partition has left (``/status`` and readiness).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition

from daemon import metrics as m
from daemon.engine.connections import EngineClients
from daemon.engine.state import StateStore

log = logging.getLogger("failoverd.engine")

PROGRESS_EVERY_S = 5.0


class Restorer:
    def __init__(self, clients: EngineClients, changelog: str) -> None:
        self.clients = clients
        self.changelog = changelog
        self.restoring: dict[TopicPartition, int] = {}
        """Partitions being opened: changelog records left (-1: not known yet)."""
        self._lock = asyncio.Lock()  # one shared restore consumer: one partition at a time

    async def restore(self, tp: TopicPartition, store: StateStore) -> None:
        """Apply the committed changelog past the store's position."""
        async with self._lock:
            await self._restore_locked(tp, store)

    async def _restore_locked(self, tp: TopicPartition, store: StateStore) -> None:
        restorer, hw_reader = self.clients.restorer, self.clients.hw_reader
        assert restorer is not None and hw_reader is not None, "restore before the clients started"
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
        restorer.assign([ctp])
        restorer.seek(ctp, start)
        t0, applied, pos = time.monotonic(), 0, start
        log.info("restoring state", extra={"partition": f"{tp.topic}:{tp.partition}", "from": start, "to": end})
        next_report = t0 + PROGRESS_EVERY_S
        while pos < end:
            batch = await restorer.getmany(ctp, timeout_ms=100, max_records=10000)
            recs = batch.get(ctp, [])
            new_pos: int = await restorer.position(ctp)
            if recs or new_pos != pos:
                applied += store.apply_changelog(tp.topic, [(r.key, r.value) for r in recs], min(new_pos, end))
                pos = new_pos
            remaining = max(0, end - pos)
            self.restoring[tp] = remaining
            m.STATE_RESTORE_REMAINING.labels(*labels).set(remaining)
            if time.monotonic() >= next_report:  # a long restore says how far it is
                next_report += PROGRESS_EVERY_S
                log.info("restoring state: progress", extra={
                    "partition": f"{tp.topic}:{tp.partition}", "applied": applied, "remaining": remaining,
                    "percent": round(100 * (pos - start) / max(1, end - start), 1)})
        m.STATE_RESTORED.inc(applied)
        log.info("state restored", extra={"partition": f"{tp.topic}:{tp.partition}", "records": applied,
                                          "seconds": round(time.monotonic() - t0, 3)})
