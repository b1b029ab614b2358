"""Record batches built directly (aiokafka's C batch builder) instead of one ``send()`` per record.

``producer.send()`` costs tens of microseconds per record in partitioning and bookkeeping; the
engine already knows every record's partition, so it appends to one batch per (producer, topic,
partition) and submits whole batches with ``send_batch`` (transactional producers register the
partition with the transaction as usual).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka.partitioner import murmur2

Headers = Sequence[tuple[str, bytes | None]]


class BatchSink:
    def __init__(self) -> None:
        # aiokafka's producers and batch builders are untyped (Any)
        self._open: dict[tuple[int, str, int], tuple[Any, Any, list[int]]] = {}
        self._pending: list[tuple[Any, str, int, Any, int]] = []
        self.last: dict[tuple[str, int], tuple[asyncio.Future[Any], int]] = {}
        """(topic, partition) -> (delivery future of the last batch, records in it)."""
        self._futures: dict[int, list[asyncio.Future[Any]]] = {}

    def add(self, producer: Any, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: Headers) -> None:
        slot = (id(producer), topic, partition)
        entry = self._open.get(slot)
        if entry is None:
            entry = self._open[slot] = (producer, producer.create_batch(), [0])
        producer_, batch, count = entry
        if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
            self._pending.append((producer_, topic, partition, batch, count[0]))
            batch = producer_.create_batch()
            count = [0]
            self._open[slot] = (producer_, batch, count)
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit in an empty batch for {topic}")
        count[0] += 1

    async def flush(self) -> list[asyncio.Future[Any]]:
        """Submit every batch; returns their delivery futures (awaited by commit/flush)."""
        for (_, topic, partition), (producer, batch, count) in self._open.items():
            if count[0]:
                self._pending.append((producer, topic, partition, batch, count[0]))
        self._open.clear()
        futures: list[asyncio.Future[Any]] = []
        for producer, topic, partition, batch, n in self._pending:
            batch.close()
            fut = await producer.send_batch(batch, topic, partition=partition)
            fut.add_done_callback(_retrieve)
            self.last[(topic, partition)] = (fut, n)
            self._futures.setdefault(id(producer), []).append(fut)
            futures.append(fut)
        self._pending.clear()
        return futures


    def futures_of(self, producer: Any) -> list[asyncio.Future[Any]]:
        """The delivery futures of the batches ``producer`` was given (after :meth:`flush`)."""
        return self._futures.get(id(producer), [])


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a delivery failure as seen: whoever needs it awaits the future; one nobody awaits any
    more (its transaction was aborted) must not log 'exception was never retrieved'."""
    if not fut.cancelled():
        fut.exception()


class Partitioner:
    """Kafka's default key partitioning (murmur2), cached per key; keyless records round-robin."""

    def __init__(self, partitions: int) -> None:
        self.n = partitions
        self._cache: dict[bytes, int] = {}
        self._rr = 0

    def __call__(self, key: bytes | None) -> int:
        if key is None:
            self._rr = (self._rr + 1) % self.n
            return self._rr
        p = self._cache.get(key)
        if p is None:
            if len(self._cache) > 200_000:
                self._cache.clear()
            p = self._cache[key] = int(murmur2(key) & 0x7FFFFFFF) % self.n
        return p
