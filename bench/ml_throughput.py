"""Throughput of the ML example releases through failoverd, against the same model in a plain loop (issue 13).

    .venv/bin/python bench/ml_throughput.py                 # 150k records, 3 interleaved rounds (~5 min)
    .venv/bin/python bench/ml_throughput.py --records 5000 --rounds 1 --no-doc   # a smoke run

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

A run is over when the group's committed input offsets reach N. Then the output topic is read
back with read_committed: it must hold exactly N records, and after every round the outputs of
`<rel>-plain` and `<rel>-eos` are compared **value by value** (per partition, in offset order,
decoded JSON equal): a mismatch fails the bench.
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


def prepare(key: str) -> dict:
    """Build the release --with-wheels, open it, build its environment for the plain loop."""
    from daemon.bundle import build, environments
    from daemon.bundle.loader import open_bundle

    src = C.ROOT / "examples" / "bundles" / RELEASES[key][0]
    fdb = build(src, WORK / "dist", with_wheels=True).path
    t0 = time.monotonic()
    bundle = open_bundle(fdb, WORK / "unpacked")
    env = environments.ensure_env(bundle, WORK / "envs")
    runtime = environments.runtime_dir(WORK / "envs")
    pins = [str(p) for p in environments.pins_of(bundle)]
    print(f"{key}: {fdb.name}, environment {env} ({time.monotonic() - t0:.1f}s), pins {', '.join(pins)}", flush=True)
    return {"fdb": fdb, "root": bundle.root, "python": str(env / "bin" / "python"), "runtime": runtime,
            "pins": pins}


async def run_one(key: str, kind: str, rel: dict, *, input_topic: str, n: int, partitions: int, timeout: float,
                  kpath: Path) -> dict:
    tag = C.unique(f"{key}-{kind}")
    group, app = f"{tag}-g", f"{tag}-app"
    run_dir = WORK / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    env = None
    if kind == "plain":
        names = {"output": f"{tag}-output"}
        await C.create_topics({names["output"]: partitions})
        argv = [rel["python"], str(C.BENCH / "plain_loop.py"), "--bootstrap", C.BOOTSTRAP, "--input", input_topic,
                "--output", names["output"], "--group", group, "--workload", "model", "--bundle", str(rel["root"]),
                "--max-records", "1000"]
        env = {"FAILOVERD_BENCH_APPEND_PATH": os.pathsep.join([str(rel["runtime"]), str(kpath)])}
    else:
        names = C.daemon_topics(f"{key}-{kind}", partitions)
        await C.create_daemon_topics(names, partitions)
        cfg = C.write_config(run_dir / "failoverd.toml", input_topic=input_topic, names=names,
                             state_dir=run_dir / "state", group=group, app=app,
                             extra={"checkpoint": {"interval_ms": 100, "exactly_once": True},
                                    "worker": {"mode": "subprocess"}})
        argv = C.daemon_argv(cfg, rel["fdb"])
    proc = C.Proc(argv, run_dir / "process.log", env=env)
    try:
        t, cpu = await C.wait_for_inputs(proc, group, input_topic, n, timeout=timeout, name=f"{key}-{kind}")
    finally:
        proc.stop()
    try:
        outputs = await C.read_all(names["output"], values=True, expect=n, timeout=60)
        dead = len(await C.read_all(names["dlq"], values=False)) if "dlq" in names else 0
    finally:
        await C.delete_topics(list(names.values()))
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    if len(outputs) != n or dead:
        raise AssertionError(f"{key}-{kind}: {len(outputs)} committed outputs and {dead} dead letters for {n} inputs "
                             f"(log {proc.log_path})")
    by_part: dict[int, list] = {}
    for part, _off, _k, value, _h, _ts in sorted(outputs, key=lambda r: (r[0], r[1])):
        by_part.setdefault(part, []).append(value)
    steady, ok = C.steady_rate(t, n, proc.t_spawn)
    return {"steady": steady, "steady_ok": ok, "e2e": n / (t["t_end"] - proc.t_spawn),
            "startup_s": t["t_first"] - proc.t_spawn, "cpu_per_100k": cpu / n * 100_000, "log": str(proc.log_path),
            "parts": by_part}


SCORE_TOLERANCE = 1e-6
"""ONNX Runtime computes in float32, and its kernels are not batch-invariant: the same row can come out
one float32 ulp apart in a batch of another size, which the release's round(6) turns into a
difference of 1e-6 in ``score`` now and then. Batch boundaries depend on timing (getmany), so two
runs -- even two runs of the daemon -- cut the backlog differently. Such a value counts as equal
within tolerance (and is counted separately); any other difference fails the bench."""


def compare(a: dict, b: dict) -> tuple[int, int, int, str]:
    """(values compared, values exactly equal, values equal but for ``score`` within SCORE_TOLERANCE,
    first other difference or "") of two runs' outputs, per partition in offset order, decoded JSON."""
    compared = exact = near = 0
    first = ""
    for part in sorted(set(a) | set(b)):
        xs, ys = a.get(part, []), b.get(part, [])
        if len(xs) != len(ys):
            first = first or f"partition {part}: {len(xs)} vs {len(ys)} records"
        for i, (x, y) in enumerate(zip(xs, ys)):
            compared += 1
            if x == y:
                exact += 1
                continue
            dx, dy = orjson.loads(x), orjson.loads(y)
            if dx == dy:
                exact += 1
            elif ({k: v for k, v in dx.items() if k != "score"} == {k: v for k, v in dy.items() if k != "score"}
                  and abs(dx["score"] - dy["score"]) <= SCORE_TOLERANCE + 1e-12):
                near += 1
            else:
                first = first or f"partition {part} #{i}: {x[:200]!r} vs {y[:200]!r}"
    return compared, exact, near, first


