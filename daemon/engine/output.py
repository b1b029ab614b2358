"""The emit step: a predicted batch becomes output records and dead letters, sized to fit.

Outputs go to the output topic with the input's key and provenance headers; when the output topic
is as wide as the input topic, an output keeps its input's partition (keys stay where they were),
else Kafka's default key partitioning applies. A record the broker would refuse whole (larger than
the topic's ``max.message.bytes``, :mod:`daemon.engine.limits`) would be refused again on every
replay, so an oversized output becomes a dead letter (``output_oversized``) and a dead letter is
cut to fit. Delivery futures are handed back: a checkpoint waits for every one of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer

from daemon import metrics as m
from daemon.engine import headers as H
from daemon.engine import limits
from daemon.engine import records as tolerant
from daemon.engine.assignment import Assignment
from daemon.engine.batch import OK
from daemon.engine.checkpointer import Checkpointer
from daemon.engine.partition import Partition
from daemon.engine.release import LoadedRelease
from daemon.engine.sink import BatchSink, Partitioner
from daemon.engine.state import changelog_key
from daemon.errors import ReleaseFailure

if TYPE_CHECKING:
    from daemon.engine.pipeline import Batch

Headers = list[tuple[str, bytes]]


@dataclasses.dataclass
class Emitted:
    """What one batch's emit step wrote."""

    futures: list[asyncio.Future[Any]]
    by_producer: BatchSink
    predicted: int = 0
    processed: int = 0
    """Inputs now counted as processed (due for a checkpoint)."""
    output_invalid: int = 0
    model_exceptions: int = 0


