"""Many partitions and the price of exactly-once (issue 17, targets 3 and 6).

    .venv/bin/python bench/partitions.py                 # 25 s steady windows, 3 interleaved rounds (~10 min)
    .venv/bin/python bench/partitions.py --quick         # 400k records, 5 s windows, 1 round (~1 min): review only
    .venv/bin/python bench/partitions.py --systems eos-p4,alo-p4 --profile eos-p4,alo-p4   # target 6 + py-spy
    .venv/bin/python bench/partitions.py --live 4000 --seconds 20 --rounds 2 --no-check  # records on every partition

Findings and the exact commands behind them: bench/partitions_notes.md (appended to the section
this script writes into docs/BENCHMARKS.md unless --no-doc). See also bench/txn_probe.py (the
commit's Kafka traffic alone) and bench/tuned_daemon.py (the experiments' launcher).

One workload (~300-byte JSON card transactions, fraud-v1 bundle, subprocess worker, 100 ms
checkpoints, murmur2 key partitioning) produced once into two input topics holding the same records:
one with 4 partitions, one with --many (256) partitions. Systems, run interleaved in each round:

  eos-p4     failoverd exactly-once, 4 input partitions (the reference of both targets)
  alo-p4     failoverd at-least-once (checkpoint.exactly_once = false), 4 partitions      -> target 6
  eos-p256   failoverd exactly-once, 256 input partitions (output and changelog as many)  -> target 3
  (experiments, not run by default: eos-p4-h16, eos-p256-h16 with Pipeline.MAX_HELD = 16;
  eos-p256-i1s with 1 s checkpoints. The eos-p256-st experiment of bench/partitions_notes.md,
  partition stores opened on threads, is what the daemon does since a6b050c)

Per run, besides the steady rate over the window (bench/common.py's method):
  startup    process spawn -> the group's first commit of input offsets (target 3: <= 5 s at 256)
  peak RSS   of the daemon and its worker process (sum over the process tree, sampled every 0.2 s)
  conns      TCP connections from the daemon's process tree to the broker port (ESTABLISHED),
             the most seen (sampled every 0.5 s through psutil)
  ckpt/s     checkpoints committed per second in the window and their mean duration (the daemon's
             own failoverd_checkpoints / failoverd_checkpoint_seconds, scraped from /metrics at the
             window's start and end); exactly-once, x partitions = transactions per second
  txn/s      exactly-once: checkpoint records written per second in the window (one per partition per
             committed transaction: counted from the checkpoint topic)

Each run is checked: exactly-once, exactly one committed output per committed input (read_committed);
at-least-once, at least one; no dead letters (bench/common.py finish_run). ``--no-check`` skips reading
the outputs back (faster on a busy machine; the throughput figures do not depend on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

SYSTEMS = {
    "eos-p4": {"label": "failoverd exactly-once, 4 partitions", "eos": True, "parts": "few"},
    "alo-p4": {"label": "failoverd at-least-once, 4 partitions", "eos": False, "parts": "few"},
    "eos-p256": {"label": "failoverd exactly-once, 256 partitions", "eos": True, "parts": "many"},
    # experiment (bench/tuned_daemon.py): Pipeline.MAX_HELD 4 -> 16, more batches predicted while a commit runs
    "eos-p4-h16": {"label": "experiment: exactly-once, 4 partitions, Pipeline.MAX_HELD = 16", "eos": True,
                   "parts": "few", "held": 16},
    "eos-p256-h16": {"label": "experiment: exactly-once, 256 partitions, Pipeline.MAX_HELD = 16", "eos": True,
                     "parts": "many", "held": 16},
    # operating guidance: 1 s checkpoints at 256 partitions (10x fewer transactions per partition)
    "eos-p256-i1s": {"label": "exactly-once, 256 partitions, checkpoint.interval_ms = 1000", "eos": True,
                     "parts": "many", "interval_ms": 1000},
}
RATE_CEILING = 110_000  # rec/s: at-least-once measured ~100k on this machine; sizes the input
WINDOW_S, QUICK_WINDOW_S = 25.0, 5.0
QUICK_RECORDS = 400_000
NOTES = C.BENCH / "partitions_notes.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """failoverd_checkpoints_total and the failoverd_checkpoint_seconds sum/count from /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out = {}
    for name in ("failoverd_checkpoints_total", "failoverd_checkpoint_seconds_sum",
                 "failoverd_checkpoint_seconds_count"):
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        if m:
            out[name] = float(m.group(1))
    return out


