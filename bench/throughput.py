"""Throughput of the failoverd engine against a plain aiokafka loop (issue 4).

    .venv/bin/python bench/throughput.py            # 100k records, 3 interleaved rounds (~6-8 min)
    .venv/bin/python bench/throughput.py --quick    # 10k records, 3 rounds (~1.5 min)
    .venv/bin/python bench/throughput.py --profile  # then py-spy the exactly-once daemon once
    .venv/bin/python bench/throughput.py --records 200000   # the issue's example size (~12-15 min)
    .venv/bin/python bench/throughput.py --systems plain,eos-sub,eos-sub-lite   # + permissive-schema diagnostic

One input topic (4 partitions, ~300-byte JSON card transactions) is produced once; every system
then consumes all of it from the start, into a fresh output topic, in its own consumer group:

  plain         bench/plain_loop.py --workload model: the baseline the target is judged against, a plain
                aiokafka loop doing the same work as the daemon's data path: orjson decode, input
                JSON-Schema validation (jsonschema_rs), the fraud-v1 bundle's own FraudScorer with per-card
                state {count, mean_amount} in a dict, fed in waves per getmany() batch like the daemon,
                output validation, encode, produce; no transactions, changelog, checkpoints, headers, DLQ
  plain-bare    bench/plain_loop.py --workload score: second reference row, the floor of Python
                overhead: decode, fraud-scorer's logistic score over 8 features, encode, produce; no
                state, no validation (its outputs lack count and mean_amount)
  eos-sub       failoverd daemon, exactly-once (checkpoint.interval_ms=100), worker.mode=subprocess
  alo-sub       failoverd daemon, exactly_once=false, subprocess worker
  eos-inproc    failoverd daemon, exactly-once, worker.mode=inprocess
  alo-inproc    failoverd daemon, exactly_once=false, inprocess worker

The daemon runs as `python -m daemon run --config ... --active-bundle <fraud-v1 archive>`.

Rounds are interleaved (A B C D E, A B C D E, ...). A run is over when the group's committed
input offsets reach the number of inputs: every system commits input offsets only after
(exactly-once: in the same transaction as) the outputs, so that is "the last output is committed".
Each run is then checked: the output topic holds exactly N committed records (read_committed).
Honesty check, after every round: the `plain` output and the output of every failoverd system in the
round hold the same values, in the same order, in every output partition (sha256 per partition of
the values read with read_committed; the input is produced with murmur2 key partitioning, the daemon
keeps the source partition, the plain loop's producer partitions by murmur2 of the key). A mismatch
fails the bench: the baseline must do the same work and produce the same outputs.

Two rates per run:
  steady   = records committed after the first commit / (last commit time - first commit time):
             the data path, without process start, model load and the group join
  from start = N / (last commit time - process spawn): what a user sees for a whole backlog
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

SYSTEMS = {
    "plain": {"label": "plain aiokafka loop, same work: model, state, validation (baseline)", "kind": "plain",
              "workload": "model"},
    "plain-bare": {"label": "plain aiokafka loop, score only (floor)", "kind": "plain", "workload": "score"},
    "eos-sub": {"label": "failoverd exactly-once, subprocess worker", "kind": "daemon", "eos": True,
                "mode": "subprocess"},
    "alo-sub": {"label": "failoverd at-least-once, subprocess worker", "kind": "daemon", "eos": False,
                "mode": "subprocess"},
    "eos-inproc": {"label": "failoverd exactly-once, in-process worker", "kind": "daemon", "eos": True,
                   "mode": "inprocess"},
    "alo-inproc": {"label": "failoverd at-least-once, in-process worker", "kind": "daemon", "eos": False,
                   "mode": "inprocess"},
    # diagnostic: the same model with permissive schemas ({"type": "object"}), to show what JSON-Schema
    # validation costs (see the profile); not part of the comparison
    "eos-sub-lite": {"label": "diagnostic: failoverd exactly-once, subprocess, permissive schemas", "kind": "daemon",
                     "eos": True, "mode": "subprocess", "lite": True},
}
DEFAULT = ["plain", "plain-bare", "eos-sub", "alo-sub", "eos-inproc", "alo-inproc"]
QUICK = ["plain", "plain-bare", "eos-sub", "alo-sub", "eos-inproc", "alo-inproc"]
# the baselines: the target is judged against BASE (same work); FLOOR is shown next to it
BASE, FLOOR = "plain", "plain-bare"


def lite_bundle() -> Path:
    """fraud-v1 with both schemas replaced by {"type": "object"} (validation nearly free)."""
    import json

    src = C.OUT / "bundle-src" / "fraud-v1-lite"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(C.ROOT / "examples" / "bundles" / "fraud-v1", src)
    for name in ("input", "output"):
        (src / "schemas" / f"{name}.json").write_text(json.dumps(
            {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}))
    return C.build_bundle(src, C.OUT / "bundles-lite")


def partition_digests(records: list) -> list[list]:
    """[count, sha256 of the values in offset order] per output partition, from read_all tuples."""
    by_part: dict[int, list[bytes]] = {}
    for part, _offset, _key, value, _headers, _ts in records:
        by_part.setdefault(part, []).append(value or b"")
    out = []
    for part in range(max(by_part, default=-1) + 1):
        h = hashlib.sha256()
        for v in by_part.get(part, []):
            h.update(len(v).to_bytes(4, "big"))
            h.update(v)
        out.append([len(by_part.get(part, [])), h.hexdigest()])
    return out


def check_same_outputs(results: dict, keys: list[str], round_no: int) -> str | None:
    """After a round: the plain (same work) output must equal every failoverd system's, per partition."""
    if BASE not in keys:
        return None
    ref = results[BASE][-1]["digest"]
    checked = []
    for k in keys:
        if SYSTEMS[k]["kind"] != "daemon":
            continue
        got = results[k][-1]["digest"]
        if got != ref:
            parts = [f"partition {i}: {BASE} {a[0] if a else 0} records sha256 {a[1][:12] if a else '-'}, "
                     f"{k} {b[0] if b else 0} records sha256 {b[1][:12] if b else '-'}"
                     for i, (a, b) in enumerate(zip(ref + [None] * len(got), got + [None] * len(ref)))
                     if (a or b) and a != b]
            raise AssertionError(
                f"honesty check failed in round {round_no}: the outputs of {BASE} (bench/plain_loop.py --workload "
                f"model) and {k} differ, so the baseline does not do the same work as failoverd:\n  "
                + "\n  ".join(parts) + f"\n  logs: {results[BASE][-1]['log']}, {results[k][-1]['log']}")
        checked.append(k)
    return (f"round {round_no}: outputs identical per partition ({BASE} = {', '.join(checked)})"
            if checked else None)


