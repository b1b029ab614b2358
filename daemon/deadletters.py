"""Reading the dead-letter topic back, and replaying dead letters once their cause is fixed.

A dead letter (engine/headers.py) carries the input's key, its original value, the input's own
headers, then the headers failoverd added: ``fd.dlq.reason``, ``fd.dlq.detail``, the release and
source-position headers and, for a value cut to ``dead_letter.max_value_bytes``,
``fd.dlq.truncated``. Replaying sends the original key, value and headers back to the source
topic and partition (or to another topic), plus ``fd.replayed.from`` naming the dead letter,
so the record goes through the model again like any new input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from daemon.engine import headers as H
from daemon.errors import ConfigError

_ADDED = {H.H_DLQ_REASON, H.H_DLQ_DETAIL, H.H_DLQ_TRUNCATED, H.H_RELEASE_NAME, H.H_RELEASE_VERSION,
          H.H_RELEASE_DIGEST, H.H_SOURCE_TOPIC, H.H_SOURCE_PARTITION, H.H_SOURCE_OFFSET}


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    original_headers: list[tuple[str, bytes]]
    reason: str
    detail: str
    release: str
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    truncated: bool

    @property
    def where(self) -> str:
        return f"{self.partition}/{self.offset}"

    def to_json(self) -> dict:
        return {"dlq_partition": self.partition, "dlq_offset": self.offset, "timestamp_ms": self.timestamp_ms,
                "reason": self.reason, "detail": self.detail, "release": self.release,
                "source": f"{self.source_topic}:{self.source_partition}@{self.source_offset}",
                "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
                "value": self.value.decode("utf-8", "replace") if self.value is not None else None,
                "value_bytes": len(self.value) if self.value is not None else None, "truncated": self.truncated,
                "headers": [[k, v.decode("utf-8", "replace") if v is not None else None]
                            for k, v in self.original_headers]}


def parse(partition: int, offset: int, timestamp_ms: int, key, value, headers) -> DeadLetter:
    """A dead-letter record as written by the engine (:func:`daemon.engine.headers.dead_letter_headers`)."""
    hs = list(headers or ())
    # the engine appends fd.dlq.reason and then only its own headers: the last reason header starts them
    cut = next((i for i in range(len(hs) - 1, -1, -1) if hs[i][0] == H.H_DLQ_REASON), len(hs))
    added = {k: v for k, v in hs[cut:] if k in _ADDED}

    def text(name: str) -> str:
        return added.get(name, b"").decode("utf-8", "replace")

    def number(name: str) -> int | None:
        raw = text(name)
        return int(raw) if raw.lstrip("-").isdigit() else None

    release = f"{text(H.H_RELEASE_NAME)}@{text(H.H_RELEASE_VERSION)}" if H.H_RELEASE_NAME in added else ""
    return DeadLetter(partition=partition, offset=offset, timestamp_ms=timestamp_ms, key=key, value=value,
                      original_headers=hs[:cut], reason=text(H.H_DLQ_REASON) or "unknown",
                      detail=text(H.H_DLQ_DETAIL), release=release,
                      source_topic=text(H.H_SOURCE_TOPIC) or None, source_partition=number(H.H_SOURCE_PARTITION),
                      source_offset=number(H.H_SOURCE_OFFSET), truncated=added.get(H.H_DLQ_TRUNCATED) == b"1")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on."""

    reasons: frozenset[str] = frozenset()
    source_topic: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        unknown = sorted(self.reasons - set(H.DLQ_REASONS))
        if unknown:
            raise ConfigError(f"--reason {', '.join(unknown)}: unknown; dead-letter reasons are "
                              f"{', '.join(H.DLQ_REASONS)}")

    def matches(self, d: DeadLetter) -> bool:
        return ((not self.reasons or d.reason in self.reasons)
                and (self.source_topic is None or d.source_topic == self.source_topic)
                and (self.since_ms is None or d.timestamp_ms >= self.since_ms)
                and (self.until_ms is None or d.timestamp_ms < self.until_ms))


async def read(kafka: dict, topic: str, selection: Selection, timeout: float = 30.0) -> list[DeadLetter]:
    """The committed dead letters present when called (read_committed, from the beginning), selected."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                auto_offset_reset="earliest", **kafka)
    await consumer.start()
    try:
        parts = None
        if topic in await consumer.topics():
            # aiokafka fills partitions_for_topic only once the topic is in its metadata (as engine.py does)
            await consumer._client._wait_on_metadata(topic)  # noqa: SLF001
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise ConfigError(f"dead-letter topic {topic!r} does not exist; check dead_letter.topic")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        found: list[DeadLetter] = []
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} took longer than {timeout:.0f}s")
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < ends[tp]:
                        d = parse(tp.partition, r.offset, r.timestamp, r.key, r.value, r.headers)
                        if selection.matches(d):
                            found.append(d)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        found.sort(key=lambda d: (d.timestamp_ms, d.partition, d.offset))
        return found[: selection.limit] if selection.limit else found
    finally:
        await consumer.stop()


@dataclasses.dataclass
class ReplayReport:
    replayed: list[DeadLetter] = dataclasses.field(default_factory=list)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


async def replay(kafka: dict, dlq_topic: str, letters: Iterable[DeadLetter], *, to_topic: str | None = None,
                 dry_run: bool = False) -> ReplayReport:
    """Send each dead letter's original record back (source topic and partition, or ``to_topic``)."""
    report = ReplayReport()
    todo = []
    for d in letters:
        if d.truncated:
            report.skip("truncated when dead-lettered (the original value is gone)")
        elif d.value is None:
            report.skip("null value")
        elif to_topic is None and (d.source_topic is None or d.source_partition is None):
            report.skip("no fd.source.topic/partition header (give --to)")
        else:
            todo.append(d)
    if dry_run or not todo:
        report.replayed = todo
        return report
    producer = AIOKafkaProducer(enable_idempotence=True, acks="all", linger_ms=5, **kafka)
    await producer.start()
    try:
        futures = []
        for d in todo:
            hdrs = d.original_headers + [(H.H_REPLAYED_FROM, f"{dlq_topic}/{d.partition}/{d.offset}".encode())]
            if to_topic is None:
                fut = await producer.send(d.source_topic, d.value, key=d.key, partition=d.source_partition,
                                          headers=hdrs)
            else:
                fut = await producer.send(to_topic, d.value, key=d.key, headers=hdrs)
            futures.append(fut)
        await asyncio.gather(*futures)  # every replayed record acknowledged (acks=all)
    finally:
        await producer.stop()
    report.replayed = todo
    return report
