"""Helpers for tests against the real local broker: create topics, produce, read back committed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError


UNIQUE_NAMES: set[str] = set()
"""Every name :func:`unique` gave out in this process: the topics among them are deleted when the
session ends (tests/conftest.py), so a developer's broker does not pile up thousands of them."""


def unique(prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    UNIQUE_NAMES.add(name)
    return name


async def delete_session_topics(bootstrap: str, timeout: float = 30.0) -> int:
    """Delete the topics named by :func:`unique` in this process; how many (best effort)."""
    async def run() -> int:
        async with admin_client(bootstrap) as admin:
            ours = sorted(set(await admin.list_topics()) & UNIQUE_NAMES)
            for i in range(0, len(ours), 200):
                await admin.delete_topics(ours[i:i + 200])
            return len(ours)

    return await asyncio.wait_for(run(), timeout)


async def create_topics(bootstrap: str, topics: dict[str, int], configs: dict[str, dict[str, str]] | None = None) -> None:
    async with admin_client(bootstrap) as admin:
        await admin.create_topics([
            NewTopic(name, n, 1, topic_configs=(configs or {}).get(name, {})) for name, n in topics.items()
        ])


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on the way out."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def delete_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> None:
    """Delete ``topic`` and wait until the broker no longer lists it."""
    async with admin_client(bootstrap) as admin:
        await admin.delete_topics([topic])

        async def gone() -> bool:
            return topic not in await admin.list_topics()

        await wait_for(gone, timeout=timeout, interval=0.2, what=f"topic {topic} deleted")


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """``group``'s committed offset per partition of ``topic`` (empty while the group's coordinator
    is loading or moving: nothing committed to read yet)."""
    async with admin_client(bootstrap) as admin:
        try:
            got = await admin.list_consumer_group_offsets(group)
        except KafkaError as exc:
            if not exc.retriable:
                raise
            return {}
    return {tp.partition: om.offset for tp, om in got.items() if tp.topic == topic}


async def group_committed(bootstrap: str, group: str, topic: str) -> int:
    """The sum of ``group``'s committed offsets on ``topic`` (0 while its coordinator is not ready)."""
    return sum(o for o in (await committed_offsets(bootstrap, group, topic)).values() if o >= 0)


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]] | Iterable,
                  partition: int | None = None, headers=None) -> int:
    """Produce (key, value) pairs; returns how many were acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    n = 0
    try:
        futures = []
        for key, value in records:
            futures.append(await producer.send(topic, value, key=key, partition=partition, headers=headers))
            n += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n


async def read_committed(bootstrap: str, topic: str, *, expect: int | None = None, timeout: float = 30.0,
                         idle: float = 1.5) -> list:
    """Read every committed record of ``topic`` from the start with ``isolation_level=read_committed``.

    With ``expect``, returns once that many were read (or raises on the deadline). Without it, returns
    once every partition is read to its high watermark (so no transaction is open on it: under
    read_committed the position cannot pass an open transaction's first record), or after ``idle``
    seconds without a new record with the last stable offsets reached (a transaction left open by a
    killed producer holds the high watermark ahead until the broker aborts it).
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    out = []
    try:
        parts = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(0.1)
        if not parts:
            raise AssertionError(f"topic {topic} has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
                last_new = time.monotonic()
            if expect is not None and len(out) >= expect:
                return out
            if expect is None and await _at_high_watermarks(consumer, tps):
                return out
            if expect is None and time.monotonic() - last_new > idle:
                end = await consumer.end_offsets(tps)
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= end[tp] for pos, tp in zip(positions, tps)):
                    return out
        if expect is not None:
            raise AssertionError(f"read {len(out)} of {expect} expected records from {topic} in {timeout}s")
        return out
    finally:
        await consumer.stop()


async def _at_high_watermarks(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
    """Every partition read to the high watermark of its last fetch response: everything written
    to it is read and no transaction on it is still open."""
    for tp in tps:
        hw = consumer.highwater(tp)
        if hw is None or await consumer.position(tp) < hw:
            return False
    return True


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until truthy; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