async def main(args) -> int:
    keys = args.releases.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    env = C.environment()
    t_start = time.monotonic()
    rels = {k: prepare(k) for k in keys}
    kpath = kafka_path()
    n = args.records
    input_topic = C.unique("ml-input")
    await C.create_topics({input_topic: args.partitions})
    timeout = max(120.0, n / 500)
    systems = [(k, kind) for k in keys for kind in ("plain", "eos")]
    results: dict[str, list[dict]] = {f"{k}-{kind}": [] for k, kind in systems}
    checks: list[str] = []
    try:
        records = C.transactions(n, n_cards=args.cards, seed=42)
        size = sum(len(v) for _, v in records) / n
        secs = C.produce(input_topic, records)
        del records
        print(f"input: {n} records of {size:.0f} bytes avg, {args.partitions} partitions (produced in {secs:.1f}s)")
        for r in range(args.rounds):
            for k, kind in systems:
                res = await run_one(k, kind, rels[k], input_topic=input_topic, n=n, partitions=args.partitions,
                                    timeout=timeout, kpath=kpath)
                results[f"{k}-{kind}"].append(res)
                print(f"round {r + 1}/{args.rounds} {k}-{kind:5s} steady {res['steady']:8,.0f} rec/s  from start "
                      f"{res['e2e']:8,.0f} rec/s  startup {res['startup_s']:.1f}s  CPU {res['cpu_per_100k']:.1f}s/100k",
                      flush=True)
            for k in keys:
                compared, exact, near, first = compare(results[f"{k}-plain"][-1]["parts"],
                                                       results[f"{k}-eos"][-1]["parts"])
                if first or compared != n:
                    raise AssertionError(f"round {r + 1}: {k}-plain and {k}-eos outputs differ ({compared} of {n} "
                                         f"compared, {exact} equal, {near} within {SCORE_TOLERANCE} in score); "
                                         f"first: {first}")
                line = f"round {r + 1} {k}: {exact:,} of {compared:,} identical" + (
                    f", {near} equal but for score ±{SCORE_TOLERANCE:g}" if near else "")
                checks.append(line)
                print(f"  check: {line}", flush=True)
            for k, kind in systems:
                results[f"{k}-{kind}"][-1].pop("parts", None)
    finally:
        await C.delete_topics([input_topic])
    env["commit_end"] = C.environment()["commit"]
    took = (time.monotonic() - t_start) / 60
    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "results": results, "env": env,
                                                   "checks": checks}, indent=1, default=str))
    report(results, keys, rels, n, size, args, env, checks, took)
    return 0


