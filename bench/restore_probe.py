"""Micro-benchmark behind a finding in docs/BENCHMARKS.md: the engine's state restore (one shared
read_committed consumer, re-assigned partition by partition, engine.py `_restore_locked`) pays
the consumer's `fetch_max_wait_ms` (aiokafka default 500 ms) once per partition after the first:
the long-poll fetch still in flight for the previous partition must return before the newly
assigned one is fetched.

    .venv/bin/python bench/restore_probe.py [--partitions 4] [--records 600]

Writes a small transactional changelog-like topic, then restores it the way the engine does with
fetch_max_wait_ms=500 (the engine's setting today) and =20, twice each, and prints the total and
per-partition seconds. Loopback broker only; the topic is deleted at the end.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from bench import common as C  # noqa: E402


async def fill(topic: str, parts: int, n: int) -> None:
    p = AIOKafkaProducer(bootstrap_servers=C.BOOTSTRAP, transactional_id=C.unique("probe"))
    await p.start()
    try:
        for part in range(parts):
            await p.begin_transaction()
            for i in range(n):
                await p.send(topic, b"v" * 60, key=b"k%d" % i, partition=part)
            await p.commit_transaction()
    finally:
        await p.stop()


async def restore(topic: str, parts: int, wait_ms: int) -> tuple[float, list[float]]:
    c = AIOKafkaConsumer(bootstrap_servers=C.BOOTSTRAP, group_id=None, enable_auto_commit=False,
                         isolation_level="read_committed", auto_offset_reset="earliest", fetch_max_wait_ms=wait_ms)
    await c.start()
    per = []
    t_all = time.monotonic()
    try:
        for part in range(parts):  # like Engine._restore_locked: assign, seek, read to the end offset
            ctp = TopicPartition(topic, part)
            end = (await c.end_offsets([ctp]))[ctp]
            c.assign([ctp])
            c.seek(ctp, 0)
            t0, pos = time.monotonic(), 0
            while pos < end:
                await c.getmany(ctp, timeout_ms=1000, max_records=10000)
                pos = await c.position(ctp)
            per.append(round(time.monotonic() - t0, 3))
    finally:
        await c.stop()
    return round(time.monotonic() - t_all, 3), per


async def main(args) -> int:
    topic = C.unique("probe-changelog")
    await C.create_topics({topic: args.partitions})
    try:
        await fill(topic, args.partitions, args.records)
        for wait in (500, 20, 500, 20):
            total, per = await restore(topic, args.partitions, wait)
            print(f"fetch_max_wait_ms={wait:3d}: restore of {args.partitions} partitions took {total:.3f} s "
                  f"(per partition: {per})")
    finally:
        await C.delete_topics([topic])
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--records", type=int, default=600, help="records per partition")
    sys.exit(asyncio.run(main(ap.parse_args())))
