"""Avro vs JSON, and the output compression codecs, through the failoverd daemon (issue 15).

    .venv/bin/python bench/formats.py                  # 30 s windows, 8 systems x 3 interleaved rounds (~35 min)
    .venv/bin/python bench/formats.py --quick --no-doc # 5 s windows, 1 round (~3 min): review only

One workload, two encodings: the same card transactions (card_id, merchant_id, amount, 8 features
-- the fields of fraud-avro's schemas/input.avsc) produced once as JSON (orjson) into one topic and
once as Avro (Confluent wire format, schema registered under ``<topic>-value`` in the local
Apicurio registry, `failoverd schema-registry up`) into another; same keys, same partitions.

Systems (each a real daemon, exactly-once, checkpoint.interval_ms=100, subprocess worker), run
interleaved, every round all of them:

  json-<codec>   fraud-v1 (fraud-scorer 1.0.0), [inputs]/[output] format = "json"
  avro-<codec>   fraud-avro (fraud-scorer-avro 1.0.0: fraud-v1's model code), format = "avro" both ways

with ``[output] compression`` = none, zstd (the default), lz4, gzip.

Measured per run (bench/common.py's method, issue 17): steady records/s over a window of --seconds
(30 s) from the first commit of input offsets, and the **bytes the output topic takes on the broker**: the sizes of its partitions' log segment files in the
broker's data directory (.local/kafka/data/<topic>-<p>/*.log) after the run -- record batches as
the producer compressed them (topic compression.type = producer, the broker default) plus the
transaction markers. Also the sum of the uncompressed values (bytes/record).

Checks: every run's output topic holds one committed record per committed input and no dead
letters; after every round, all runs hold the same outputs per partition in offset order, record by
record over the part each two produced: the JSON ones byte for byte across codecs, the Avro ones decoded with the writer schema from the registry, and JSON against
Avro field by field (card_id, score, risk_band, count, mean_amount; model_version differs by name).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

CODECS = ("none", "zstd", "lz4", "gzip")
FORMATS = ("json", "avro")
BUNDLES = {"json": "fraud-v1", "avro": "fraud-avro"}
FIELDS = ("card_id", "score", "risk_band", "count", "mean_amount")
WORK = C.OUT / "formats"
RATE_CEILING = 120_000  # rec/s no format/codec reaches through the daemon: sizes the input


def broker_bytes(topic: str) -> int:
    """Bytes of the topic's log segments on the local broker's disk (the broker of FAILOVERD_KAFKA_PORT)."""
    from daemon.kafka_local import LocalBroker

    data = LocalBroker(C.ROOT, C.KAFKA_PORT).data
    return sum(f.stat().st_size for d in data.glob(f"{topic}-*") if d.is_dir() for f in d.glob("*.log"))


def registry_url() -> str:
    from daemon.schema_registry_local import LocalSchemaRegistry, default_port

    return LocalSchemaRegistry(C.ROOT, default_port()).url


class Outputs:
    """One run's output twice over: byte for byte (JSON across codecs) and field by field (JSON against
    Avro), per partition in offset order; and the value bytes."""

    def __init__(self, fmt: str, decode_avro: "AvroDecoder") -> None:
        self.fmt, self.decode = fmt, decode_avro
        self.raw, self.fields = C.Seqs(), C.Seqs()
        self.bytes = 0

    @property
    def n(self) -> int:
        return self.raw.n

    def on_batch(self, partition: int, recs) -> None:
        for r in recs:
            self.bytes += len(r.value)
            self.raw.add(partition, hash(r.value))
            d = self.decode(r.value) if self.fmt == "avro" else orjson.loads(r.value)
            self.fields.add(partition, hash(tuple(d[f] for f in FIELDS)))

    async def read(self, topic: str) -> "Outputs":
        await C.scan(topic, self.on_batch)
        return self


async def run_one(fmt: str, codec: str, *, inputs: dict, plan: C.Plan, partitions: int, bundles: dict, url: str,
                  decode_avro: "AvroDecoder") -> dict:
    extra: dict = {"output": {"compression": codec}}
    if fmt == "avro":
        extra["inputs"] = {"format": "avro"}
        extra["output"]["format"] = "avro"
        extra["schema_registry"] = {"url": url}
    proc, names, group = await C.start_system(f"{fmt}-{codec}", inputs[fmt], partitions, WORK / "runs",
                                              bundle=bundles[fmt], daemon_extra=extra)
    try:
        res = await C.measure(proc, group, inputs[fmt], plan, name=f"{fmt}-{codec}")
    finally:
        proc.stop()
    disk: list[int] = []

    async def read(topic: str) -> Outputs:
        disk.append(broker_bytes(topic))  # before finish_run deletes the topic
        return await Outputs(fmt, decode_avro).read(topic)

    out = await C.finish_run(proc, names, group, inputs[fmt], exactly_once=True, name=f"{fmt}-{codec}",
                             collector=read)
    res.update(disk_bytes_per_record=disk[0] / max(1, out.n), value_bytes_per_record=out.bytes / max(1, out.n),
               log=str(proc.log_path), raw=out.raw, fields=out.fields)
    return res


class AvroDecoder:
    def __init__(self, url: str) -> None:
        from daemon.formats.registry import RegistryClient

        self.registry, self.writers = RegistryClient(url), {}

    def __call__(self, raw: bytes) -> dict:
        import fastavro

        from daemon.formats.avro import split

        sid, body = split(raw)
        if sid not in self.writers:
            self.writers[sid] = fastavro.parse_schema(json.loads(self.registry.schema_by_id(sid)))
        return fastavro.schemaless_reader(io.BytesIO(bytes(body)), self.writers[sid])


def check_round(r: int, runs: dict) -> str:
    """All runs of a round hold the same outputs (see the module doc), record by record over the part
    each two produced; returns a one-line summary."""
    try:
        ref_key = next(k for k in runs if k.startswith("json-"))
        ref = runs[ref_key]
        for key, res in runs.items():
            same = "raw" if key.startswith("json-") else "fields"  # JSON byte for byte; Avro field by field
            c = C.compare_seqs(res[same], ref[same])
            if c["problem"]:
                raise AssertionError(f"round {r + 1}: {key} and {ref_key}: outputs differ ({same}): {c['problem']}")
        return f"round {r + 1}: {len(runs)} runs' outputs identical ({', '.join(runs)})"
    finally:
        for res in runs.values():
            res.pop("raw", None)
            res.pop("fields", None)


async def produce_inputs(n: int, partitions: int, cards: int, url: str) -> tuple[dict, dict]:
    import fastavro

    from daemon.formats.avro import frame, schema_text
    from daemon.formats.registry import RegistryClient

    inputs = {fmt: C.unique(f"fmt-input-{fmt}") for fmt in FORMATS}
    await C.create_topics({t: partitions for t in inputs.values()})
    schema = json.loads((C.ROOT / "examples" / "bundles" / "fraud-avro" / "schemas" / "input.avsc").read_text())
    sid = RegistryClient(url).register(f"{inputs['avro']}-value", schema_text(schema))
    parsed = fastavro.parse_schema(schema)

    def fields(records) -> list:
        out = []
        for k, v in records:
            d = orjson.loads(v)
            out.append((k, {"card_id": d["card_id"], "merchant_id": d["merchant_id"], "amount": d["amount"],
                            "features": d["features"]}))
        return out

    def as_json(records) -> list:
        return [(k, orjson.dumps(d)) for k, d in fields(records)]

    def as_avro(records) -> list:
        out = []
        for k, d in fields(records):
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, parsed, d)
            out.append((k, frame(sid, buf.getvalue())))
        return out

    sizes = {}
    for fmt, encode in (("json", as_json), ("avro", as_avro)):
        sizes[fmt] = C.produce_stream(inputs[fmt], n, n_cards=cards, seed=42, encode=encode)["bytes_per_record"]
    return inputs, sizes


async def main(args) -> int:
    t_start = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    env = C.environment()
    url = registry_url()
    bundles = {fmt: C.build_bundle(C.ROOT / "examples" / "bundles" / b, WORK / "bundles") for fmt, b in BUNDLES.items()}
    plan = C.make_plan(args)
    codecs = args.codecs.split(",")
    systems = [f"{fmt}-{c}" for fmt in FORMATS for c in codecs]
    checks: list[str] = []
    decode = AvroDecoder(url)
    inputs, in_sizes = await produce_inputs(plan.records, args.partitions, args.cards, url)
    print(f"inputs: {plan.records:,} records, JSON {in_sizes['json']:.0f} bytes/record, Avro {in_sizes['avro']:.0f} "
          f"bytes/record (incl. the 5-byte wire header); registry {url}; {plan.describe()}", flush=True)

    async def run(system: str, _round: int) -> dict:
        fmt, codec = system.split("-")
        return await run_one(fmt, codec, inputs=inputs, plan=plan, partitions=args.partitions, bundles=bundles,
                             url=url, decode_avro=decode)

    def after_round(r: int, last: dict) -> str:
        checks.append(check_round(r, last))
        return checks[-1]

    try:
        results = await C.interleaved(systems, plan, run, after_round=after_round, describe=lambda res: (
            f"output on disk {res['disk_bytes_per_record']:6.1f} B/rec  values {res['value_bytes_per_record']:6.1f} B/rec"))
    finally:
        await C.delete_topics(list(inputs.values()))
    env["commit_end"] = C.environment()["commit"]
    took = (time.monotonic() - t_start) / 60
    import dataclasses

    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "results": results, "env": env,
                                                   "plan": dataclasses.asdict(plan), "in_sizes": in_sizes,
                                                   "checks": checks}, indent=1))
    report(results, codecs, plan, in_sizes, args, env, checks, took)
    return 0


def report(results, codecs, plan: C.Plan, in_sizes, args, env, checks, took) -> None:
    ref = "json-zstd" if "json-zstd" in results else next(iter(results))
    keys = list(results)

    def med(field: str):
        return lambda _k, rs: f"{C.stats([r[field] for r in rs])['median']:.1f}"

    table = C.rate_table(results, keys, lambda k: f"`{k}`", ref=ref, extra=(
        ("output topic on disk, bytes/record (median)", med("disk_bytes_per_record")),
        (f"on-disk ratio to {ref} (per-round median)",
         lambda k, rs: f"{C.ratio_stats(results, k, ref, 'disk_bytes_per_record')['median']:.2f}"),
        ("uncompressed value bytes/record", med("value_bytes_per_record")),
        ("CPU s / 100k records", C.median_of("cpu_per_100k"))))
    summary = []
    for c in codecs:
        if f"avro-{c}" in results and f"json-{c}" in results:
            rr = C.ratio_stats(results, f"avro-{c}", f"json-{c}")
            summary.append(f"- compression {c}: Avro runs at **{rr['median']:.2f}×** JSON (per-round "
                           f"{rr['min']:.2f}–{rr['max']:.2f})")
    for fmt in FORMATS:
        if f"{fmt}-none" in results:
            for c in codecs:
                if c != "none" and f"{fmt}-{c}" in results:
                    rr = C.ratio_stats(results, f"{fmt}-{c}", f"{fmt}-none")
                    dr = C.ratio_stats(results, f"{fmt}-{c}", f"{fmt}-none", "disk_bytes_per_record")
                    summary.append(f"- {fmt}, {c} vs none: throughput **{rr['median']:.2f}×** (per-round "
                                   f"{rr['min']:.2f}–{rr['max']:.2f}), output bytes on disk **{dr['median']:.2f}×**")
    print("\n" + table + "\n\n" + "\n".join(summary))
    for line in C.short_windows(results, plan):
        print(f"WARNING: {line}")
    body = [*C.section_head("## Avro vs JSON, and output compression (issue 15)\n", env, took),
            f"- workload: an input of {plan.records:,} card transactions ({args.cards:,} cards, key = card; the four fields of fraud-avro's "
            f"input.avsc: card_id, merchant_id, amount, 8 features), produced once as JSON "
            f"({in_sizes['json']:.0f} bytes/record) and once as Avro in the Confluent wire format "
            f"({in_sizes['avro']:.0f} bytes/record incl. the 5-byte header; schema in the local Apicurio registry, "
            f"`failoverd schema-registry up`), {args.partitions} partitions, same keys and partitions. "
            f"{plan.rounds} interleaved rounds of {', '.join(results)}.",
            C.method_md(plan),
            "- every system is the real daemon, exactly-once, checkpoint.interval_ms=100, subprocess worker: "
            "`json-*` runs fraud-v1 (format json), `avro-*` runs fraud-avro (the same model code; "
            "`[inputs] format = \"avro\"`, `[output] format = \"avro\"`, `[schema_registry] url`), with "
            "`[output] compression` = the codec named (zstd is the default).",
            "- *output topic on disk* = sizes of the output topic's log segment files in the broker's data "
            "directory after the run (record batches as the daemon's producer compressed them, plus transaction "
            "markers), divided by the records in it. *uncompressed value bytes* = the values' own length.",
            "- checks: every output topic held exactly one committed record per committed input and no dead letters; "
            "after every round all runs held the same outputs per partition in offset order, record by record over "
            "the part each two produced (JSON byte for byte across codecs; Avro decoded with the registry's writer "
            f"schema and compared to JSON field by field: {', '.join(FIELDS)}): {'; '.join(checks)}.",
            "- Shared 2-core machine: compare ratios within a round, not absolute rates.",
            "", table, "", *summary, "", C.per_round_md(results, keys)]
    C.publish_section("formats", body, C.BENCH / "formats_notes.md", write=not args.no_doc)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_method_args(ap, rate_ceiling=RATE_CEILING, input_args=True)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated subset of none,zstd,lz4,gzip")
    sys.exit(asyncio.run(main(ap.parse_args())))
