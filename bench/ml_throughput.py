"""Throughput of the ML example releases through failoverd, against the same model in a plain loop (issue 13).

    .venv/bin/python bench/ml_throughput.py                 # 30 s windows, 3 interleaved rounds (~20 min)
    .venv/bin/python bench/ml_throughput.py --quick --no-doc   # 5 s windows, 1 round (~2 min): review only

The releases: fraud-ml 1.0.0 (examples/bundles/fraud-ml-sklearn: a fitted scikit-learn pipeline,
joblib) and fraud-ml 1.1.0 (examples/bundles/fraud-ml-onnx: the same pipeline converted to ONNX,
ONNX Runtime). Both are built `--with-wheels` (as `failoverd demo --ml` builds them), so each runs
in an environment of its own built offline from the bundle's wheels.

Systems, run interleaved (sk-plain, sk-eos, onnx-plain, onnx-eos; then again):

  <rel>-eos    the failoverd daemon (`python -m daemon run --active-bundle <the .fdb>`), exactly-once,
               checkpoint.interval_ms=100, subprocess worker (the default): the daemon builds the
               release environment under `<state>/envs/<lock digest>-py311` and starts the worker on it.
  <rel>-plain  bench/plain_loop.py --workload model --bundle <the unpacked .fdb>: the same fitted model
               file, the release's own model class, the same batching (getmany max_records=1000 = the
               daemon's worker.max_batch_records, each batch fed to ``predict`` in waves of distinct
               keys as daemon/engine/batch.py does), input and output JSON-Schema validation, orjson;
               at-least-once (flush + commit every 100 ms), no transactions, changelog, checkpoints,
               headers, dead letters. **It runs on the release environment's own python**: this
               script builds that environment with the daemon's own code (daemon.bundle.environments
               .ensure_env, offline from the bundle's wheels, under bench/out/ml/envs), so numpy,
               scikit-learn / onnxruntime are exactly the release's pins; the Kafka client (aiokafka
               and its three pure-Python dependencies) and the worker runtime (orjson, jsonschema_rs,
               daemon.model: the daemon's runtime directory of symlinks, as its workers get) are
               appended to sys.path *after* the environment's site-packages
               (FAILOVERD_BENCH_APPEND_PATH), so nothing the release pins is shadowed. The release
               environment itself is not modified.

Method (bench/common.py, issue 17): each run is measured over a steady window of --seconds (30 s)
from its first commit; the input is sized for the faster system (--rate-ceiling). Then the output
topic is read back with read_committed: one record per committed input (eos; plain: at least that),
and after every round the outputs of `<rel>-plain` and `<rel>-eos` are compared **value by value**
(per partition, in offset order, decoded JSON equal, over the part both produced): a mismatch fails
the bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

RELEASES = {"sk": ("fraud-ml-sklearn", "fraud-ml 1.0.0, scikit-learn"),
            "onnx": ("fraud-ml-onnx", "fraud-ml 1.1.0, ONNX Runtime")}
WORK = C.OUT / "ml"
RATE_CEILING = 130_000  # rec/s neither system reaches with these releases (~90k measured): sizes the input
KAFKA_DISTS = ("aiokafka", "async_timeout", "typing_extensions", "packaging")


def kafka_path() -> Path:
    """A directory of symlinks to aiokafka and its dependencies from this (the daemon's) venv."""
    import importlib

    d = WORK / "kafka-path"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name in KAFKA_DISTS:
        mod = importlib.import_module(name)
        src = Path(mod.__file__)
        src = src.parent if src.name == "__init__.py" else src
        os.symlink(src, d / src.name)
    return d


def prepare(key: str, src: Path | None = None, work: Path = WORK) -> dict:
    """Build the release (``src``, default the example release ``key`` names) --with-wheels, open it,
    build its environment for the plain loop (bench/peers/run.py does the same for its peers)."""
    from daemon.bundle import build, environments
    from daemon.bundle.loader import open_bundle

    src = src or C.ROOT / "examples" / "bundles" / RELEASES[key][0]
    fdb = build(src, work / "dist", with_wheels=True).path
    t0 = time.monotonic()
    bundle = open_bundle(fdb, work / "unpacked")
    env = environments.ensure_env(bundle, work / "envs")
    runtime = environments.runtime_dir(work / "envs")
    pins = [str(p) for p in environments.pins_of(bundle)]
    print(f"{key}: {fdb.name}, environment {env} ({time.monotonic() - t0:.1f}s), pins {', '.join(pins)}", flush=True)
    return {"fdb": fdb, "root": bundle.root, "python": str(env / "bin" / "python"), "runtime": runtime,
            "pins": pins}


async def run_one(key: str, kind: str, rel: dict, *, input_topic: str, plan: C.Plan, partitions: int,
                  kpath: Path) -> dict:
    plain = kind == "plain"
    proc, names, group = await C.start_system(
        f"{key}-{kind}", input_topic, partitions, WORK / "runs", bundle=rel["fdb"],
        plain=["--workload", "model", "--bundle", str(rel["root"]), "--max-records", "1000"] if plain else None,
        py=rel["python"] if plain else C.PY,
        env={"FAILOVERD_BENCH_APPEND_PATH": os.pathsep.join([str(rel["runtime"]), str(kpath)])} if plain else None)
    try:
        res = await C.measure(proc, group, input_topic, plan, name=f"{key}-{kind}")
    finally:
        proc.stop()
    seqs = await C.finish_run(proc, names, group, input_topic, exactly_once=not plain, name=f"{key}-{kind}",
                              hasher=score_hash)
    res.update(seqs=seqs, log=str(proc.log_path))
    return res


SCORE_TOLERANCE = 1e-6
"""ONNX Runtime computes in float32, and its kernels are not batch-invariant: the same row can come out
one float32 ulp apart in a batch of another size, which the release's round(6) turns into a
difference of 1e-6 in ``score`` now and then. Batch boundaries depend on timing (getmany), so two
runs -- even two runs of the daemon -- cut the backlog differently. Such a value counts as equal
within tolerance (and is counted separately); any other difference fails the bench."""


def score_hash(partition: int, _key, value: bytes) -> tuple:
    """(partition, hash of every field but ``score``, score): compared per partition in offset order,
    every field equal after JSON decoding, the score within SCORE_TOLERANCE."""
    d = orjson.loads(value)
    score = d.pop("score")
    return partition, hash(tuple(sorted(d.items()))), score


async def main(args) -> int:
    keys = args.releases.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    env = C.environment()
    t_start = time.monotonic()
    rels = {k: prepare(k) for k in keys}
    kpath = kafka_path()
    plan = C.make_plan(args)
    input_topic = C.unique("ml-input")
    await C.create_topics({input_topic: args.partitions})
    systems = [f"{k}-{kind}" for k in keys for kind in ("plain", "eos")]
    checks: list[str] = []

    async def run(system: str, _round: int) -> dict:
        k, kind = system.split("-")
        return await run_one(k, kind, rels[k], input_topic=input_topic, plan=plan, partitions=args.partitions,
                             kpath=kpath)

    def after_round(r: int, last: dict) -> str:
        try:
            lines = []
            for k in keys:
                c = C.compare_seqs(last[f"{k}-eos"]["seqs"], last[f"{k}-plain"]["seqs"], tol=SCORE_TOLERANCE)
                if c["problem"]:
                    raise AssertionError(f"round {r + 1}: {k}-plain and {k}-eos outputs differ: {c['problem']} "
                                         f"({last[f'{k}-eos']['log']})")
                lines.append(f"round {r + 1} {k}: {c['exact']:,} of {c['compared']:,} identical" + (
                    f", {c['near']} equal but for score ±{SCORE_TOLERANCE:g}" if c["near"] else ""))
            checks.extend(lines)
            return "; ".join(lines)
        finally:
            for res in last.values():
                res.pop("seqs", None)

    try:
        made = C.produce_stream(input_topic, plan.records, n_cards=args.cards, seed=42)
        size = made["bytes_per_record"]
        print(f"input: {plan.records:,} records of {size:.0f} bytes avg, {args.partitions} partitions (produced in "
              f"{made['seconds']:.1f}s); {plan.describe()}")
        results = await C.interleaved(systems, plan, run, after_round=after_round)
    finally:
        await C.delete_topics([input_topic])
    env["commit_end"] = C.environment()["commit"]
    took = (time.monotonic() - t_start) / 60
    import dataclasses

    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "results": results, "env": env,
                                                   "plan": dataclasses.asdict(plan), "checks": checks}, indent=1,
                                                  default=str))
    report(results, keys, rels, plan, size, args, env, checks, took)
    return 0