def report(results, keys, rels, n, size, args, env, checks, took) -> None:
    rows = []
    verdict = []
    for k in keys:
        base = results[f"{k}-plain"]
        for kind in ("plain", "eos"):
            rs = results[f"{k}-{kind}"]
            s = C.stats([r["steady"] for r in rs])
            e = C.stats([r["e2e"] for r in rs])
            ratios = C.stats([a["steady"] / b["steady"] for a, b in zip(rs, base)])
            label = f"{RELEASES[k][1]}: " + ("plain aiokafka loop (same model, same batching)" if kind == "plain"
                                              else "failoverd exactly-once, subprocess worker")
            rows.append([label, C.fmt_rate(s["median"]), C.fmt_rate(s["min"]), C.fmt_rate(s["max"]),
                         f"{ratios['median']:.2f} ({ratios['min']:.2f}–{ratios['max']:.2f})",
                         C.fmt_rate(e["median"]), f"{C.stats([r['startup_s'] for r in rs])['median']:.1f}",
                         f"{C.stats([r['cpu_per_100k'] for r in rs])['median']:.1f}"])
        rr = C.stats([a["steady"] / b["steady"] for a, b in zip(results[f"{k}-eos"], base)])
        verdict.append(f"- **{RELEASES[k][1]}**: failoverd exactly-once runs at **{rr['median']:.2f}×** the plain loop "
                       f"with the same model (per-round ratios {rr['min']:.2f}–{rr['max']:.2f}, {len(base)} rounds).")
    headers = ["system", "steady rec/s median", "min", "max", "ratio to the plain loop, same release: median of "
               "per-round (min–max)", "from-start rec/s median", "startup s (median)", "CPU s / 100k records"]
    table = C.md_table(headers, rows)
    per_round = ["| round | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for i in range(args.rounds):
        per_round.append(f"| {i + 1} | " + " | ".join(C.fmt_rate(v[i]["steady"]) for v in results.values()) + " |")
    print("\n" + table + "\n\n" + "\n".join(verdict))
    body = ["## ML releases' throughput (issue 13)\n",
            f"Command: `{C.command_line()}` (took {took:.1f} min)\n",
            C.env_block(env),
            "- releases: " + "; ".join(f"{RELEASES[k][1]} (`{rels[k]['fdb'].name}`, built --with-wheels, pins "
                                        f"{', '.join(rels[k]['pins'])})" for k in keys),
            f"- workload: {n:,} JSON card transactions (avg {size:.0f} bytes, {args.cards:,} cards, key = card) in one "
            f"topic with {args.partitions} partitions, produced once; every run reads all of it into a fresh output "
            f"topic with a fresh group; {args.rounds} interleaved rounds of {', '.join(results)}.",
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
            "- end of a run = committed input offsets reach N; the output topic then holds exactly N records "
            "(read_committed) in every run. **Outputs checked value by value**: after every round the plain "
            "and the eos output of each release were compared per partition in offset order (decoded JSON): "
            f"{'; '.join(checks)}. Every field must be equal; the one allowance is `score` within "
            f"±{SCORE_TOLERANCE:g} (see the note below the table: ONNX Runtime's float32 kernels are not batch-"
            "invariant, and the batch boundaries of two runs differ).",
            "- *steady* = records after the first commit ÷ (last − first commit time); *from start* adds process "
            "start, environment check/build, model load, group join. CPU = user+system of the process tree "
            "(daemon + worker, or the plain loop), broker excluded. Shared 2-core machine: compare the ratios "
            "(same round), not the absolute rates.",
            "", table, "", *verdict, "",
            "Steady rec/s of every run, in run order (each row one interleaved round):\n",
            "\n".join(per_round) + "\n"]
    C.publish_section("ml-throughput", body, C.BENCH / "ml_throughput_notes.md", write=not args.no_doc)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=150_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--releases", default="sk,onnx", help="comma-separated subset of sk,onnx")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    sys.exit(asyncio.run(main(ap.parse_args())))
