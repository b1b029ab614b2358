"""Reading the dead-letter topic back, and replaying dead letters once their cause is fixed.

A dead letter (engine/headers.py) carries the input's key, its original value, the input's own
headers, then the headers failoverd added: ``fd.dlq.reason``, ``fd.dlq.detail``, the release and
source-position headers and, for a value cut to ``dead_letter.max_value_bytes``,
``fd.dlq.truncated``. Replaying sends the original key, value and headers back to the source
topic and partition (or to another topic), plus ``fd.replayed.from`` naming the dead letter,
so the record goes through the model again like any new input.

Replay is idempotent. Each replayed record is written together with a *replay marker* in one
Kafka transaction: a record on the dead-letter topic itself, in the dead letter's partition,
with the header ``fd.dlq.replay-of: <partition>/<offset>`` (and no ``fd.dlq.reason``: it is not
a dead letter). Both become visible to read_committed readers at once, or neither does, so a
crash mid-replay cannot send a dead letter twice: the next replay sees exactly the markers of
what was sent. :func:`read` sets those dead letters' ``replays`` and never returns markers as
dead letters. The transactional id is one per dead-letter topic (:func:`transactional_id`):
starting a replay fences any other replay of the same topic still running (its open
transaction is aborted), and waits for the last one to be complete, before reading the topic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import socket
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, ProducerFenced

from daemon import clients
from daemon.control import describe
from daemon.engine import headers as H
from daemon.errors import ConfigError, FailoverdError
from daemon.progress import QUIET, Progress

H_REPLAY_OF = "fd.dlq.replay-of"
"""On a replay marker: ``<partition>/<offset>`` of the dead letter it marks as replayed."""

TRANSACTION_RECORDS = 500
"""Dead letters replayed per transaction (each with its marker)."""

_ADDED = {H.H_DLQ_REASON, H.H_DLQ_DETAIL, H.H_DLQ_TRUNCATED, H.H_RELEASE_NAME, H.H_RELEASE_VERSION,
          H.H_RELEASE_DIGEST, H.H_SOURCE_TOPIC, H.H_SOURCE_PARTITION, H.H_SOURCE_OFFSET,
          getattr(H, "H_DLQ_ORIGINAL_SIZE", "fd.dlq.original_size")}


class DeadLetterTopicError(FailoverdError):
    """The dead-letter topic could not be read or written (broker unreachable, too slow, refused). Exit 1."""

    retriable = True


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
    replays: tuple[dict[str, Any], ...] = ()
    """The replay markers of this dead letter (when, where to, by whom), oldest first."""

    @property
    def where(self) -> str:
        return f"{self.partition}/{self.offset}"

    @property
    def replayed(self) -> bool:
        return bool(self.replays)

    def to_json(self) -> dict[str, Any]:
        return {"dlq_partition": self.partition, "dlq_offset": self.offset, "timestamp_ms": self.timestamp_ms,
                "reason": self.reason, "detail": self.detail, "release": self.release,
                "source": f"{self.source_topic}:{self.source_partition}@{self.source_offset}",
                "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
                "value": self.value.decode("utf-8", "replace") if self.value is not None else None,
                "value_bytes": len(self.value) if self.value is not None else None, "truncated": self.truncated,
                "headers": [[k, v.decode("utf-8", "replace") if v is not None else None]
                            for k, v in self.original_headers],
                "replayed": list(self.replays)}


def parse(partition: int, offset: int, timestamp_ms: int, key: bytes | None, value: bytes | None,
          headers: Sequence[tuple[str, bytes]] | None) -> DeadLetter:
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


def marker_of(headers: Sequence[tuple[str, bytes]] | None) -> tuple[int, int] | None:
    """(partition, offset) of the dead letter a replay marker marks, or None for a dead letter.

    A marker carries no ``fd.dlq.reason``; a dead letter whose *original* headers happened to
    contain ``fd.dlq.replay-of`` still has its reason after them, so it is not taken for one."""
    hs = list(headers or ())
    if any(k == H.H_DLQ_REASON for k, _ in hs):
        return None
    raw = next((v for k, v in hs if k == H_REPLAY_OF), None)
    if raw is None:
        return None
    p, _, o = raw.decode("ascii", "replace").partition("/")
    return (int(p), int(o)) if p.isdigit() and o.isdigit() else None


def marker(d: DeadLetter, to: str, *, forced: bool) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of the replay marker of ``d``."""
    doc = {"dead_letter": d.where, "to": to, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "by": _who(), "forced": forced}
    return f"replay-of/{d.where}".encode(), orjson.dumps(doc), [(H_REPLAY_OF, d.where.encode())]


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


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


