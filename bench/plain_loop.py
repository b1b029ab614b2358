"""A plain aiokafka consume-decode-produce loop: the baselines of bench/throughput.py and bench/peers.

    python bench/plain_loop.py --input T --output T --group G [--workload model|score|peers]

``model`` (bench/throughput.py's ``plain`` baseline: the same work as failoverd's data path, minus
what makes failoverd durable): the fraud-v1 bundle's own FraudScorer class
(examples/bundles/fraud-v1/code/model.py, context name "fraud-scorer", version "1.0.0", so the
outputs carry model_version "fraud-scorer@1.0.0" like the daemon's) with per-card state
{count, mean_amount} in a plain dict keyed by the record key (objects, not JSON); orjson decode;
jsonschema_rs validation of every input (schemas/input.json) and every output
(schemas/output.json); each getmany() batch goes to ``predict`` in waves (one occurrence of each
key per call, in order, so a key's second record sees the state of its first, as in
daemon/engine/batch.py); orjson encode; produce with the record's key. Records that do not decode
or validate, or that the model refuses, are skipped and counted (the daemon dead-letters them).
No transactions, no changelog, no checkpoints, no provenance headers, no dead-letter topic.

``score`` (bench/throughput.py's ``plain-bare`` floor): bare decode, score, encode — the floor of
Python overhead: orjson decode, fraud-scorer 1.0.0's logistic score over the 8 features (same
weights, merchant risk, log1p(amount)), encode, produce. No state, no schema validation, no
transactions, no provenance headers; its outputs lack count and mean_amount.

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
import os
import signal
import sys
import time
from pathlib import Path

# bench/ml_throughput.py runs this loop on a release environment's python (the model's packages
# from there); the Kafka client and the worker runtime come from paths appended *after* the
# environment's site-packages, so a package the release pins always wins.
for _extra in os.environ.get("FAILOVERD_BENCH_APPEND_PATH", "").split(os.pathsep):
    if _extra and _extra not in sys.path:
        sys.path.append(_extra)

import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLE_V1 = ROOT / "examples" / "bundles" / "fraud-v1"
V1 = BUNDLE_V1 / "data"


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


class ModelWorkload:
    """fraud-scorer 1.0.0 itself (the bundle's FraudScorer), with its state and both schemas."""

    def __init__(self, bundle: Path = BUNDLE_V1) -> None:
        """``bundle``: a bundle source directory (default fraud-v1); its entrypoint class, data files
        and JSON schemas as bundle.toml names them (bench/ml_throughput.py passes the fraud-ml ones)."""
        import importlib.util
        import tomllib

        import jsonschema_rs

        if str(ROOT) not in sys.path:
            sys.path.append(str(ROOT))  # after the site-packages (see FAILOVERD_BENCH_APPEND_PATH above)
        from daemon.model import ModelContext, Prediction, Record

        self.Prediction, self.Record = Prediction, Record
        manifest = tomllib.loads((bundle / "bundle.toml").read_text())
        module_name, class_name = manifest["bundle"]["entrypoint"].split(":")
        sys.path.insert(0, str(bundle / "code"))  # as the worker does: the bundle's code imports its siblings
        spec = importlib.util.spec_from_file_location(f"bench_{module_name}", bundle / "code" / f"{module_name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        context = ModelContext(name=manifest["bundle"]["name"], version=manifest["bundle"]["version"], digest="",
                               root=bundle, data={k: bundle / v for k, v in manifest.get("data", {}).items()},
                               manifest=manifest)
        self.model = getattr(module, class_name)(context)
        schemas = manifest["schemas"]
        self.input_ok = jsonschema_rs.validator_for(json.loads((bundle / schemas["input"]).read_text())).is_valid
        self.output_ok = jsonschema_rs.validator_for(json.loads((bundle / schemas["output"]).read_text())).is_valid
        self.state: dict = {}  # record key -> the model's state object
        self.skipped = 0

    def __call__(self, records) -> list[tuple[bytes | None, bytes]]:
        """(key, output value) for the records of one getmany() batch, in input order."""
        Record = self.Record
        results: list = [None] * len(records)
        waves: list[list] = []
        seen: dict = {}
        for i, r in enumerate(records):
            try:
                value = orjson.loads(r.value)
            except orjson.JSONDecodeError:
                self.skipped += 1
                continue
            if not self.input_ok(value):
                self.skipped += 1
                continue
            key = r.key
            if key is None:  # no key, no state (as the daemon)
                wave = 0
            else:
                wave = seen.get(key, 0)
                seen[key] = wave + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append((i, key, Record(key.decode("utf-8", "replace") if key is not None else None, value)))
        state = self.state
        for wave in waves:
            for _, key, record in wave:
                record.state = state.get(key) if key is not None else None
            predictions = self.model.predict([record for _, _, record in wave])
            for (i, key, _), p in zip(wave, predictions, strict=True):
                if not isinstance(p, self.Prediction) or not self.output_ok(p.output):
                    self.skipped += 1  # a RecordError (refused record) or an output the schema rejects
                    continue
                if key is not None:
                    state[key] = p.state
                results[i] = (key, orjson.dumps(p.output))
        return [x for x in results if x is not None]


async def main(args) -> int:
    batch = None  # model: a function of a whole getmany() batch; score, peers: ``handle`` per record
    if args.workload == "model":
        batch = ModelWorkload(Path(args.bundle)) if args.bundle else ModelWorkload()
    elif args.workload == "score":
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
            data = await consumer.getmany(timeout_ms=100, max_records=args.max_records)
            if batch is None:
                for tp, records in data.items():
                    for r in records:
                        await producer.send(out, handle(r.key, r.value), key=r.key)
                    offsets[tp] = records[-1].offset + 1
            elif data:
                for key, value in batch([r for records in data.values() for r in records]):
                    await producer.send(out, value, key=key)
                for tp, records in data.items():
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
        if batch is not None:
            print(f"skipped {batch.skipped} records (undecodable, invalid or refused)", flush=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--workload", choices=("model", "score", "peers"), default="model",
                    help="model: fraud-v1's FraudScorer with state and schema validation (same work as failoverd); "
                         "score: bare decode, score, encode (the floor); peers: bench/peers' workload")
    ap.add_argument("--bundle", default="", help="--workload model: a bundle source directory (default fraud-v1)")
    ap.add_argument("--max-records", type=int, default=1000, help="getmany() max_records (the daemon's "
                    "worker.max_batch_records, default 1000)")
    ap.add_argument("--commit-interval", type=float, default=0.1)
    ap.add_argument("--instance-id", default=None, help="group.instance.id (static membership)")
    sys.exit(asyncio.run(main(ap.parse_args())))