class ConnSampler:
    """The most ESTABLISHED TCP connections from a process tree to the broker port (every 0.5 s)."""

    def __init__(self, pid: int, port: int, interval: float = 0.5) -> None:
        self.pid, self.port, self.interval, self.peak, self.last = pid, port, interval, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def count(self) -> int:
        import psutil

        n = 0
        try:
            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    for c in p.net_connections(kind="tcp"):
                        if c.raddr and c.raddr.port == self.port and c.status == psutil.CONN_ESTABLISHED:
                            n += 1
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            self.last = self.count()
            self.peak = max(self.peak, self.last)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return self.peak


async def txn_rate(topic: str, t_from_ms: float, t_to_ms: float) -> tuple[float, int]:
    """Checkpoint records (one per partition per committed transaction) timestamped within the window,
    per second; and how many there are in all."""
    n = inside = 0

    def on_batch(_p, recs) -> None:
        nonlocal n, inside
        n += len(recs)
        inside += sum(1 for r in recs if t_from_ms <= r.timestamp <= t_to_ms)

    await C.scan(topic, on_batch, timeout=120)
    return inside / max(1e-9, (t_to_ms - t_from_ms) / 1000), n


async def count_outputs(topic: str):
    """finish_run's collector when only counts matter (no hashes)."""
    class N:
        n = 0

    def on_batch(_p, recs) -> None:
        N.n += len(recs)

    await C.scan(topic, on_batch, timeout=900)
    return N


async def start_daemon(key: str, topic: str, parts: int, workdir: Path, bundle: Path, spec: dict,
                       mport: int) -> tuple[C.Proc, dict, str]:
    """bench/common.py start_system's daemon (exactly-once or not, subprocess worker, 100 ms checkpoints,
    metrics on ``mport``); with ``held``, through bench/tuned_daemon.py with Pipeline.MAX_HELD changed."""
    tag = C.unique(key)
    group = f"{tag}-g"
    run_dir = workdir / tag
    names = C.daemon_topics(key, parts)
    await C.create_daemon_topics(names, parts)
    extra = {"checkpoint": {"interval_ms": spec.get("interval_ms", 100), "exactly_once": spec["eos"]}, "worker": {"mode": "subprocess"},
             "metrics": {"port": mport}}
    cfg = C.write_config(run_dir / "failoverd.toml", input_topic=topic, names=names, state_dir=run_dir / "state",
                         group=group, app=f"{tag}-app", extra=extra)
    argv = C.daemon_argv(cfg, bundle)
    env = {}
    if spec.get("held"):
        env["FAILOVERD_BENCH_MAX_HELD"] = str(spec["held"])
    if env:
        i = argv.index("-m")
        argv[i:i + 2] = [str(C.BENCH / "tuned_daemon.py")]
    return C.Proc(argv, run_dir / "process.log", env=env or None), names, group