def _unreachable(topic: str, kafka: clients.Target, exc: BaseException) -> DeadLetterTopicError:
    return DeadLetterTopicError(f"dead-letter topic {topic!r}: broker unreachable at {clients.address(kafka)} "
                                f"({describe(exc)}); fix: check [kafka] bootstrap_servers in the "
                                f"configuration and that the broker is up (`failoverd kafka status`)")


async def read(kafka: clients.Target, topic: str, selection: Selection, timeout: float = 30.0,
               progress: Progress = QUIET) -> list[DeadLetter]:
    """The committed dead letters present when called (read_committed, from the beginning), selected,
    each with its replay markers. ConfigError if the topic does not exist; DeadLetterTopicError if
    the broker is unreachable or the topic cannot be read within ``timeout`` seconds."""
    consumer = clients.consumer(kafka)  # read_committed, no group, from the earliest offset
    try:
        async with asyncio.timeout(timeout):
            try:
                await consumer.start()
            except (KafkaConnectionError, OSError) as exc:
                raise _unreachable(topic, kafka, exc) from exc
            parts: set[int] = set()
            if topic in await consumer.topics():  # asking for the metadata of a missing topic may create it
                parts = await clients.partitions_of(consumer, topic)
            if not parts:
                raise ConfigError(f"dead-letter topic {topic!r} does not exist at {clients.address(kafka)}; fix: check "
                                  f"[dead_letter] topic in the configuration (or create it: failoverd topics apply)")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            letters: list[DeadLetter] = []
            replays: dict[tuple[int, int], list[dict[str, Any]]] = {}
            pending = {tp for tp in tps if ends[tp] > 0}
            total, seen = sum(ends.values()), 0
            progress.step(f"reading {topic}")
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
                for tp, records in batch.items():
                    seen += len(records)
                    progress.update(seen, total, " records read")
                    for r in records:
                        if r.offset >= ends[tp]:
                            continue
                        marked = marker_of(r.headers)
                        if marked is not None:
                            replays.setdefault(marked, []).append(_marker_doc(r.value))
                            continue
                        d = parse(tp.partition, r.offset, r.timestamp, r.key, r.value, r.headers)
                        if selection.matches(d):
                            letters.append(d)
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
    except TimeoutError:
        raise DeadLetterTopicError(f"dead-letter topic {topic!r} at {clients.address(kafka)} could not be read to its "
                                   f"end within {timeout:g}s; fix: allow more time (--timeout SECONDS) or check the "
                                   f"broker's health") from None
    except KafkaError as exc:
        raise DeadLetterTopicError(f"dead-letter topic {topic!r} at {clients.address(kafka)}: {describe(exc)}; fix: "
                                   f"check the broker (`failoverd kafka status`)") from exc
    finally:
        await consumer.stop()
    found = [dataclasses.replace(d, replays=tuple(replays[(d.partition, d.offset)]))
             if (d.partition, d.offset) in replays else d for d in letters]
    found.sort(key=lambda d: (d.timestamp_ms, d.partition, d.offset))
    return found[: selection.limit] if selection.limit else found


def _marker_doc(value: bytes | None) -> dict[str, Any]:
    try:
        doc = orjson.loads(value or b"{}")
    except orjson.JSONDecodeError:
        doc = None
    return doc if isinstance(doc, dict) else {}


