"""Rescore after a rollback: committed inputs re-run through the active release as corrections.

The inputs a rolled-back release handled here (from where it became active up to the last
checkpoint) are read again with a consumer outside the group and run through the active release;
the results are written as corrections (header ``fd.correction``) in the partitions' open
transactions, so they commit with the next checkpoint. State is read, never written: corrections
do not count twice into per-key state.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import TopicPartition

from daemon.engine import headers as H
from daemon.engine.assignment import Assignment
from daemon.engine.batch import NO_STATE, OK
from daemon.engine.checkpointer import Checkpointer
from daemon.engine.connections import EngineClients
from daemon.engine.output import Output
from daemon.engine.release import LoadedRelease
from daemon.engine.sink import BatchSink

log = logging.getLogger("failoverd.engine")


async def rescore(since: dict[TopicPartition, int], label: str, *, rel: LoadedRelease, clients: EngineClients,
                  assignment: Assignment, output: Output, checkpointer: Checkpointer, max_batch_records: int) -> int:
    """Corrections for the inputs from ``since`` up to each partition's last checkpoint; how many."""
    consumer = await clients.rescore_consumer()
    written = 0
    try:
        for tp, start in sorted(since.items()):
            p = assignment.parts.get(tp)
            if p is None or start >= p.committed:
                continue
            consumer.assign([tp])
            consumer.seek(tp, start)
            end = p.committed
            pos = start
            while pos < end:
                batch: list[Any] = (await consumer.getmany(tp, timeout_ms=1000, max_records=max_batch_records)
                                    ).get(tp, [])
                recs = [r for r in batch if r.offset < end and r.value is not None
                        and len(r.value) <= output.max_value]
                pos = await consumer.position(tp)
                if not recs:
                    continue
                keys = list(dict.fromkeys(r.key for r in recs if r.key is not None))
                got = p.store.get_many(rel.ns, keys)
                index = {k: i for i, k in enumerate(keys)}
                items = [(r.key, r.value, index[r.key] if r.key is not None else NO_STATE) for r in recs]
                results, _, _ = await rel.worker.process(items, [got[k] for k in keys])
                producer = await assignment.producer_for(p)
                mark = [(H.H_CORRECTION, label.encode())]
                sink = BatchSink()
                for r, res in zip(recs, results):
                    if res[0] == OK:
                        sink.add(producer, output.out_topic, output.partition(p, r.key), r.key, res[1],
                                 rel.headers + H.source_headers(p.topic_b, p.partition_b, r.offset) + mark)
                        written += 1
                futures = await sink.flush()
                if assignment.eos:
                    p.acks.extend(futures)
                else:
                    checkpointer.written(futures)
    finally:
        await consumer.stop()
    log.warning("rescored", extra={"release": rel.ref, "corrections": written, "label": label})
    return written
