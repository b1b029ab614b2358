"""No-regression check of the data path (issue 14): the current engine against an older commit, side by side.

    .venv/bin/python bench/regression.py --ref e2fc212          # 30 s windows, 3 interleaved rounds (~12 min)
    .venv/bin/python bench/regression.py --ref e2fc212 --quick  # 5 s windows, 1 round (~1 min): review only

Ratios published months apart were measured on a machine that was loaded differently (this one is
shared), so "the ratio moved" cannot tell a regression from a quieter machine. This script runs
the old engine and the current one **in the same interleaved run**: the reference commit's tree is
exported with `git archive <ref>` into bench/out/regression/<ref>/ (read-only for the repository:
no checkout, no worktree) and run with that tree first on PYTHONPATH (its own daemon package and
its own worker; the same venv and packages).

Systems, interleaved every round: plain (bench/plain_loop.py --workload model, the current tree),
eos-ref (the reference commit's daemon, exactly-once, subprocess worker), eos-now (the current
daemon, same settings). Both daemons run fraud-v1, each built by its own code. Same input, same
method and checks as bench/throughput.py (steady windows of --seconds; one output per committed
input, no dead letters; outputs identical per partition to plain's, record by record).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

WORK = C.OUT / "regression"


def export(ref: str) -> tuple[Path, str, Path]:
    """(tree, full commit, fraud-v1 bundle built by that tree's code)."""
    full = subprocess.run(["git", "rev-parse", "--short", ref], cwd=C.ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    tree = WORK / full
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", full], cwd=C.ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    out = subprocess.run([C.PY, "-c", "import sys; from pathlib import Path; from daemon.bundle import build; "
                          "print(build(Path('examples/bundles/fraud-v1'), Path('dist')).path)"],
                         cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    return tree, full, Path(out)


async def run_one(key: str, *, tree: Path | None, bundle: Path, input_topic: str, plan: C.Plan,
                  partitions: int) -> dict:
    """plain (the current tree's plain loop), or a daemon: the reference tree's (``tree``, first on
    PYTHONPATH, run from there) or the current one."""
    proc, names, group = await C.start_system(
        key, input_topic, partitions, WORK / "runs", plain=["--workload", "model"] if key == "plain" else None,
        bundle=bundle, env={"PYTHONPATH": str(tree)} if tree else None, cwd=tree or C.ROOT)
    try:
        res = await C.measure(proc, group, input_topic, plan, name=key)
    finally:
        proc.stop()
    seqs = await C.finish_run(proc, names, group, input_topic, exactly_once=key != "plain", name=key)
    res.update(seqs=seqs, log=str(proc.log_path))
    return res


def check_round(r: int, last: dict) -> str:
    """eos-ref's and eos-now's outputs = plain's, per partition, record by record over the part both produced."""
    try:
        done = []
        for k in ("eos-ref", "eos-now"):
            c = C.compare_seqs(last[k]["seqs"], last["plain"]["seqs"])
            if c["problem"]:
                raise AssertionError(f"round {r + 1}: {k}'s outputs differ from plain's: {c['problem']} "
                                     f"({last[k]['log']})")
            done.append(f"{k} ({c['compared']:,})")
        return f"round {r + 1}: outputs of {' and '.join(done)} identical to plain's per partition"
    finally:
        for res in last.values():
            res.pop("seqs", None)


async def main(args) -> int:
    t_start = time.monotonic()
    env = C.environment()
    tree, ref, ref_bundle = export(args.ref)
    now_bundle = C.build_bundle(C.ROOT / "examples" / "bundles" / "fraud-v1", WORK / "dist-now")
    plan = C.make_plan(args)
    keys = ["plain", "eos-ref", "eos-now"]
    input_topic = C.unique("regress-input")
    await C.create_topics({input_topic: args.partitions})
    try:
        C.produce_stream(input_topic, plan.records, n_cards=10_000, seed=42)
        print(f"input: {plan.records:,} records; {plan.describe()}", flush=True)

        async def run(k: str, _round: int) -> dict:
            return await run_one(k, tree=tree if k == "eos-ref" else None,
                                 bundle=ref_bundle if k == "eos-ref" else now_bundle,
                                 input_topic=input_topic, plan=plan, partitions=args.partitions)

        results = await C.interleaved(keys, plan, run, after_round=check_round)
    finally:
        await C.delete_topics([input_topic])
    took = (time.monotonic() - t_start) / 60
    import dataclasses
    import json

    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "ref": ref, "env": env, "results": results,
                                                   "plan": dataclasses.asdict(plan)}, indent=1))
    table = C.rate_table(results, keys, ref="plain", extra=(
        (f"ratio to eos-ref ({ref}): median of per-round (min–max)",
         lambda _k, rs: C.ratio_text(C.stats([a["rate"] / b["rate"] for a, b in zip(rs, results["eos-ref"])]))),
        ("CPU s / 100k", C.median_of("cpu_per_100k"))))
    print(f"\nCommand: `{C.command_line()}` (took {took:.1f} min); reference {ref}, current {env['commit']}\n")
    print(C.method_md(plan) + "\n")
    print(table + "\n\n" + C.per_round_table(results, keys))
    for line in C.short_windows(results, plan):
        print(f"WARNING: {line}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="the commit to compare against (e.g. the published run's)")
    C.add_method_args(ap, rate_ceiling=150_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--no-doc", action="store_true", help="accepted for bench/run_all.py: this script never writes the doc")
    sys.exit(asyncio.run(main(ap.parse_args())))