@dataclasses.dataclass
class ReplayReport:
    selected: int = 0
    replayed: list[DeadLetter] = dataclasses.field(default_factory=list)
    already: list[DeadLetter] = dataclasses.field(default_factory=list)
    """Selected dead letters replayed before (a marker), not sent again (without --force)."""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Selected dead letters that cannot be replayed, per reason."""

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def transactional_id(dlq_topic: str) -> str:
    """One per dead-letter topic: two replays of one topic never run at once."""
    return f"failoverd.dlq-replay.{dlq_topic}"


def plan(letters: Iterable[DeadLetter], *, to_topic: str | None, force: bool,
         limit: int | None = None) -> tuple[list[DeadLetter], ReplayReport]:
    """(what to send, the report so far): replayed ones are left out unless ``force``; ``limit``
    counts the others (oldest first), so that replaying ``--limit N`` again moves on."""
    report = ReplayReport()
    todo = []
    for d in letters:
        if limit is not None and report.selected - len(report.already) >= limit:
            break
        report.selected += 1
        if d.truncated:
            report.skip("truncated when dead-lettered (the original value is gone)")
        elif d.value is None:
            report.skip("null value")
        elif to_topic is None and (d.source_topic is None or d.source_partition is None):
            report.skip("no fd.source.topic/partition header (give --to)")
        elif d.replayed and not force:
            report.already.append(d)
        else:
            todo.append(d)
    return todo, report


async def replay(kafka: clients.Target, dlq_topic: str, selection: Selection, *, to_topic: str | None = None,
                 dry_run: bool = False, force: bool = False, timeout: float = 30.0,
                 progress: Progress = QUIET) -> ReplayReport:
    """Send each selected dead letter's original record back (source topic and partition, or
    ``to_topic``), once: with a replay marker in the same transaction, skipping those already
    marked unless ``force``. A dry run reads and reports, and writes nothing."""
    limit, selection = selection.limit, dataclasses.replace(selection, limit=None)
    if dry_run:
        todo, report = plan(await read(kafka, dlq_topic, selection, timeout, progress), to_topic=to_topic,
                            force=force, limit=limit)
        report.replayed = todo
        return report
    producer = clients.transactional_producer(kafka, transactional_id(dlq_topic), linger_ms=5)
    try:
        try:
            # init_transactions: fences an earlier replay of this topic and waits for its last
            # transaction to be complete, so that the read below sees all of its markers
            await _within(timeout, producer.start())
        except TimeoutError:
            raise DeadLetterTopicError(f"dead-letter topic {dlq_topic!r} at {clients.address(kafka)}: the transaction "
                                       f"coordinator did not answer within {timeout:g}s; fix: check the broker's "
                                       f"health, or allow more time (--timeout SECONDS)") from None
        except (KafkaConnectionError, OSError) as exc:
            raise _unreachable(dlq_topic, kafka, exc) from exc
        except KafkaError as exc:
            raise DeadLetterTopicError(f"dead-letter topic {dlq_topic!r} at {clients.address(kafka)}: cannot start the "
                                       f"transactional producer {transactional_id(dlq_topic)!r} "
                                       f"({describe(exc)}); fix: the principal needs Write and Describe "
                                       f"on that transactional id") from exc
        todo, report = plan(await read(kafka, dlq_topic, selection, timeout, progress), to_topic=to_topic,
                            force=force, limit=limit)
        done: list[DeadLetter] = []
        progress.step(f"replaying {len(todo)} dead letter(s)")
        try:
            for i in range(0, len(todo), TRANSACTION_RECORDS):
                chunk = todo[i:i + TRANSACTION_RECORDS]
                await _within(timeout, _send_chunk(producer, dlq_topic, chunk, to_topic, force))
                done.extend(chunk)
                progress.update(len(done), len(todo), " replayed")
        except (KafkaError, TimeoutError) as exc:
            what = ("another `dlq replay` of this topic started and took over" if isinstance(exc, ProducerFenced)
                    else describe(exc))
            raise DeadLetterTopicError(
                f"replay stopped after {len(done)} of {len(todo)} dead letter(s) ({what}); the rest were not sent. "
                f"fix: run the same command again: those already replayed are skipped") from exc
        report.replayed = done
        return report
    finally:
        await producer.stop()


async def _send_chunk(producer: AIOKafkaProducer, dlq_topic: str, chunk: list[DeadLetter], to_topic: str | None,
                      force: bool) -> None:
    async with producer.transaction():  # commits on success, aborts on any error
        futures = []
        for d in chunk:
            hdrs = d.original_headers + [(H.H_REPLAYED_FROM, f"{dlq_topic}/{d.partition}/{d.offset}".encode())]
            if to_topic is None:
                futures.append(await producer.send(d.source_topic, d.value, key=d.key,
                                                   partition=d.source_partition, headers=hdrs))
            else:
                futures.append(await producer.send(to_topic, d.value, key=d.key, headers=hdrs))
            key, value, mhdrs = marker(d, to_topic or f"{d.source_topic}:{d.source_partition}", forced=force)
            futures.append(await producer.send(dlq_topic, value, key=key, partition=d.partition, headers=mhdrs))
        for fut in futures:
            await fut


T = TypeVar("T")


async def _within(timeout: float, aw: Awaitable[T]) -> T:
    async with asyncio.timeout(timeout):
        return await aw
