"""``[worker] processes = N`` on a model-bound workload: 1 process against 2 (issue 17, target 2).

    .venv/bin/python bench/processes.py                     # 30 s windows, 3 interleaved rounds (~6 min)
    .venv/bin/python bench/processes.py --quick --no-doc    # a smoke run (~2-3 min): not a measurement

The model (written and built by this script into bench/out/processes/): a per-card count (state)
plus numpy work of about ``--work`` elements of ``sin`` and a sum per record, ~0.5 ms on this
machine for the default 32768: far more than the daemon's own work per record (fetch, triage, state
store, framing, produce, transactions: tens of microseconds), so the model process is the
bottleneck -- the case ``processes`` is for. Element-wise numpy runs on one thread (no BLAS), so a
worker process uses one core and 1 vs 2 processes is 1 vs 2 cores of model time. The per-record
cost is measured in this process before the runs and reported.

Systems, run interleaved (p1, p2; p1, p2; ...): the real daemon (`python -m daemon run`),
exactly-once, checkpoint.interval_ms=100, subprocess workers, max_batch_records=1000, with
``[worker] processes`` = 1 or 2; each run reads the same input topic (4 partitions, produced once)
with a fresh group into fresh output topics, measured over the steady window of bench/common.py.

Checks after every run (a failure stops the bench): the daemon is stopped with SIGTERM (final
checkpoint); then the output topic, read with read_committed, holds **exactly one output per
committed input** (source headers: every position below each partition's committed offset once,
none above), no dead letters, and per (partition, card) the counts run 1, 2, 3... in source order
(state exact, per-key order kept); after every round the two systems' outputs for the inputs both
committed are compared value by value.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

WORK = C.OUT / "processes"
SYSTEMS = {"p1": 1, "p2": 2}

MODEL = '''\
"""Benchmark model (bench/processes.py): a per-card count plus ~WORK elements of numpy work per record."""
import numpy as np

from daemon.model import Prediction

WORK = {work}


class Busy:
    def __init__(self, context=None):
        self.base = np.linspace(0.0, 1.0, WORK)

    def predict(self, batch):
        out = []
        base = self.base
        for r in batch:
            n = (r.state or {{}}).get("count", 0) + 1
            x = np.sin(base * (1.0 + (r.value["seq"] % 1000) * 1e-3))
            out.append(Prediction({{"card_id": r.value["card_id"], "seq": r.value["seq"], "count": n,
                                    "score": round(float(x.sum()), 6)}}, {{"count": n}}))
        return out
'''

BUNDLE_TOML = """\
[bundle]
name = "processes-bench"
version = "1.0.0"
entrypoint = "model:Busy"
python = "3.11"
state_schema_version = 1

[schemas]
input = "schemas/input.json"
output = "schemas/output.json"

[dependencies]
lock = "requirements.lock"
"""


def build(work: int) -> Path:
    """The benchmark bundle. Its lock is empty, so the worker runs on the daemon's interpreter, whose
    numpy it imports (a pinned lock would build a release environment first; not what is measured)."""
    src = WORK / f"src-{work}"
    shutil.rmtree(src, ignore_errors=True)
    (src / "code").mkdir(parents=True)
    (src / "schemas").mkdir()
    (src / "code" / "model.py").write_text(MODEL.format(work=work))
    (src / "schemas" / "input.json").write_text(json.dumps({"type": "object", "required": ["card_id", "seq"]}))
    (src / "schemas" / "output.json").write_text(json.dumps({"type": "object", "required": ["count"]}))
    (src / "requirements.lock").write_text("# numpy comes from the daemon's interpreter (empty lock)\n")
    (src / "bundle.toml").write_text(BUNDLE_TOML)
    return C.build_bundle(src, WORK / "dist")


def model_cost_ms(work: int, records: list[tuple[bytes, bytes]]) -> float:
    """The model's predict per record, in this process (best of 3 over 300 records)."""
    from daemon.model import Record

    scope: dict = {}
    exec(compile(MODEL.format(work=work), "model.py", "exec"), scope)  # noqa: S102 - our own model source
    model = scope["Busy"]()
    batch = [Record(k.decode(), orjson.loads(v), None) for k, v in records[:300]]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        model.predict(batch)
        best = min(best, (time.perf_counter() - t0) / len(batch))
    return best * 1000


async def committed_by_partition(group: str, topic: str) -> dict[int, int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=C.BOOTSTRAP, request_timeout_ms=5000)
    await admin.start()
    try:
        offs = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: max(0, o.offset) for tp, o in offs.items() if tp.topic == topic}