def report(results, keys, rels, plan: C.Plan, size, args, env, checks, took) -> None:
    verdict = []
    systems = [f"{k}-{kind}" for k in keys for kind in ("plain", "eos")]

    def label(system: str) -> str:
        k, kind = system.split("-")
        return f"{RELEASES[k][1]}: " + ("plain aiokafka loop (same model, same batching)" if kind == "plain"
                                        else "failoverd exactly-once, subprocess worker")

    def vs_plain(system: str, _rs: list) -> str:  # the ratio to the plain loop of the same release
        return C.ratio_text(C.ratio_stats(results, system, f"{system.split('-')[0]}-plain"))

    for k in keys:
        rr = C.ratio_stats(results, f"{k}-eos", f"{k}-plain")
        verdict.append(f"- **{RELEASES[k][1]}**: failoverd exactly-once runs at **{rr['median']:.2f}×** the plain loop "
                       f"with the same model (per-round ratios {rr['min']:.2f}–{rr['max']:.2f}, {rr['n']} rounds).")
    table = C.rate_table(results, systems, label, extra=(
        ("ratio to the plain loop, same release: median of per-round (min–max)", vs_plain),
        ("from-start rec/s median", lambda _k, rs: C.fmt_rate(C.stats([r["e2e"] for r in rs])["median"])),
        ("startup s (median)", C.median_of("startup_s")), ("CPU s / 100k records", C.median_of("cpu_per_100k"))))
    print("\n" + table + "\n\n" + "\n".join(verdict))
    for line in C.short_windows(results, plan):
        print(f"WARNING: {line}")
    body = [*C.section_head("## ML releases' throughput (issue 13)\n", env, took),
            "- releases: " + "; ".join(f"{RELEASES[k][1]} (`{rels[k]['fdb'].name}`, built --with-wheels, pins "
                                        f"{', '.join(rels[k]['pins'])})" for k in keys),
            f"- workload: an input of {plan.records:,} JSON card transactions (avg {size:.0f} bytes, {args.cards:,} "
            f"cards, key = card) in one topic with {args.partitions} partitions, produced once; every run reads it into "
            f"a fresh output topic with a fresh group; {plan.rounds} interleaved rounds of {', '.join(results)}.",
            C.method_md(plan),
            "- `eos`: the real daemon (`python -m daemon run --active-bundle <.fdb>`), exactly-once, "
            "checkpoint.interval_ms=100, subprocess worker, max_batch_records=1000; the worker runs on the release "
            "environment the daemon builds under `<state>/envs/` (a fresh state directory per run: the environment "
            "is rebuilt offline from the bundle's wheels at every start, with a warm uv cache — in *startup*, not in "
            "*steady*). Outputs zstd-compressed (the `[output] compression` default).",
            "- `plain`: `bench/plain_loop.py --workload model --bundle <unpacked .fdb>` **run by the release "
            "environment's own python** (built by this script with the daemon's `ensure_env`, offline from the same "
            "wheels), so the model packages are exactly the release's pins; aiokafka (+ async_timeout, "
            "typing_extensions, packaging) and the worker runtime (orjson, jsonschema_rs, daemon.model) are appended "
            "to sys.path after the environment's site-packages, shadowing nothing it pins. Same fitted model file, "
            "the release's own class, getmany(max_records=1000) batches fed to `predict` in waves of distinct cards "
            "(as the daemon), input + output JSON-Schema validation; at-least-once (flush + commit every 100 ms), "
            "no transactions, changelog, checkpoints, headers or dead letters; no compression.",
            "- end of a run = its steady window or the end of the input; the output topic (read_committed) then "
            "holds exactly one record per committed input for `eos`, at least that many for `plain`, in every run. "
            "**Outputs checked value by value**: after every round the plain and the eos output of each release were "
            "compared per partition in offset order (decoded JSON), record by record over the part both produced: "
            f"{'; '.join(checks)}. Every field must be equal; the one allowance is `score` within "
            f"±{SCORE_TOLERANCE:g} (see the note below the table: ONNX Runtime's float32 kernels are not batch-"
            "invariant, and the batch boundaries of two runs differ).",
            "- *from start* = inputs committed ÷ (end of the window − process spawn): adds process start, environment "
            "check/build, model load, group join. CPU = user+system of the process tree (daemon + worker, or the "
            "plain loop), broker excluded. Shared 2-core machine: compare the ratios (same round), not the absolute "
            "rates.",
            "", table, "", *verdict, "", C.per_round_md(results, systems)]
    C.publish_section("ml-throughput", body, C.BENCH / "ml_throughput_notes.md", write=not args.no_doc)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_method_args(ap, rate_ceiling=RATE_CEILING, input_args=True)
    ap.add_argument("--releases", default="sk,onnx", help="comma-separated subset of sk,onnx")
    sys.exit(asyncio.run(main(ap.parse_args())))