async def run_one(key: str, *, input_topic: str, n: int, partitions: int, bundle: dict, workdir: Path,
                  timeout: float, profile: Path | None = None) -> dict:
    spec = SYSTEMS[key]
    tag = C.unique(key)
    group, app = f"{tag}-g", f"{tag}-app"
    run_dir = workdir / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    if spec["kind"] == "plain":
        names = {"output": f"{tag}-output"}
        await C.create_topics({names["output"]: partitions})
        argv = [C.PY, str(C.BENCH / "plain_loop.py"), "--bootstrap", C.BOOTSTRAP, "--input", input_topic,
                "--output", names["output"], "--group", group, "--workload", spec["workload"]]
    else:
        names = C.daemon_topics(key, partitions)
        await C.create_daemon_topics(names, partitions)
        cfg = C.write_config(run_dir / "failoverd.toml", input_topic=input_topic, names=names,
                             state_dir=run_dir / "state", group=group, app=app,
                             extra={"checkpoint": {"interval_ms": 100, "exactly_once": spec["eos"]},
                                    "worker": {"mode": spec["mode"]}})
        argv = C.daemon_argv(cfg, bundle["lite"] if spec.get("lite") else bundle["v1"])
    proc = C.Proc(argv, run_dir / "process.log")
    spy = None
    try:
        if profile is not None:
            spy = await start_profilers(proc, spec, profile)
        t, cpu = await C.wait_for_inputs(proc, group, input_topic, n, timeout=timeout, name=key)
    finally:
        proc.stop()
        if spy:
            for s in spy:
                try:
                    s.wait(30)
                except Exception:  # noqa: BLE001
                    s.kill()
    try:
        outputs = await C.read_all(names["output"], values=True, expect=n, timeout=60)
        got = len(outputs)
        digest = partition_digests(outputs)
        del outputs
        dead = len(await C.read_all(names["dlq"], values=False)) if "dlq" in names else 0
    finally:
        await C.delete_topics(list(names.values()))
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    if got != n or dead:
        raise AssertionError(f"{key}: {got} committed outputs and {dead} dead letters for {n} inputs")
    steady, ok = C.steady_rate(t, n, proc.t_spawn)
    return {"system": key, "n": n, "steady": steady, "steady_ok": ok,
            "e2e": n / (t["t_end"] - proc.t_spawn), "startup_s": t["t_first"] - proc.t_spawn,
            "cpu_per_100k": cpu / n * 100_000, "log": str(proc.log_path), "digest": digest}


