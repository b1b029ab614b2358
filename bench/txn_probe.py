"""What "one transaction per partition per interval" costs, without the daemon (issue 17, targets 3 and 6).

    .venv/bin/python bench/txn_probe.py                     # N = 4, 64, 256; 20 intervals each
    .venv/bin/python bench/txn_probe.py --partitions 4,256 --intervals 50

The daemon's exactly-once commit, reduced to its Kafka traffic: per interval, every partition's
transactional producer begins a transaction, writes ``--records`` records to its output partition and
one to a shared checkpoint topic, adds its input offset (send_offsets_to_transaction: AddOffsetsToTxn
+ TxnOffsetCommit) and commits (EndTxn); all partitions side by side (asyncio.gather), as the
checkpointer does. Against that, the same records and offsets in ONE transaction of one producer per
interval (what a per-instance transactional producer with KIP-447 fencing would send).

Reports per N: start() of the N producers (aiokafka sends InitProducerId later, with the first,
untimed, warm-up transaction, which also absorbs the new topics' leader elections), wall time of one interval's commit (median,
p90), transactions/s reached back to back, CPU milliseconds of this process per transaction, and the
broker connections. Topics are created and deleted; nothing else is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def conns() -> int:
    import os

    import psutil

    return sum(1 for c in psutil.Process(os.getpid()).net_connections(kind="tcp")
               if c.raddr and c.raddr.port == C.KAFKA_PORT and c.status == psutil.CONN_ESTABLISHED)


async def probe(n: int, intervals: int, records: int, single: bool) -> dict:
    from aiokafka import AIOKafkaProducer, TopicPartition

    tag = C.unique(f"txnprobe-{n}")
    out, ckpt, inp, group = f"{tag}-out", f"{tag}-ckpt", f"{tag}-in", f"{tag}-g"
    await C.create_topics({out: n, ckpt: 1, inp: n})
    value = b"x" * 300
    producers: list = []
    try:
        t0, c0 = time.monotonic(), time.process_time()
        ids = ["all"] if single else [str(p) for p in range(n)]
        producers = [AIOKafkaProducer(bootstrap_servers=C.BOOTSTRAP, transactional_id=f"{tag}:{i}", linger_ms=5,
                                      retry_backoff_ms=10) for i in ids]
        await asyncio.gather(*(p.start() for p in producers))
        start_s, start_cpu = time.monotonic() - t0, time.process_time() - c0

        async def one_txn(prod, parts: list[int], offset: int) -> None:
            await prod.begin_transaction()
            futs = []
            for part in parts:
                for _ in range(records):
                    futs.append(await prod.send(out, value, partition=part))
            futs.append(await prod.send(ckpt, b"checkpoint", key=b"k"))
            await prod.send_offsets_to_transaction({TopicPartition(inp, part): offset for part in parts}, group)
            await asyncio.gather(*futs)
            await prod.commit_transaction()

        walls = []
        await asyncio.gather(*(one_txn(p, list(range(n)) if single else [i], 1) for i, p in enumerate(producers)))
        c1 = time.process_time()
        t1 = time.monotonic()
        for k in range(intervals):
            t = time.monotonic()
            if single:
                await one_txn(producers[0], list(range(n)), k + 2)
            else:
                await asyncio.gather(*(one_txn(p, [i], k + 2) for i, p in enumerate(producers)))
            walls.append(time.monotonic() - t)
        span, cpu = time.monotonic() - t1, time.process_time() - c1
        txns = intervals * (1 if single else n)
        walls.sort()
        return {"n": n, "mode": "one txn per interval" if single else "one txn per partition", "start_s": start_s,
                "start_cpu_s": start_cpu, "interval_ms_median": 1000 * statistics.median(walls),
                "interval_ms_p90": 1000 * walls[int(0.9 * (len(walls) - 1))], "txn_per_s": txns / span,
                "cpu_ms_per_txn": 1000 * cpu / txns, "cpu_ms_per_interval": 1000 * cpu / intervals,
                "connections": conns()}
    finally:
        await asyncio.gather(*(p.stop() for p in producers), return_exceptions=True)
        await C.delete_topics([out, ckpt, inp])


async def main(args) -> int:
    rows = []
    for n in [int(x) for x in args.partitions.split(",")]:
        for single in (False, True):
            r = await probe(n, args.intervals, args.records, single)
            rows.append(r)
            print(f"N={n:4d} {r['mode']:22s} start {r['start_s']:5.2f}s (CPU {r['start_cpu_s']:.2f}s)  interval commit "
                  f"median {r['interval_ms_median']:7.1f} ms p90 {r['interval_ms_p90']:7.1f} ms  {r['txn_per_s']:7.1f} "
                  f"txn/s  CPU {r['cpu_ms_per_txn']:6.2f} ms/txn, {r['cpu_ms_per_interval']:7.1f} ms/interval  "
                  f"connections {r['connections']}", flush=True)
    print()
    print(C.md_table(["partitions", "mode", "start() s (CPU s), without InitProducerId", "one interval's commit ms: median (p90)",
                      "transactions/s back to back", "client CPU ms per interval", "broker connections"],
                     [[r["n"], r["mode"], f"{r['start_s']:.2f} ({r['start_cpu_s']:.2f})",
                       f"{r['interval_ms_median']:.0f} ({r['interval_ms_p90']:.0f})", f"{r['txn_per_s']:.0f}",
                       f"{r['cpu_ms_per_interval']:.0f}", r["connections"]] for r in rows]))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", default="4,64,256", help="comma-separated partition counts")
    ap.add_argument("--intervals", type=int, default=20, help="intervals (commits) measured per count")
    ap.add_argument("--records", type=int, default=10, help="output records per partition per interval")
    sys.exit(asyncio.run(main(ap.parse_args())))