def verify(key: str, outputs: list, dead: int, committed: dict[int, int]) -> dict[tuple[int, int], bytes]:
    """Exactly one output per committed input, counts 1, 2, 3... per (partition, card); returns the
    output value by input position."""
    from daemon.engine import headers as H

    by_pos: dict[tuple[int, int], bytes] = {}
    dups = 0
    for _part, _off, _k, value, headers, _ts in outputs:
        h = dict(headers)
        pos = (int(h[H.H_SOURCE_PARTITION]), int(h[H.H_SOURCE_OFFSET]))
        dups += pos in by_pos
        by_pos[pos] = value
    want = {(p, o) for p, end in committed.items() for o in range(end)}
    missing, extra = want - set(by_pos), set(by_pos) - want
    if dups or missing or extra or dead:
        raise AssertionError(f"{key}: not exactly once: {dups} duplicated, {len(missing)} missing (e.g. "
                             f"{sorted(missing)[:3]}), {len(extra)} beyond the committed offsets (e.g. "
                             f"{sorted(extra)[:3]}), {dead} dead letters; committed {committed}")
    counts: dict[tuple[int, str], int] = collections.defaultdict(int)
    for (part, _off), value in sorted(by_pos.items()):
        v = orjson.loads(value)
        counts[(part, v["card_id"])] += 1
        if v["count"] != counts[(part, v["card_id"])]:
            raise AssertionError(f"{key}: card {v['card_id']} of partition {part}: count {v['count']}, expected "
                                 f"{counts[(part, v['card_id'])]} (state not exact)")
    return by_pos


async def run_one(key: str, fdb: Path, input_topic: str, plan: C.Plan, partitions: int) -> dict:
    tag = C.unique(f"proc-{key}")
    group, app = f"{tag}-g", f"{tag}-app"
    run_dir = WORK / "runs" / tag
    names = C.daemon_topics(f"proc-{key}", partitions)
    await C.create_daemon_topics(names, partitions)
    cfg = C.write_config(run_dir / "failoverd.toml", input_topic=input_topic, names=names,
                         state_dir=run_dir / "state", group=group, app=app,
                         extra={"checkpoint": {"interval_ms": 100, "exactly_once": True},
                                "worker": {"mode": "subprocess", "processes": SYSTEMS[key],
                                           "max_batch_records": 1000}})
    proc = C.Proc(C.daemon_argv(cfg, fdb), run_dir / "daemon.log")
    try:
        first = asyncio.get_running_loop().create_task(at_first_commit(proc, group, input_topic))
        try:
            res = await C.measure(proc, group, input_topic, plan, name=key)
        finally:
            first.cancel()
        cpu_end, tree_end = daemon_cpu(proc.pid), C.tree_cpu(proc.pid)
        if first.done() and not first.cancelled():
            cpu0, tree0, c0 = first.result()
            res["daemon_cpu_per_100k"] = (cpu_end - cpu0) / max(1, res["committed"] - c0) * 100_000
            res["cores"] = (tree_end - tree0) / max(1e-9, res["window_s"])
        else:
            res["daemon_cpu_per_100k"] = res["cores"] = float("nan")
        code = proc.stop()
        if code != 0:
            raise AssertionError(f"{key}: the daemon exited {code} on SIGTERM (log {proc.log_path})")
        committed = await committed_by_partition(group, input_topic)
        outputs = await C.read_all(names["output"], values=True, expect=sum(committed.values()), timeout=120)
        dead = len(await C.read_all(names["dlq"], values=False))
        res["by_pos"] = verify(key, outputs, dead, committed)
        res["verified"] = sum(committed.values())
    finally:
        proc.stop()
        await C.delete_topics(list(names.values()))
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    return res


async def at_first_commit(proc: C.Proc, group: str, topic: str) -> tuple[float, float, int]:
    """(the daemon's CPU seconds, its process tree's, inputs committed) at its first commit: the
    steady window's start, so start-up (imports, model load, group join) is not counted."""
    async with C.GroupWatcher(group, topic) as w:
        while True:
            c = await w.committed()
            if c > 0:
                return daemon_cpu(proc.pid), C.tree_cpu(proc.pid), c
            await asyncio.sleep(0.05)


def daemon_cpu(pid: int) -> float:
    """User+system CPU seconds of the daemon process alone (its workers excluded)."""
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        return float("nan")


