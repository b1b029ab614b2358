"""Avro vs JSON, and the output compression codecs, through the failoverd daemon (issue 15).

    .venv/bin/python bench/formats.py                  # 150k records, 3 interleaved rounds (~3-5 min)
    .venv/bin/python bench/formats.py --records 5000 --rounds 1 --no-doc   # a smoke run

One workload, two encodings: the same card transactions (card_id, merchant_id, amount, 8 features
-- the fields of fraud-avro's schemas/input.avsc) produced once as JSON (orjson) into one topic and
once as Avro (Confluent wire format, schema registered under ``<topic>-value`` in the local
Apicurio registry, `failoverd schema-registry up`) into another; same keys, same partitions.

Systems (each a real daemon, exactly-once, checkpoint.interval_ms=100, subprocess worker), run
interleaved, every round all of them:

  json-<codec>   fraud-v1 (fraud-scorer 1.0.0), [inputs]/[output] format = "json"
  avro-<codec>   fraud-avro (fraud-scorer-avro 1.0.0: fraud-v1's model code), format = "avro" both ways

with ``[output] compression`` = none, zstd (the default), lz4, gzip.

Measured per run: steady records/s (first to last commit of the input offsets), and the **bytes
the output topic takes on the broker**: the sizes of its partitions' log segment files in the
broker's data directory (.local/kafka/data/<topic>-<p>/*.log) after the run -- record batches as
the producer compressed them (topic compression.type = producer, the broker default) plus the
transaction markers. Also the sum of the uncompressed values (bytes/record).

Checks: every run's output topic holds exactly N committed records and no dead letters; after every
round, all runs hold the same outputs per partition in offset order: the JSON ones byte for byte
across codecs, the Avro ones decoded with the writer schema from the registry, and JSON against
Avro field by field (card_id, score, risk_band, count, mean_amount; model_version differs by name).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
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


def broker_bytes(topic: str) -> int:
    """Bytes of the topic's log segments on the local broker's disk."""
    data = C.ROOT / ".local" / "kafka" / "data"
    return sum(f.stat().st_size for d in data.glob(f"{topic}-*") if d.is_dir() for f in d.glob("*.log"))


def registry_url() -> str:
    from daemon.schema_registry_local import LocalSchemaRegistry, default_port

    return LocalSchemaRegistry(C.ROOT, default_port()).url


async def run_one(fmt: str, codec: str, *, inputs: dict, n: int, partitions: int, bundles: dict, url: str,
                  timeout: float) -> dict:
    tag = C.unique(f"{fmt}-{codec}")
    group, app = f"{tag}-g", f"{tag}-app"
    run_dir = WORK / "runs" / tag
    names = C.daemon_topics(f"{fmt}-{codec}", partitions)
    await C.create_daemon_topics(names, partitions)
    extra: dict = {"checkpoint": {"interval_ms": 100, "exactly_once": True}, "worker": {"mode": "subprocess"},
                   "output": {"compression": codec}}
    if fmt == "avro":
        extra["inputs"] = {"format": "avro"}
        extra["output"]["format"] = "avro"
        extra["schema_registry"] = {"url": url}
    cfg = C.write_config(run_dir / "failoverd.toml", input_topic=inputs[fmt], names=names,
                         state_dir=run_dir / "state", group=group, app=app, extra=extra)
    proc = C.Proc(C.daemon_argv(cfg, bundles[fmt]), run_dir / "process.log")
    try:
        t, cpu = await C.wait_for_inputs(proc, group, inputs[fmt], n, timeout=timeout, name=f"{fmt}-{codec}")
    finally:
        proc.stop()
    try:
        outputs = await C.read_all(names["output"], values=True, expect=n, timeout=60)
        dead = len(await C.read_all(names["dlq"], values=False))
        on_disk = broker_bytes(names["output"])
    finally:
        await C.delete_topics(list(names.values()))
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    if len(outputs) != n or dead:
        raise AssertionError(f"{fmt}-{codec}: {len(outputs)} committed outputs and {dead} dead letters for {n} inputs "
                             f"(log {proc.log_path})")
    by_part: dict[int, list] = {}
    for part, _off, _k, value, _h, _ts in sorted(outputs, key=lambda r: (r[0], r[1])):
        by_part.setdefault(part, []).append(value)
    steady, ok = C.steady_rate(t, n, proc.t_spawn)
    return {"steady": steady, "steady_ok": ok, "e2e": n / (t["t_end"] - proc.t_spawn),
            "cpu_per_100k": cpu / n * 100_000, "disk_bytes": on_disk,
            "value_bytes": sum(len(v) for vs in by_part.values() for v in vs), "log": str(proc.log_path),
            "parts": by_part}


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


def check_round(runs: dict, decode_avro: AvroDecoder, n: int) -> str:
    """All runs of a round hold the same outputs (see the module doc); returns a one-line summary."""
    ref_key = next(k for k in runs if k.startswith("json-"))
    ref = runs[ref_key]["parts"]
    ref_fields = {p: [tuple(orjson.loads(v)[f] for f in FIELDS) for v in vs] for p, vs in ref.items()}
    for key, res in runs.items():
        parts = res["parts"]
        if key.startswith("json-"):
            if parts != ref:
                raise AssertionError(f"{key} and {ref_key}: JSON outputs differ")
            continue
        for p, vs in parts.items():
            got = [tuple(decode_avro(v)[f] for f in FIELDS) for v in vs]
            if got != ref_fields.get(p):
                bad = next((i for i, (a, b) in enumerate(zip(got, ref_fields.get(p, []))) if a != b), None)
                raise AssertionError(f"{key} and {ref_key}: partition {p} differs (first at #{bad}: "
                                     f"{got[bad] if bad is not None else len(got)} vs "
                                     f"{ref_fields[p][bad] if bad is not None else len(ref_fields.get(p, []))})")
    return f"{len(runs)} runs × {n:,} outputs identical ({', '.join(runs)})"


async def produce_inputs(n: int, partitions: int, cards: int, url: str) -> tuple[dict, dict]:
    import fastavro

    from daemon.formats.avro import frame, schema_text
    from daemon.formats.registry import RegistryClient

    inputs = {fmt: C.unique(f"fmt-input-{fmt}") for fmt in FORMATS}
    await C.create_topics({t: partitions for t in inputs.values()})
    recs = []
    for k, v in C.transactions(n, n_cards=cards, seed=42):
        d = orjson.loads(v)
        recs.append((k, {"card_id": d["card_id"], "merchant_id": d["merchant_id"], "amount": d["amount"],
                         "features": d["features"]}))
    schema = json.loads((C.ROOT / "examples" / "bundles" / "fraud-avro" / "schemas" / "input.avsc").read_text())
    sid = RegistryClient(url).register(f"{inputs['avro']}-value", schema_text(schema))
    parsed = fastavro.parse_schema(schema)

    def avro(d: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, d)
        return frame(sid, buf.getvalue())

    encoded = {"json": [(k, orjson.dumps(d)) for k, d in recs], "avro": [(k, avro(d)) for k, d in recs]}
    sizes = {}
    for fmt in FORMATS:
        C.produce(inputs[fmt], encoded[fmt])
        sizes[fmt] = sum(len(v) for _, v in encoded[fmt]) / n
    return inputs, sizes


async def main(args) -> int:
    t_start = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    env = C.environment()
    url = registry_url()
    bundles = {fmt: C.build_bundle(C.ROOT / "examples" / "bundles" / b, WORK / "bundles") for fmt, b in BUNDLES.items()}
    n = args.records
    codecs = args.codecs.split(",")
    systems = [(fmt, c) for fmt in FORMATS for c in codecs]
    results: dict[str, list[dict]] = {f"{f}-{c}": [] for f, c in systems}
    checks = []
    decode = AvroDecoder(url)
    inputs, in_sizes = await produce_inputs(n, args.partitions, args.cards, url)
    print(f"inputs: {n} records, JSON {in_sizes['json']:.0f} bytes/record, Avro {in_sizes['avro']:.0f} bytes/record "
          f"(incl. the 5-byte wire header); registry {url}", flush=True)
    try:
        for r in range(args.rounds):
            for fmt, codec in systems:
                res = await run_one(fmt, codec, inputs=inputs, n=n, partitions=args.partitions, bundles=bundles,
                                    url=url, timeout=max(120.0, n / 500))
                results[f"{fmt}-{codec}"].append(res)
                print(f"round {r + 1}/{args.rounds} {fmt}-{codec:5s} steady {res['steady']:8,.0f} rec/s  from start "
                      f"{res['e2e']:8,.0f}  output on disk {res['disk_bytes'] / n:6.1f} B/rec  values "
                      f"{res['value_bytes'] / n:6.1f} B/rec  CPU {res['cpu_per_100k']:.1f}s/100k", flush=True)
            line = check_round({k: v[-1] for k, v in results.items()}, decode, n)
            checks.append(f"round {r + 1}: {line}")
            print(f"  check: {checks[-1]}", flush=True)
            for v in results.values():
                v[-1].pop("parts", None)
    finally:
        await C.delete_topics(list(inputs.values()))
    env["commit_end"] = C.environment()["commit"]
    took = (time.monotonic() - t_start) / 60
    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "results": results, "env": env,
                                                   "in_sizes": in_sizes, "checks": checks}, indent=1))
    report(results, codecs, n, in_sizes, args, env, checks, took)
    return 0


def report(results, codecs, n, in_sizes, args, env, checks, took) -> None:
    ref = "json-zstd" if "json-zstd" in results else next(iter(results))

    def per_round_ratio(a: str, b: str, field: str = "steady") -> dict:
        return C.stats([x[field] / y[field] for x, y in zip(results[a], results[b])])

    rows = []
    for key, rs in results.items():
        s = C.stats([r["steady"] for r in rs])
        rr = per_round_ratio(key, ref)
        disk = C.stats([r["disk_bytes"] / n for r in rs])
        rows.append([f"`{key}`", C.fmt_rate(s["median"]), C.fmt_rate(s["min"]), C.fmt_rate(s["max"]),
                     f"{rr['median']:.2f} ({rr['min']:.2f}–{rr['max']:.2f})",
                     f"{disk['median']:.1f}", f"{disk['median'] / C.stats([r['disk_bytes'] / n for r in results[ref]])['median']:.2f}",
                     f"{rs[0]['value_bytes'] / n:.1f}",
                     f"{C.stats([r['cpu_per_100k'] for r in rs])['median']:.1f}"])
    headers = ["system (format-compression)", "steady rec/s median", "min", "max",
               f"ratio to {ref}: median of per-round (min–max)", "output topic on disk, bytes/record (median)",
               f"on-disk ratio to {ref}", "uncompressed value bytes/record", "CPU s / 100k records"]
    table = C.md_table(headers, rows)
    summary = []
    for c in codecs:
        if f"avro-{c}" in results and f"json-{c}" in results:
            rr = per_round_ratio(f"avro-{c}", f"json-{c}")
            summary.append(f"- compression {c}: Avro runs at **{rr['median']:.2f}×** JSON (per-round "
                           f"{rr['min']:.2f}–{rr['max']:.2f})")
    for fmt in FORMATS:
        if f"{fmt}-none" in results:
            for c in codecs:
                if c != "none" and f"{fmt}-{c}" in results:
                    rr = per_round_ratio(f"{fmt}-{c}", f"{fmt}-none")
                    dr = per_round_ratio(f"{fmt}-{c}", f"{fmt}-none", "disk_bytes")
                    summary.append(f"- {fmt}, {c} vs none: throughput **{rr['median']:.2f}×** (per-round "
                                   f"{rr['min']:.2f}–{rr['max']:.2f}), output bytes on disk **{dr['median']:.2f}×**")
    per_round = ["| round | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for i in range(args.rounds):
        per_round.append(f"| {i + 1} | " + " | ".join(C.fmt_rate(v[i]["steady"]) for v in results.values()) + " |")
    print("\n" + table + "\n\n" + "\n".join(summary))
    body = ["## Avro vs JSON, and output compression (issue 15)\n",
            f"Command: `{C.command_line()}` (took {took:.1f} min)\n",
            C.env_block(env),
            f"- workload: {n:,} card transactions ({args.cards:,} cards, key = card; the four fields of fraud-avro's "
            f"input.avsc: card_id, merchant_id, amount, 8 features), produced once as JSON "
            f"({in_sizes['json']:.0f} bytes/record) and once as Avro in the Confluent wire format "
            f"({in_sizes['avro']:.0f} bytes/record incl. the 5-byte header; schema in the local Apicurio registry, "
            f"`failoverd schema-registry up`), {args.partitions} partitions, same keys and partitions. "
            f"{args.rounds} interleaved rounds of {', '.join(results)}.",
            "- every system is the real daemon, exactly-once, checkpoint.interval_ms=100, subprocess worker: "
            "`json-*` runs fraud-v1 (format json), `avro-*` runs fraud-avro (the same model code; "
            "`[inputs] format = \"avro\"`, `[output] format = \"avro\"`, `[schema_registry] url`), with "
            "`[output] compression` = the codec named (zstd is the default).",
            "- *output topic on disk* = sizes of the output topic's log segment files in the broker's data "
            "directory after the run (record batches as the daemon's producer compressed them, plus transaction "
            "markers), divided by N. *uncompressed value bytes* = the values' own length.",
            "- checks: every output topic held exactly N committed records and no dead letters; after every round "
            "all runs held the same outputs per partition in offset order (JSON byte for byte across codecs; Avro "
            "decoded with the registry's writer schema and compared to JSON field by field: "
            f"{', '.join(FIELDS)}): {'; '.join(checks)}.",
            "- *steady* = records after the first commit ÷ (last − first commit time). Shared 2-core machine: "
            "compare ratios within a round, not absolute rates.",
            "", table, "", *summary, "",
            "Steady rec/s of every run, in run order (each row one interleaved round):\n",
            "\n".join(per_round) + "\n"]
    C.publish_section("formats", body, C.BENCH / "formats_notes.md", write=not args.no_doc)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=150_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated subset of none,zstd,lz4,gzip")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    sys.exit(asyncio.run(main(ap.parse_args())))
