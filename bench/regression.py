"""No-regression check of the data path (issue 14): the current engine against an older commit, side by side.

    .venv/bin/python bench/regression.py --ref e2fc212          # 100k records, 3 interleaved rounds (~2 min)

Ratios published months apart were measured on a machine that was loaded differently (this one is
shared), so "the ratio moved" cannot tell a regression from a quieter machine. This script runs
the old engine and the current one **in the same interleaved run**: the reference commit's tree is
exported with `git archive <ref>` into bench/out/regression/<ref>/ (read-only for the repository:
no checkout, no worktree) and run with that tree first on PYTHONPATH (its own daemon package and
its own worker; the same venv and packages).

Systems, interleaved every round: plain (bench/plain_loop.py --workload model, the current tree),
eos-ref (the reference commit's daemon, exactly-once, subprocess worker), eos-now (the current
daemon, same settings). Both daemons run fraud-v1, each built by its own code. Same input, same
checks as bench/throughput.py (N committed outputs, no dead letters; outputs identical per partition
to plain's).
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
from bench.throughput import partition_digests  # noqa: E402

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


async def run_one(key: str, *, tree: Path | None, bundle: Path, input_topic: str, n: int, partitions: int) -> dict:
    tag = C.unique(key)
    group, app = f"{tag}-g", f"{tag}-app"
    run_dir = WORK / "runs" / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    env, cwd = None, C.ROOT
    if key == "plain":
        names = {"output": f"{tag}-output"}
        await C.create_topics({names["output"]: partitions})
        argv = [C.PY, str(C.BENCH / "plain_loop.py"), "--bootstrap", C.BOOTSTRAP, "--input", input_topic,
                "--output", names["output"], "--group", group, "--workload", "model"]
    else:
        names = C.daemon_topics(key, partitions)
        await C.create_daemon_topics(names, partitions)
        cfg = C.write_config(run_dir / "failoverd.toml", input_topic=input_topic, names=names,
                             state_dir=run_dir / "state", group=group, app=app,
                             extra={"checkpoint": {"interval_ms": 100, "exactly_once": True},
                                    "worker": {"mode": "subprocess"}})
        argv = C.daemon_argv(cfg, bundle)
        if tree is not None:
            env, cwd = {"PYTHONPATH": str(tree)}, tree
    proc = C.Proc(argv, run_dir / "process.log", env=env, cwd=cwd)
    try:
        t, cpu = await C.wait_for_inputs(proc, group, input_topic, n, timeout=max(120.0, n / 1000), name=key)
    finally:
        proc.stop()
    try:
        outputs = await C.read_all(names["output"], values=True, expect=n, timeout=60)
        dead = len(await C.read_all(names["dlq"], values=False)) if "dlq" in names else 0
    finally:
        await C.delete_topics(list(names.values()))
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    if len(outputs) != n or dead:
        raise AssertionError(f"{key}: {len(outputs)} outputs, {dead} dead letters for {n} inputs ({proc.log_path})")
    steady, ok = C.steady_rate(t, n, proc.t_spawn)
    return {"steady": steady, "steady_ok": ok, "cpu_per_100k": cpu / n * 100_000, "digest": partition_digests(outputs),
            "log": str(proc.log_path)}


async def main(args) -> int:
    t_start = time.monotonic()
    env = C.environment()
    tree, ref, ref_bundle = export(args.ref)
    now_bundle = C.build_bundle(C.ROOT / "examples" / "bundles" / "fraud-v1", WORK / "dist-now")
    n = args.records
    keys = ["plain", "eos-ref", "eos-now"]
    results: dict[str, list[dict]] = {k: [] for k in keys}
    input_topic = C.unique("regress-input")
    await C.create_topics({input_topic: args.partitions})
    try:
        C.produce(input_topic, C.transactions(n, n_cards=10_000, seed=42))
        for r in range(args.rounds):
            for k in keys:
                res = await run_one(k, tree=tree if k == "eos-ref" else None,
                                    bundle=ref_bundle if k == "eos-ref" else now_bundle,
                                    input_topic=input_topic, n=n, partitions=args.partitions)
                results[k].append(res)
                print(f"round {r + 1}/{args.rounds} {k:8s} steady {res['steady']:9,.0f} rec/s  "
                      f"CPU {res['cpu_per_100k']:.1f}s/100k{'' if res['steady_ok'] else '  (from start: run too short)'}",
                      flush=True)
            ref_digest = results["plain"][-1]["digest"]
            for k in keys[1:]:
                if results[k][-1]["digest"] != ref_digest:
                    raise AssertionError(f"round {r + 1}: {k}'s outputs differ from plain's ({results[k][-1]['log']})")
            print(f"  check: round {r + 1}: outputs of eos-ref and eos-now identical to plain's per partition", flush=True)
    finally:
        await C.delete_topics([input_topic])
    took = (time.monotonic() - t_start) / 60
    import json

    for v in results.values():
        for x in v:
            x.pop("digest", None)
    (WORK / "results.json").write_text(json.dumps({"argv": sys.argv, "ref": ref, "env": env, "results": results},
                                                  indent=1))
    rows = []
    for k in keys:
        s = C.stats([x["steady"] for x in results[k]])
        rp = C.stats([a["steady"] / b["steady"] for a, b in zip(results[k], results["plain"])])
        rr = C.stats([a["steady"] / b["steady"] for a, b in zip(results[k], results["eos-ref"])])
        rows.append([k, C.fmt_rate(s["median"]), C.fmt_rate(s["min"]), C.fmt_rate(s["max"]),
                     f"{rp['median']:.2f} ({rp['min']:.2f}–{rp['max']:.2f})",
                     f"{rr['median']:.2f} ({rr['min']:.2f}–{rr['max']:.2f})",
                     f"{C.stats([x['cpu_per_100k'] for x in results[k]])['median']:.1f}"])
    table = C.md_table(["system", "steady rec/s median", "min", "max", "ratio to plain, per-round median (min–max)",
                        f"ratio to eos-ref ({ref}), per-round median (min–max)", "CPU s / 100k"], rows)
    per_round = ["| round | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for i in range(args.rounds):
        per_round.append(f"| {i + 1} | " + " | ".join(C.fmt_rate(results[k][i]["steady"]) for k in keys) + " |")
    print(f"\nCommand: `{C.command_line()}` (took {took:.1f} min); reference {ref}, current {env['commit']}\n")
    print(table + "\n\n" + "\n".join(per_round))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="the commit to compare against (e.g. the published run's)")
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    sys.exit(asyncio.run(main(ap.parse_args())))