class Feeder:
    """Produces ``rate`` records/s (the bench workload, murmur2 by key, so every partition gets its share)
    into ``topic`` from a thread, in 10 ms slices, until stopped; ``produced`` counts what was queued."""

    def __init__(self, topic: str, rate: float, cards: int = 10_000) -> None:
        import random

        from confluent_kafka import Producer

        self.topic, self.rate, self.produced = topic, rate, 0
        self._p = Producer({"bootstrap.servers": C.BOOTSTRAP, "linger.ms": 5, "acks": "all",
                            "partitioner": "murmur2_random", "enable.idempotence": True})
        self._rng = random.Random(11)
        self._cards = cards
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while self.produced < due:
                k, v = C.transaction(self._rng, self._rng.randrange(self._cards), self.produced)
                try:
                    self._p.produce(self.topic, v, k)
                    self.produced += 1
                except BufferError:
                    break
            self._p.poll(0)
            self._stop.wait(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(10)
        self._p.flush(30)
        return self.produced


async def run_one(key: str, *, inputs: dict, plan: C.Plan, bundle: Path, workdir: Path, check: bool,
                  profile: Path | None = None, live: float | None = None) -> dict:
    spec = SYSTEMS[key]
    topic, parts = inputs[spec["parts"]]
    mport = free_port()
    if live is not None:  # a fresh, empty input topic, fed at a fixed rate while the daemon runs
        topic = C.unique(f"pt-live-{parts}")
        await C.create_topics({topic: parts})
    proc, names, group = await start_daemon(key, topic, parts, workdir, bundle, spec, mport)
    feeder = Feeder(topic, live) if live is not None else None
    rss = C.RssSampler(proc.pid)
    conns = ConnSampler(proc.pid, C.KAFKA_PORT)
    spy: list = []
    m0: dict = {}
    t_m0 = 0.0

    async def first_metrics() -> None:
        nonlocal m0, t_m0
        async with C.GroupWatcher(group, topic) as w:
            while proc.alive() and await w.committed() == 0:
                await asyncio.sleep(0.05)
        m0, t_m0 = await asyncio.to_thread(scrape, mport), time.monotonic()
        if profile is not None:  # the steady window only: start-up and shutdown left out
            spy.extend(await C.start_profilers(proc, profile, seconds=plan.seconds))

    cpu0 = 0.0
    try:
        side = asyncio.ensure_future(first_metrics())
        if live is None:
            res = await C.measure(proc, group, topic, plan, name=key)
            await asyncio.wait_for(side, 10)
        else:  # the window: from the first commit, plan.seconds of feeding at the fixed rate
            await asyncio.wait_for(side, plan.timeout())
            cpu0, t_first, c_first = C.tree_cpu(proc.pid), time.monotonic(), await C.committed_now(group, topic)
            await asyncio.sleep(plan.seconds)
            c_end, cpu1 = await C.committed_now(group, topic), C.tree_cpu(proc.pid)
            span = time.monotonic() - t_first
            res = {"rate": (c_end - c_first) / span, "steady_ok": True, "window_s": span,
                   "window_records": c_end - c_first, "committed": c_end, "exhausted": False,
                   "startup_s": t_first - proc.t_spawn, "cpu_per_100k": (cpu1 - cpu0) / max(1, c_end - c_first) * 1e5,
                   "cpu_pct": 100 * (cpu1 - cpu0) / span, "lag_end": feeder.produced - c_end}
        m1, t_m1 = await asyncio.to_thread(scrape, mport), time.monotonic()
        wall_end = time.time()
        wall_first = wall_end - res["window_s"]
        conns_now = conns.last
    finally:
        if feeder is not None:
            feeder.stop()
        peak_rss = rss.stop()
        peak_conns = conns.stop()
        proc.stop()
        for s in spy:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                s.kill()
    span = max(1e-9, t_m1 - t_m0)
    ck = m1.get("failoverd_checkpoints_total", 0) - m0.get("failoverd_checkpoints_total", 0)
    ck_s = m1.get("failoverd_checkpoint_seconds_sum", 0) - m0.get("failoverd_checkpoint_seconds_sum", 0)
    ck_n = m1.get("failoverd_checkpoint_seconds_count", 0) - m0.get("failoverd_checkpoint_seconds_count", 0)
    txn_s, ckpt_records = (await txn_rate(names["checkpoint"], 1000 * wall_first, 1000 * wall_end)
                           if spec["eos"] else (0.0, 0))
    if check:
        out = await C.finish_run(proc, names, group, topic, exactly_once=spec["eos"], name=key,
                                 collector=count_outputs)
        outputs = out.n
    else:
        await C.delete_topics(list(names.values()))
        shutil.rmtree(proc.log_path.parent / "state", ignore_errors=True)
        outputs = -1
    if live is not None:
        await C.delete_topics([topic])
    res.update(system=key, log=str(proc.log_path), outputs=outputs, peak_rss_mb=peak_rss / 2**20,
               conns_peak=peak_conns, conns_window=conns_now, ckpt_per_s=ck / span,
               ckpt_ms=1000 * ck_s / ck_n if ck_n else float("nan"),
               txn_per_s=txn_s, ckpt_records=ckpt_records,
               rec_per_txn=res["window_records"] / max(1.0, txn_s * res["window_s"]) if spec["eos"] else 0.0)
    return res


def med(rs: list[dict], field: str) -> float:
    xs = [r[field] for r in rs if r[field] == r[field]]
    return statistics.median(xs) if xs else float("nan")


def report(results: dict, keys: list[str], plan: C.Plan, env: dict, args, profile: dict | None) -> list[str]:
    body = C.section_head("## Many partitions and the price of exactly-once (issue 17, targets 3 and 6)", env)
    body.append(C.method_md(plan))
    body.append(f"- workload: fraud-v1 bundle, subprocess worker, 100 ms checkpoints, {args.cards:,} cards, "
                f"input {plan.records:,} records produced once into a {args.few}-partition and a {args.many}-"
                "partition topic (same records, murmur2 key partitioning)\n")
    extra = (("startup s (median)", C.median_of("startup_s")),
             ("peak RSS MB daemon+worker (median)", C.median_of("peak_rss_mb", "{:.0f}")),
             ("broker TCP conns (peak)", lambda _k, rs: str(max(r["conns_peak"] for r in rs))),
             ("checkpoints/s", lambda _k, rs: f"{med(rs, 'ckpt_per_s'):.1f}"),
             ("checkpoint ms (mean)", lambda _k, rs: f"{med(rs, 'ckpt_ms'):.0f}"),
             ("transactions/s", lambda k, rs: f"{med(rs, 'txn_per_s'):.0f}" if SYSTEMS[k]["eos"] else "—"),
             ("records/transaction", lambda k, rs: f"{med(rs, 'rec_per_txn'):.0f}" if SYSTEMS[k]["eos"] else "—"),
             ("CPU s/100k", C.median_of("cpu_per_100k")))
    if args.live:
        extra += (("CPU % of a core (median)", C.median_of("cpu_pct", "{:.0f}")),
                  ("lag at end (median)", C.median_of("lag_end", "{:,.0f}")))
    ref = "eos-p4" if "eos-p4" in keys else None
    body.append(C.rate_table(results, keys, lambda k: f"`{k}` {SYSTEMS[k]['label']}", ref=ref, extra=extra))
    body.append("")
    body.append(C.per_round_md(results, keys))
    lines = []
    if "eos-p256" in results and "eos-p4" in results:
        r = C.ratio_stats(results, "eos-p256", "eos-p4")
        su = max(x["startup_s"] for x in results["eos-p256"])
        lines.append(f"- target 3: 256 ÷ 4 partitions exactly-once = {C.ratio_text(r)} (target ≥ 0.8): "
                     f"**{'MET' if r['median'] >= 0.8 else 'NOT MET'}**; spawn → first commit at 256 partitions "
                     f"{med(results['eos-p256'], 'startup_s'):.1f} s median, {su:.1f} s max (target ≤ 5 s): "
                     f"**{'MET' if su <= 5 else 'NOT MET'}**")
    if "alo-p4" in results and "eos-p4" in results:
        r = C.ratio_stats(results, "eos-p4", "alo-p4")
        lines.append(f"- target 6: exactly-once ÷ at-least-once at 4 partitions = {C.ratio_text(r)} (target ≥ 0.9): "
                     f"**{'MET' if r['median'] >= 0.9 else 'NOT MET'}**")
    body += lines
    body += [f"- warning: {w}" for w in C.short_windows(results, plan)]
    if profile:
        body.append("\nProfiles (py-spy, 100 Hz, one extra run per system, after the rounds):\n")
        for who, (self_t, incl, total) in profile.items():
            body.append(f"{who}: {total} samples; self time top:\n")
            body.append(C.md_table(["frame", "% self"], [[f"`{f[:110]}`", f"{p:.1f}"] for f, p in self_t[:12]]))
            body.append("\ninclusive top:\n")
            body.append(C.md_table(["frame", "% incl"], [[f"`{f[:110]}`", f"{p:.1f}"] for f, p in incl[:15]]))
            body.append("")
    return body


async def main(args) -> int:
    seconds = args.seconds or (QUICK_WINDOW_S if args.quick else WINDOW_S)
    plan = C.Plan(records=args.records or (QUICK_RECORDS if args.quick else int(seconds * args.rate_ceiling * 1.2)),
                  seconds=seconds, rounds=args.rounds or (1 if args.quick else 3), quick=args.quick)
    keys = args.systems.split(",")
    env = C.environment()
    workdir = C.OUT / "partitions"
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = C.build_bundle(C.ROOT / "examples" / "bundles" / "fraud-v1", C.OUT / "bundles")
    needs = {SYSTEMS[k]["parts"] for k in keys + (args.profile.split(",") if args.profile else [])}
    inputs = {}
    if "few" in needs:
        inputs["few"] = (C.unique("pt-in-few"), args.few)
    if "many" in needs:
        inputs["many"] = (C.unique("pt-in-many"), args.many)
    t0 = time.monotonic()
    profile = None
    if args.live:
        print(f"live: every run reads a fresh topic fed at {args.live:,.0f} records/s from its start; "
              f"{plan.describe()}", flush=True)
    else:
        await C.create_topics({t: n for t, n in inputs.values()})
    try:
        secs = 0.0
        for chunk in C.transactions_iter(0 if args.live else plan.records, n_cards=args.cards, seed=42):
            for t, _n in inputs.values():
                secs += C.produce(t, chunk)
        if not args.live:
            print(f"input: {plan.records:,} records into "
                  f"{', '.join(f'{t} ({n} partitions)' for t, n in inputs.values())} (producing took {secs:.1f}s, "
                  f"{time.monotonic() - t0:.0f}s with generation); {plan.describe()}", flush=True)

        async def run(key: str, _round: int) -> dict:
            return await run_one(key, inputs=inputs, plan=plan, bundle=bundle, workdir=workdir, check=not args.no_check,
                                 live=args.live or None)

        def describe(res: dict) -> str:
            return (f"RSS {res['peak_rss_mb']:.0f} MB  conns {res['conns_peak']}  ckpt {res['ckpt_per_s']:.1f}/s "
                    f"{res['ckpt_ms']:.0f} ms  txn {res['txn_per_s']:.0f}/s ({res['rec_per_txn']:.0f} rec/txn)  outputs {res['outputs']:,}"
                    + (f"  CPU {res['cpu_pct']:.0f}%  lag at end {res['lag_end']:,}" if "cpu_pct" in res else ""))

        results = await C.interleaved(keys, plan, run, describe=describe)
        profile = {}
        for key in args.profile.split(",") if args.profile else []:
            pdir = workdir / "profile" / key
            shutil.rmtree(pdir, ignore_errors=True)
            pdir.mkdir(parents=True)
            print(f"profiling {key} with py-spy ...", flush=True)
            res = await run_one(key, inputs=inputs, plan=plan, bundle=bundle, workdir=workdir, check=False,
                                profile=pdir, live=args.live or None)
            print(f"profiled {key}: {C.run_line(res, plan)}  {describe(res)}", flush=True)
            for w in ("daemon", "worker"):
                if (pdir / f"{w}.txt").exists():
                    profile[f"{key} {w}"] = C.top_frames(pdir / f"{w}.txt", 20)
    finally:
        if not args.live:
            await C.delete_topics([t for t, _ in inputs.values()])
    env["took_min"] = (time.monotonic() - t0) / 60
    (workdir / "results.json").write_text(json.dumps({"results": results, "keys": keys, "plan": plan.__dict__,
                                                      "env": env, "argv": sys.argv, "profile": profile},
                                                     default=str, indent=1))
    body = report(results, keys, plan, env, args, profile)
    text = "\n".join(body)
    print("\n" + text)
    (workdir / "report.md").write_text(text)
    C.publish_section("partitions", body, NOTES, write=not args.no_doc)
    return 0


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the method's options, declared here (bench/common.py's add_method_args is being reshaped meanwhile)
    ap.add_argument("--quick", action="store_true",
                    help=f"for review: {QUICK_RECORDS:,} records, {QUICK_WINDOW_S:g} s windows, 1 round: not a measurement")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help=f"steady window per run, from the first commit (default {WINDOW_S:g}; --quick {QUICK_WINDOW_S:g})")
    ap.add_argument("--records", type=int, default=0,
                    help="input records (default: seconds x --rate-ceiling x 1.2, so the fastest system's window fits)")
    ap.add_argument("--rate-ceiling", type=float, default=RATE_CEILING,
                    help=f"records/s no system is expected to exceed (default {RATE_CEILING:,.0f}): sizes the input")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, --quick 1)")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    ap.add_argument("--cards", type=int, default=10_000, help="distinct keys (cards) of the input")
    ap.add_argument("--systems", default="eos-p4,alo-p4,eos-p256", help="comma-separated, run in this order per round")
    ap.add_argument("--few", type=int, default=4, help="input partitions of the reference runs")
    ap.add_argument("--many", type=int, default=256, help="input partitions of eos-p256")
    ap.add_argument("--profile", default="", help="comma-separated systems to run once more under py-spy "
                                                 "(daemon and worker; bench/out/partitions/profile/<system>/)")
    ap.add_argument("--live", type=float, default=0.0,
                    help="records/s: instead of a backlog, every run reads a fresh topic fed at this rate while it "
                         "runs (records on every partition in every interval); the window measures CPU, lag and "
                         "transactions/s at that load")
    ap.add_argument("--no-check", action="store_true", help="do not read the outputs back to check counts")
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    sys.exit(asyncio.run(main(a)))
