"""The floor of Python overhead: a plain aiokafka consume-decode-score-encode-produce loop.

    python bench/plain_loop.py --input T --output T --group G [--workload score|peers]

``score`` (bench/throughput.py's baseline): decode with orjson, compute fraud-scorer 1.0.0's
logistic score over the 8 features (same weights, merchant risk, log1p(amount)), encode,
produce. No state, no schema validation, no transactions, no provenance headers.

``peers`` (bench/peers/run.py): the peers workload with per-card state in a plain dict
(count and mean amount), the common output format of bench/peers/workload.py.

At-least-once: every ~100 ms (like failoverd's checkpoint interval) it waits for the producer to
acknowledge everything sent, then commits the input offsets. SIGTERM: flush, commit, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import signal
import sys
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
V1 = ROOT / "examples" / "bundles" / "fraud-v1" / "data"


class Scorer:
    """fraud-scorer 1.0.0's score, without its state."""

    def __init__(self) -> None:
        w = json.loads((V1 / "weights.json").read_text())
        self.weights = [float(x) for x in w["weights"]]
        self.bias = float(w["bias"])
        self.mrw = float(w["merchant_risk_weight"])
        self.alw = float(w["amount_log_weight"])
        self.default_risk = float(w["default_merchant_risk"])
        with open(V1 / "merchant_risk.csv", newline="", encoding="utf-8") as fh:
            self.risk = {row["merchant_id"]: float(row["risk"]) for row in csv.DictReader(fh)}
        self.version = "fraud-scorer@1.0.0"

    def __call__(self, value: dict) -> bytes:
        amount = float(value["amount"])
        merchant = self.risk.get(value.get("merchant_id"), self.default_risk)
        z = self.bias + sum(w * x for w, x in zip(self.weights, value["features"]))
        z += self.mrw * merchant + self.alw * math.log1p(amount)
        z = max(-60.0, min(60.0, z))
        score = round(1.0 / (1.0 + math.exp(-z)), 6)
        band = "low" if score < 0.3 else "medium" if score < 0.7 else "high"
        return orjson.dumps({"card_id": value["card_id"], "score": score, "risk_band": band,
                             "model_version": self.version})


async def main(args) -> int:
    if args.workload == "score":
        scorer = Scorer()

        def handle(key, raw):
            return scorer(orjson.loads(raw))
    else:
        sys.path.insert(0, str(ROOT / "bench" / "peers"))
        from workload import process_dict  # noqa: E402

        state: dict = {}

        def handle(key, raw):
            return process_dict(state, orjson.loads(raw))

    consumer = AIOKafkaConsumer(args.input, bootstrap_servers=args.bootstrap, group_id=args.group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                isolation_level="read_committed", max_partition_fetch_bytes=4 << 20,
                                fetch_max_wait_ms=50, group_instance_id=args.instance_id)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=10, max_batch_size=512 * 1024)
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    offsets: dict = {}
    last_commit = time.monotonic()
    out = args.output
    print("ready", flush=True)
    try:
        while not stop.is_set():
            data = await consumer.getmany(timeout_ms=100, max_records=1000)
            for tp, records in data.items():
                for r in records:
                    await producer.send(out, handle(r.key, r.value), key=r.key)
                offsets[tp] = records[-1].offset + 1
            if offsets and time.monotonic() - last_commit >= args.commit_interval:
                await producer.flush()
                await consumer.commit(offsets)
                offsets = {}
                last_commit = time.monotonic()
        await producer.flush()
        if offsets:
            await consumer.commit(offsets)
    finally:
        await consumer.stop()
        await producer.stop()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--workload", choices=("score", "peers"), default="score")
    ap.add_argument("--commit-interval", type=float, default=0.1)
    ap.add_argument("--instance-id", default=None, help="group.instance.id (static membership)")
    sys.exit(asyncio.run(main(ap.parse_args())))