async def start_profilers(proc: C.Proc, spec: dict, out: Path) -> list:
    """py-spy on the daemon (and its worker subprocess) for the rest of the run."""
    import subprocess

    spy = shutil.which("py-spy") or str(Path(C.PY).parent / "py-spy")
    targets = [("daemon", proc.pid)]
    if spec.get("mode") == "subprocess":
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kids = [p for p in C.children(proc.pid) if "worker_main" in " ".join(p.cmdline())]
            if kids:
                targets.append(("worker", kids[0].pid))
                break
            await asyncio.sleep(0.05)
    procs = []
    for name, pid in targets:
        for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
            procs.append(subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100", "--format", fmt,
                                           "-o", str(out / f"{name}.{ext}"), "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def top_frames(raw: Path, n: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """(self-time top, inclusive top, samples) from a py-spy raw (collapsed-stack) file."""
    import collections

    self_t: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        total += c
        self_t[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    self_t.pop("", None)
    incl.pop("", None)
    # frames on (nearly) every stack — interpreter, runpy, asyncio.run — say nothing: left out
    for f in [f for f, v in incl.items() if v >= 0.8 * total or f.startswith(("BaseEventLoop._run_once",
                                                                              "Handle._run"))]:
        del incl[f]
    pct = lambda cnt: [(f, 100.0 * v / total) for f, v in cnt.most_common(n)]  # noqa: E731
    return pct(self_t), pct(incl), total


async def main(args) -> int:
    saved = C.OUT / "throughput" / "results.json"
    if args.report_only:
        import json

        d = json.loads(saved.read_text())
        if d.get("baseline") != "model":
            print(f"{saved} predates the same-work baseline (its 'plain' is the score-only loop, now "
                  "'plain-bare'); re-run the benchmark instead of re-rendering it", file=sys.stderr)
            return 1
        ns = argparse.Namespace(**d["args"])
        ns.no_doc = args.no_doc
        sys.argv = d["argv"]
        prof = {k: tuple(v) for k, v in d["profile"].items()} if d["profile"] else None
        report(d["results"], d["keys"], d["n"], ns, d["env"], d["size"], prof, d.get("checks", []))
        return 0
    n = args.records or (10_000 if args.quick else 100_000)
    rounds = args.rounds
    keys = args.systems.split(",") if args.systems else (QUICK if args.quick else DEFAULT)
    env = C.environment()
    workdir = C.OUT / "throughput"
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = {"v1": C.build_bundle(C.ROOT / "examples" / "bundles" / "fraud-v1", C.OUT / "bundles")}
    if any(SYSTEMS[k].get("lite") for k in keys):
        bundle["lite"] = lite_bundle()
    input_topic = C.unique("tp-input")
    await C.create_topics({input_topic: args.partitions})
    timeout = max(90.0, n / 1500)
    results: dict[str, list[dict]] = {k: [] for k in keys}
    checks: list[str] = []
    try:
        records = C.transactions(n, n_cards=args.cards, seed=42)
        size = sum(len(v) for _, v in records) / n
        secs = C.produce(input_topic, records)
        del records
        print(f"input: {n} records of {size:.0f} bytes avg, {args.partitions} partitions, {args.cards} cards "
              f"(produced in {secs:.1f}s)")
        for r in range(rounds):
            for key in keys:
                res = await run_one(key, input_topic=input_topic, n=n, partitions=args.partitions, bundle=bundle,
                                    workdir=workdir, timeout=timeout)
                results[key].append(res)
                print(f"round {r + 1}/{rounds} {key:11s} steady {res['steady']:9,.0f} rec/s   from start "
                      f"{res['e2e']:9,.0f} rec/s   startup {res['startup_s']:.1f}s   "
                      f"CPU {res['cpu_per_100k']:.1f}s/100k", flush=True)
            ok = check_same_outputs(results, keys, r + 1)
            if ok:
                checks.append(ok)
                print(f"  honesty check: {ok}", flush=True)
        profile = None
        if args.profile:
            pdir = workdir / "profile"
            shutil.rmtree(pdir, ignore_errors=True)
            pdir.mkdir(parents=True)
            print("profiling failoverd exactly-once (subprocess worker) with py-spy ...", flush=True)
            await run_one("eos-sub", input_topic=input_topic, n=n, partitions=args.partitions, bundle=bundle,
                          workdir=workdir, timeout=timeout * 2, profile=pdir)
            profile = {}
            for name in ("daemon", "worker"):
                raw = pdir / f"{name}.txt"
                if raw.exists() and raw.stat().st_size:
                    profile[name] = top_frames(raw)
    finally:
        await C.delete_topics([input_topic])
    import json

    env["commit_end"] = C.environment()["commit"]  # the engine may change while a long run goes on
    if args.no_doc:  # a diagnostic run must not replace the results behind the doc (--report-only)
        saved = saved.with_name("results-nodoc.json")
    saved.write_text(json.dumps({"args": vars(args), "argv": sys.argv, "results": results, "keys": keys, "n": n,
                                 "env": env, "size": size, "profile": profile, "baseline": "model",
                                 "checks": checks}, indent=1))
    report(results, keys, n, args, env, size, profile, checks)
    return 0


def report(results, keys, n, args, env, size, profile, checks=()) -> None:
    def median(key: str, field: str) -> float:
        return C.stats([r[field] for r in results.get(key, [])])["median"] if key in results else float("nan")

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.2f}" if x == x and y == y else "—"

    base, base_e2e, floor = median(BASE, "steady"), median(BASE, "e2e"), median(FLOOR, "steady")
    rows = []
    for k in keys:
        s = C.stats([r["steady"] for r in results[k]])
        e = C.stats([r["e2e"] for r in results[k]])
        cpu = C.stats([r["cpu_per_100k"] for r in results[k]])
        # ratio per round (same round = closest in time), then the median of those
        ratios = [a["steady"] / b["steady"] for a, b in zip(results[k], results.get(BASE, []))]
        rows.append([SYSTEMS[k]["label"], C.fmt_rate(s["median"]), C.fmt_rate(s["min"]), C.fmt_rate(s["max"]),
                     ratio(s["median"], base),
                     f"{C.stats(ratios)['median']:.2f}" if ratios else "—",
                     ratio(s["median"], floor),
                     C.fmt_rate(e["median"]), ratio(e["median"], base_e2e),
                     f"{cpu['median']:.1f}"])
    headers = ["system", "steady rec/s median", "min", "max", "ratio to plain, same work (medians)",
               "ratio to plain, same work (median of per-round)", "ratio to plain-bare, floor (medians)",
               "from-start rec/s median", "from-start ratio to plain", "CPU s / 100k records"]
    table = C.md_table(headers, rows)
    print()
    print(table)
    eos = median("eos-sub", "steady") if "eos-sub" in results else None
    verdict = ""
    if eos is not None and base == base:
        met = eos / base >= 1.0
        verdict = (f"**Target (issue 4): exactly-once with 100 ms checkpoints at no less than the plain loop's rate "
                   f"— {'MET' if met else 'NOT MET'}**: failoverd exactly-once (subprocess worker, the default) "
                   f"runs at {eos / base:.2f}× the plain loop doing the same work ({C.fmt_rate(eos)} vs "
                   f"{C.fmt_rate(base)} rec/s, medians of {args.rounds} interleaved rounds).")
        if floor == floor:
            verdict += (f" Against the bare floor (plain-bare: decode, score, encode; no state, no validation) "
                        f"it runs at {eos / floor:.2f}× ({C.fmt_rate(eos)} vs {C.fmt_rate(floor)} rec/s).")
        print("\n" + verdict)
    check_line = ""
    if checks:
        check_line = (f"- honesty check: in every round the output of `plain` and of every failoverd system held the "
                      f"same values in the same order in every output partition (sha256 per partition, read with "
                      f"read_committed): {len(checks)} of {args.rounds} rounds checked, all identical.")
        print("\n" + check_line[2:])
    body = ["## Throughput (issue 4)\n",
            f"Command: `{C.command_line()}`\n",
            C.env_block(env),
            f"- workload: {n:,} JSON card transactions (avg {size:.0f} bytes, {args.cards:,} cards, key = card) in one "
            f"topic with {args.partitions} partitions, produced once; every run reads all of it from offset 0 into a "
            f"fresh output topic ({args.partitions} partitions) with a fresh consumer group; {args.rounds} interleaved "
            f"rounds of {', '.join(keys)}.",
            "- failoverd: the real daemon subprocess (`python -m daemon run --config ... --active-bundle "
            "fraud-scorer-1.0.0.fdb`), checkpoint.interval_ms=100, interval_records=10000 (default), "
            "max_batch_records=1000 (default); per-card state (count, mean), JSON-Schema validation of input and "
            "output, provenance headers, dead-letter handling, changelog + checkpoint records: the whole data path.",
            "- `plain`, the baseline the target is judged against (`bench/plain_loop.py --workload model`): a plain "
            "aiokafka loop doing the same work as the daemon's data path, minus what makes the daemon durable: "
            "aiokafka consume → orjson decode → input validation with jsonschema_rs (the bundle's "
            "schemas/input.json) → the bundle's own `FraudScorer` (examples/bundles/fraud-v1/code/model.py, "
            "model_version fraud-scorer@1.0.0) with per-card state {count, mean_amount} kept as objects in a "
            "dict, each getmany() batch fed to `predict` in waves (one occurrence of a card per call, so a card's "
            "second record sees the state of its first, as in the daemon) → output validation (schemas/output.json) "
            "→ orjson encode → produce with the card as key. No transactions, no changelog, no checkpoint records, "
            "no provenance headers, no dead-letter topic (records that fail would be skipped and counted; the input "
            "has none); producer flushed and offsets committed every 100 ms (at-least-once).",
            "- `plain-bare`, a second reference row, the floor of Python overhead (`bench/plain_loop.py --workload "
            "score`): aiokafka consume → orjson decode → fraud-scorer 1.0.0's logistic score only (same weights, "
            "merchant risk, log1p(amount)) → encode → produce; no state, no validation (its outputs lack count and "
            "mean_amount), no transactions, no headers; same commit cadence. This was the baseline before it was "
            "made to do the same work.",
            "- end of a run = the group's committed input offsets reach N (offsets are committed with, or after, "
            "the outputs); then the output topic is read back with read_committed and must hold exactly N records "
            "(it did, in every run). *steady* = records after the first commit ÷ (last − first commit time): the "
            "data path. *from start* = N ÷ (last commit − process spawn): adds interpreter start, model load, "
            "group join and producer initialisation (failoverd: one transactional producer per partition).",
            "- CPU = user+system seconds of the process tree (daemon + model worker) per 100k records; the "
            "broker's CPU is not included.",
            *([check_line] if check_line else []),
            "",
            table, ""]
    if verdict:
        body.append(verdict + "\n")
    per_round = ["| round | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for i in range(args.rounds):
        per_round.append(f"| {i + 1} | " + " | ".join(C.fmt_rate(results[k][i]["steady"]) if i < len(results[k])
                                                      else "—" for k in keys) + " |")
    body.append("Steady rec/s of every run, in run order (each row is one interleaved round):\n")
    body.append("\n".join(per_round) + "\n")
    if profile:
        body.append(profile_md(profile))
    C.publish_section("throughput", body, THROUGHPUT_NOTES, write=not args.no_doc)


# Hand-written analysis (bottlenecks, proposals) kept next to the script and appended to the section.
THROUGHPUT_NOTES = Path(__file__).resolve().parent / "throughput_notes.md"


def profile_md(profile: dict) -> str:
    out = ["### Profile of the exactly-once daemon (py-spy, one extra run after the measured rounds)\n",
           "Sampled with `py-spy record --rate 100 --nonblocking` (raw stacks and a flame graph) on the daemon process and on its model worker "
           "process while they worked through the backlog (sampling slows them a little; the shares are what "
           "matters). Raw stacks and flame graphs: `bench/out/throughput/profile/{daemon,worker}.{txt,svg}` (git-ignored).\n"]
    for name, (self_top, incl_top, total) in profile.items():
        out.append(f"**{name} process** ({total} samples) — top frames by self time:\n")
        out.append(C.md_table(["frame", "self %"], [[f"`{f}`", f"{p:.1f}"] for f, p in self_top[:12]]))
        out.append(f"\n**{name} process** — top frames by inclusive time (frames on ≥ 80 % of the stacks — "
                   "interpreter, asyncio.run, the event loop — left out):\n")
        out.append(C.md_table(["frame", "inclusive %"], [[f"`{f}`", f"{p:.1f}"] for f, p in incl_top[:15]]))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k records (about 1.5 minutes)")
    ap.add_argument("--records", type=int, default=0, help="input records (default 100000, --quick 10000)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--cards", type=int, default=10_000, help="distinct keys (cards)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default="", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--profile", action="store_true", help="after the rounds, py-spy one exactly-once run")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    ap.add_argument("--report-only", action="store_true",
                    help="re-render the table and doc section from the last run's bench/out/throughput/results.json")
    sys.exit(asyncio.run(main(ap.parse_args())))