async def main(args) -> int:
    plan = C.make_plan(args, quick_records=45_000, rounds=3)
    WORK.mkdir(parents=True, exist_ok=True)
    env = C.environment()
    t_start = time.monotonic()
    fdb = build(args.work)
    input_topic = C.unique("proc-input")
    await C.create_topics({input_topic: args.partitions})
    keys = list(SYSTEMS)
    checks: list[str] = []
    try:
        records = C.transactions(plan.records, n_cards=args.cards, seed=42)
        cost = model_cost_ms(args.work, records)
        secs = C.produce(input_topic, records)
        del records
        print(f"model: {cost:.3f} ms per record in predict (measured here); input {plan.records:,} records, "
              f"{args.partitions} partitions (produced in {secs:.1f}s); {plan.describe()}", flush=True)

        def after_round(r: int, got: dict) -> str:
            a, b = got["p1"].pop("by_pos"), got["p2"].pop("by_pos")
            both = set(a) & set(b)
            differ = [p for p in both if a[p] != b[p]]
            if differ:
                raise AssertionError(f"round {r + 1}: p1 and p2 outputs differ at {len(differ)} inputs, e.g. "
                                     f"{sorted(differ)[:3]}")
            ratio = got["p2"]["rate"] / got["p1"]["rate"]
            line = (f"round {r + 1}: exactly once in both ({got['p1']['verified']:,} and {got['p2']['verified']:,} "
                    f"committed inputs), counts exact; {len(both):,} outputs identical; p2/p1 = {ratio:.2f}")
            checks.append(line)
            return line

        results = await C.interleaved(keys, plan, lambda k, r: run_one(k, fdb, input_topic, plan, args.partitions),
                                      after_round=after_round,
                                      describe=lambda res: (f"daemon CPU {res['daemon_cpu_per_100k']:.1f}s/100k, "
                                                            f"cores used {res['cores']:.2f}"))
    finally:
        await C.delete_topics([input_topic])
    took = (time.monotonic() - t_start) / 60
    ratio = C.ratio_stats(results, "p2", "p1")
    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "results": results, "env": env, "checks": checks,
                                                   "model_ms": cost}, indent=1, default=str))
    report(results, plan, env, checks, cost, ratio, took, args)
    return 0


def report(results: dict, plan: C.Plan, env: dict, checks: list[str], cost: float, ratio: dict, took: float,
           args) -> None:
    label = {"p1": "failoverd exactly-once, `processes = 1`", "p2": "failoverd exactly-once, `processes = 2`"}
    table = C.rate_table(results, list(SYSTEMS), label=lambda k: label[k], ref="p1", ref_name="processes = 1",
                         extra=(("cores used in the window (median)", C.median_of("cores", "{:.2f}")),
                                ("daemon CPU s / 100k (median)", C.median_of("daemon_cpu_per_100k")),
                                ("CPU s / 100k, daemon + workers (median)", C.median_of("cpu_per_100k"))))
    met = ratio["n"] and ratio["median"] >= 1.6
    verdict = (f"**processes = 2 ÷ processes = 1: {C.ratio_text(ratio)}** (median of per-round ratios, min–max) — "
               f"target ≥ 1.6×: {'MET' if met else 'NOT MET'}" + (" (a --quick run: not a measurement)" if plan.quick
                                                                  else ""))
    print("\n" + table + "\n\n" + verdict)
    for w in C.short_windows(results, plan):
        print("warning: " + w)
    body = [*C.section_head("## More cores: `[worker] processes` (issue 17, target 2)\n", env, took),
            f"- workload: a model-bound release built by the script: a per-card count (state) plus numpy "
            f"`sin` over {args.work:,} elements and a sum per record, **{cost:.2f} ms per record** in `predict` "
            f"(measured before the runs); JSON card transactions, {args.cards:,} cards (key = card), one input topic "
            f"with {args.partitions} partitions, produced once; every run reads it with a fresh group into fresh "
            "topics.",
            "- systems: the real daemon, exactly-once, checkpoint.interval_ms=100, subprocess workers, "
            "max_batch_records=1000, `[worker] processes` = 1 or 2 (a batch split by key hash over the processes).",
            C.method_md(plan),
            "- checks: after SIGTERM, every committed input has exactly one committed output (read_committed, by "
            "source headers), no dead letters, per (partition, card) counts 1, 2, 3... in source order; per round the "
            "two systems' outputs are compared value by value: " + "; ".join(checks) + ".",
            "- *cores used*: CPU seconds of the daemon and its workers during the window ÷ the window: what the "
            "machine gave the run. `processes = 2` can only reach 2× when it gets about twice the cores; on a "
            "machine shared with other work it may not.",
            "", table, "", verdict, "", C.per_round_table(results, list(SYSTEMS)), ""]
    C.publish_section("processes", body, C.BENCH / "processes_notes.md", write=not args.no_doc)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=textwrap.dedent(__doc__).split("\n\n")[0])
    C.add_method_args(ap, quick_records=45_000, rate_ceiling=6_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--cards", type=int, default=2_000)
    ap.add_argument("--work", type=int, default=32_768, help="numpy elements per record (default ~0.5 ms)")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    sys.exit(asyncio.run(main(ap.parse_args())))