class Output:
    def __init__(self, *, out_topic: str, dlq_topic: str, changelog: str, max_value: int) -> None:
        self.out_topic = out_topic
        self.dlq_topic = dlq_topic
        self.changelog = changelog
        self.max_value = max_value
        """``dead_letter.max_value_bytes``: a larger input is a dead letter, cut to this in it."""
        self.limits = limits.Limits({})
        self._out_parts = 0
        self._input_parts: dict[str, int] = {}
        self._out_partitioner = Partitioner(1)
        self._dlq_partitioner = Partitioner(1)

    def configure(self, *, out_partitions: int, dlq_partitions: int, input_partitions: dict[str, int]) -> None:
        """The topics' widths, read once the clients are up."""
        self._out_parts = out_partitions
        self._out_partitioner = Partitioner(out_partitions)
        self._dlq_partitioner = Partitioner(dlq_partitions)
        self._input_parts = input_partitions

    def set_input_partitions(self, input_partitions: dict[str, int]) -> None:
        """The input topics' widths changed (partitions added): see :meth:`fixed_partition`."""
        self._input_parts = {**self._input_parts, **input_partitions}

    def fixed_partition(self, p: Partition) -> int | None:
        """The output partition of all of ``p``'s records when the output topic is as wide as the
        input topic (keys stay where they were); None: Kafka's default key hash, per record."""
        return p.tp.partition if self._input_parts.get(p.tp.topic) == self._out_parts else None

    def partition(self, p: Partition, key: bytes | None) -> int:
        fixed = self.fixed_partition(p)
        return fixed if fixed is not None else self._out_partitioner(key)

    def max_output(self, rel: LoadedRelease) -> int:
        """Key + encoded output bytes that surely fit the output topic beside ``rel``'s provenance
        headers (the worker dead-letters a larger output before its state counts: output_oversized)."""
        headers = rel.headers + [(H.H_SOURCE_TOPIC, b"t" * 249), (H.H_SOURCE_PARTITION, b"9" * 10),
                                 (H.H_SOURCE_OFFSET, b"9" * 20)]
        return max(1, self.limits.of(self.out_topic) - limits.record_bytes(None, b"", headers) - 10)

    def check_state_sizes(self, rel: LoadedRelease, states: dict[int, bytes | None],
                          owner: list[tuple[Partition, bytes]]) -> None:
        """A state larger than the changelog accepts would fail every checkpoint of its partition:
        the release is at fault (``state_oversized``), before anything of the batch is stored."""
        limit = self.limits.of(self.changelog)
        room = limit - 2048  # changelog key and header: the exact size is computed only above this
        for sk, st in states.items():
            if st is not None and len(st) > room:
                p, key = owner[sk]
                size = limits.record_bytes(changelog_key(p.tp.topic, rel.ns, key), st, [(H.H_CHECKPOINT, b"9" * 20)])
                if size > limit:
                    raise ReleaseFailure(f"{rel.channel} release {rel.ref} returned a state of {len(st)} bytes for a key "
                                         f"of {p.tp.topic}:{p.tp.partition}; the changelog {self.changelog} accepts "
                                         f"{limit} bytes per record", reason="state_oversized")

    async def emit(self, b: "Batch", assignment: Assignment, checkpointer: Checkpointer) -> Emitted:
        """Write ``b``'s outputs and dead letters into their partitions' open transactions (or through
        the shared producer), hand their delivery futures to the checkpoint that must wait for
        them, and only then count the batch's inputs as processed (``position``). A partition
        dropped meanwhile (fenced) is skipped: it is re-read from its checkpoint."""
        live = {p for p in b.ends if assignment.live(p)}
        producers = {id(p): await assignment.producer_for(p) for p in live}
        done = await self._write(b, producers)
        if assignment.eos:
            for p in live:  # every write is acknowledged before its checkpoint commits
                p.acks.extend(done.by_producer.futures_of(producers[id(p)]))
        else:
            checkpointer.written(done.futures)
        for p, (end, n) in b.ends.items():
            if p in live:
                p.position = max(p.position, end)
                p.highest = max(p.highest, p.position)
                p.uncommitted += n
                done.processed += n
        return done

    async def _write(self, b: "Batch", producers: dict[int, AIOKafkaProducer]) -> Emitted:
        rel_headers = b.release.headers
        results, refs, direct = b.results, b.refs, b.direct
        out = self.out_topic
        sink = BatchSink()
        add = sink.add
        counts_out: dict[Partition, int] = {}
        reasons: dict[tuple[Partition, str], int] = {}
        done = Emitted([], sink, predicted=len(results))
        H_OFFSET = H.H_SOURCE_OFFSET
        out_limit = self.limits.of(out)
        for p, lo, hi in b.spans:  # one partition's records at a time: per-record work is one append
            producer = producers.get(id(p))
            if producer is None:
                continue
            prefix = rel_headers + [(H.H_SOURCE_TOPIC, p.topic_b), (H.H_SOURCE_PARTITION, p.partition_b)]
            # key + value bytes that surely fit (the exact size is computed only above this)
            room = out_limit - limits.record_bytes(None, b"", prefix + [(H_OFFSET, b"9" * 20)]) - 10
            fixed = self.fixed_partition(p)
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
                        self.add_dlq(sink, producer, r, "output_oversized",
                                     f"output of {len(value)} bytes (record with key and headers: "
                                     f"{limits.record_bytes(key, value, hdrs)} bytes) exceeds the {out_limit} bytes "
                                     f"{out} accepts (max.message.bytes, capped by the producer's max_request_size)",
                                     hdrs)
                        reasons[(p, "output_oversized")] = reasons.get((p, "output_oversized"), 0) + 1
                        continue
                    add(producer, out, fixed if fixed is not None else partition_of(key), key, value, hdrs)
                    ok += 1
                else:
                    self.add_dlq(sink, producer, r, res[1], res[2], hdrs)
                    reasons[(p, res[1])] = reasons.get((p, res[1]), 0) + 1
            if ok:
                counts_out[p] = counts_out.get(p, 0) + ok
        for res in results:  # what the health monitor counts (records of dropped partitions too)
            if res[0] != OK:
                if res[1] == "output_schema":
                    done.output_invalid += 1
                elif res[1] == "model_exception":
                    done.model_exceptions += 1
        for p, r, reason, detail in direct:
            if id(p) not in producers:
                continue
            self.add_dlq(sink, producers[id(p)], r, reason, detail,
                         rel_headers + H.source_headers(p.topic_b, p.partition_b, r.offset))
            reasons[(p, reason)] = reasons.get((p, reason), 0) + 1
        done.futures = await sink.flush()
        for p, n in counts_out.items():
            m.RECORDS_OUT.labels(p.tp.topic, p.partition_b.decode()).inc(n)
        for (p, reason), n in reasons.items():
            m.RECORDS_DEAD_LETTERED.labels(p.tp.topic, p.partition_b.decode(), reason).inc(n)
        return done

    def add_dlq(self, sink: BatchSink, producer: AIOKafkaProducer, r: Any, reason: str, detail: str,
                provenance: Headers) -> None:
        """A dead letter carrying the input's key, value and headers, cut to what the dead-letter
        topic accepts: the value first (to ``dead_letter.max_value_bytes``, then to fit), then the
        input's own headers, then the key; the original size is in ``fd.dlq.original_size``."""
        original = r.headers
        if original and original[-1][0] == tolerant.MARK:
            original = original[:-1]  # an undecodable record's marker: its text is the detail
        value, size = r.value, len(r.value) if r.value is not None else 0
        limit = self.limits.of(self.dlq_topic)
        full = min(size, self.max_value)
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
        sink.add(producer, self.dlq_topic, self._dlq_partitioner(r.key), key, value, hdrs)
