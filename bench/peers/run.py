"""failoverd against its peers on one workload (issue 7; real models: issue 17, target 1).

    .venv/bin/python bench/peers/run.py           # ~30 min: throughput 30 s windows x3 rounds, recovery x2, scaling
    .venv/bin/python bench/peers/run.py --quick   # ~5 min: 5 s windows, 1 round, 100k-key state instead of 1M
    .venv/bin/python bench/peers/run.py --workload ml          # ~30 min: the example releases' fitted models
    .venv/bin/python bench/peers/run.py --workload ml --quick  # ~4 min

Workload (bench/peers/workload.py, one function used by every system): ~300-byte JSON card
transactions keyed by card, a logistic score over 8 features, per-card rolling state (count,
mean amount), output {card_id, seq, score, count, mean_amount}. ``--workload ml``: the same but
the score comes from an example release's fitted model (fraud-ml-sklearn, fraud-ml-onnx; the
release's own model class and model file): failoverd runs a bundle built from the release
(ml_release: its data, lock and wheels; bench/peers/ml_model.py adds the per-card state around the
release's batched ``predict``), Quix Streams and faust call the same ``predict`` per record (their
natural per-record APIs), the plain loop batches like the daemon; every peer runs on the release
environment's python. Checks allow the score to differ by 1e-6 (batch vs single row in float32).

Systems, all on the same local broker, the same input topic (4 partitions), each into a fresh
output topic with a fresh consumer group and fresh state:
  failoverd-eos   the daemon, exactly-once, checkpoint.interval_ms=100, subprocess worker, bundle
                  bench/peers/bundle (workload.py copied in); JSON-Schema validation of in- and output
  failoverd-alo   the same with exactly_once=false
  plain           bench/plain_loop.py --workload peers: aiokafka loop, state in a dict (not durable)
  quix-eos        Quix Streams, processing_guarantee=exactly-once, commit_interval=0.1 s, RocksDB state
  quix-alo        Quix Streams, at-least-once, commit_interval=0.1 s
  quix-eos-5s     (not in the default set) Quix Streams, exactly-once, its default commit_interval (5 s);
                  needs a long input (--records 100000) for its 5 s commits to average out
  faust           faust-streaming agent + Table (in-memory store, changelog), at_least_once,
                  broker_commit_interval=0.1 s

Phases:
  1. throughput (bench/common.py's method, issue 17): interleaved rounds; each run is measured over a
     steady window of --seconds (30 s) from its first commit of input offsets (the group's committed
     offsets, polled through the admin API): records/s = inputs committed in the window / the window;
     the input is sized for the fastest system (--rate-ceiling) and each run stops at its window.
     Then, card by card, its output must be the start of what the reference computes sequentially
     (equal after JSON decoding: nothing duplicated, reordered or different) and hold an output for
     every committed input (exactly-once systems: exactly as many). Peak RSS of the process tree.
  2. recovery: each system processes the same state-building prefix (every card seen), a feeder
     keeps records coming, kill -9 of the whole process tree, restart 0.3 s later (the same
     command, group and state directory); time from the kill to the first new committed output.
  3. scaling (failoverd-eos): input partitions 1, 4, 16 with 10k keys of state, and 4 partitions
     with 1M keys; the state is bootstrapped by writing the changelog topic directly (what a
     restore reads) instead of streaming 1M records through the model first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from bench import common as C  # noqa: E402
from workload import ML_SCORE_TOLERANCE, step, step_scored  # noqa: E402

SYSTEMS = {
    "failoverd-eos": "failoverd exactly-once",
    "failoverd-alo": "failoverd at-least-once",
    "plain": "plain aiokafka loop + dict",
    "quix-eos": "Quix Streams exactly-once",
    "quix-alo": "Quix Streams at-least-once",
    "quix-eos-5s": "Quix Streams exactly-once, default 5 s commit interval",
    "faust": "faust-streaming agent + Table",
}
DEFAULT = ["failoverd-eos", "failoverd-alo", "plain", "quix-eos", "quix-alo", "faust"]
ML_DEFAULT = ["failoverd-eos", "plain", "quix-eos", "faust"]  # issue 17, target 1 (+ the plain loop, same work)
RATE_CEILING = 150_000  # rec/s no system reaches on this workload: sizes the input for --seconds
SCALING_RATE_CEILING = 100_000  # the same for failoverd exactly-once alone (the scaling phase)
PARTITIONS = 4
OUT = C.OUT / "peers"


def ml_release(key: str) -> dict:
    """The peers-ml bundle of an example release (``key``: sk or onnx, see bench/ml_throughput.py):
    the release's fitted model file, lock and wheels as they are, its code/model.py renamed
    release_model.py, workload.py next to it, bench/peers/ml_model.py as code/model.py (the release's
    score + the peers' per-card state), the peers' schemas. Built --with-wheels; its environment
    is built here too (the daemon's own ensure_env), for the peers and the plain loop to run on."""
    import re
    import sysconfig

    from bench import ml_throughput as M

    src = C.OUT / "bundle-src" / f"peers-ml-{key}"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(C.ROOT / "examples" / "bundles" / M.RELEASES[key][0], src)
    (src / "code" / "model.py").rename(src / "code" / "release_model.py")
    shutil.copy(HERE / "ml_model.py", src / "code" / "model.py")
    shutil.copy(HERE / "workload.py", src / "code" / "workload.py")
    for name in ("input.json", "output.json"):
        shutil.copy(HERE / "bundle" / "schemas" / name, src / "schemas" / name)
    manifest = (src / "bundle.toml").read_text()
    for pattern, line in ((r"^name = .*$", f'name = "peers-ml-{key}"'),
                          (r"^entrypoint = .*$", 'entrypoint = "model:PeersMLScorer"'),
                          (r"^state_schema_version = .*$", 'state_schema_version = 1  # {"count", "mean_amount"}')):
        manifest, n = re.subn(pattern, line, manifest, count=1, flags=re.M)
        if n != 1:
            raise RuntimeError(f"{src / 'bundle.toml'}: no line matching {pattern!r} to rewrite")
    (src / "bundle.toml").write_text(manifest)
    rel = M.prepare(key, src=src, work=C.OUT / "peers-ml")
    rel["key"] = key
    rel["label"] = M.RELEASES[key][1]
    rel["append"] = os.pathsep.join([str(rel["runtime"]), sysconfig.get_path("purelib")])
    return rel


def peers_bundle() -> Path:
    src = C.OUT / "bundle-src" / "peers"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(HERE / "bundle", src)
    shutil.copy(HERE / "workload.py", src / "code" / "workload.py")
    return C.build_bundle(src, C.OUT / "bundles-peers")


class Run:
    """One system instance: its topics, group, state dir and command; restartable."""

    def __init__(self, system: str, input_topic: str, partitions: int, bundle: Path, tag: str | None = None,
                 daemon_extra: dict | None = None, static: bool = False, ml: dict | None = None) -> None:
        self.system, self.input, self.partitions = system, input_topic, partitions
        self.tag = tag or C.unique(system)
        self.dir = OUT / self.tag
        self.dir.mkdir(parents=True, exist_ok=True)
        self.group = f"{self.tag}-g"
        self.names: dict = {}
        self.bundle = bundle
        self.daemon_extra = daemon_extra or {}
        self.proc: C.Proc | None = None
        self.starts = 0
        # static membership: a restart with the same group.instance.id takes the dead member's place at once
        # instead of waiting for its session to time out
        self.instance = f"{self.tag}-i" if static else None
        self.ml = ml  # the ml workload: a peers-ml release (see ml_release); None = the rule-based workload

    async def setup(self) -> None:
        if self.system.startswith("failoverd"):
            self.names = C.daemon_topics(self.system, self.partitions)
            await C.create_daemon_topics(self.names, self.partitions)
        else:
            self.names = {"output": f"{self.tag}-output"}
            await C.create_topics({self.names["output"]: self.partitions})

    def argv_env(self) -> tuple[list[str], dict]:
        s = self.system
        if s.startswith("failoverd"):
            extra = {"checkpoint": {"interval_ms": 100, "exactly_once": s == "failoverd-eos"}}
            if self.instance:
                extra["kafka"] = {"group_instance_id": self.instance}
            for k, v in self.daemon_extra.items():
                extra.setdefault(k, {}).update(v)
            cfg = C.write_config(self.dir / "failoverd.toml", input_topic=self.input, names=self.names,
                                 state_dir=self.dir / "state", group=self.group, app=f"{self.tag}-app", extra=extra)
            argv = C.daemon_argv(cfg, self.bundle)
            if os.environ.get("BENCH_JSON_LOGS"):  # millisecond timestamps, for diagnosing a restart
                argv[argv.index("run"):argv.index("run")] = ["--log-format", "json"]
            return argv, {}
        # the ml workload: every peer runs on the release environment's python (the release's pins), this
        # venv's packages appended after it (the Kafka clients, Quix Streams, faust)
        py, ml_env = (self.ml["python"], {"FAILOVERD_BENCH_APPEND_PATH": self.ml["append"]}) if self.ml else (C.PY, {})
        if s == "plain":
            work = ["--workload", "model", "--bundle", str(self.ml["root"])] if self.ml else ["--workload", "peers"]
            return [py, str(C.BENCH / "plain_loop.py"), "--bootstrap", C.BOOTSTRAP, "--input", self.input,
                    "--output", self.names["output"], "--group", self.group, *work] + (
                        ["--instance-id", self.instance] if self.instance else []), ml_env
        if s.startswith("quix"):
            return [py, str(HERE / "quix_app.py"), "--bootstrap", C.BOOTSTRAP, "--input", self.input, "--output",
                    self.names["output"], "--group", self.group, "--state-dir", str(self.dir / "state"),
                    "--guarantee", "at-least-once" if s == "quix-alo" else "exactly-once",
                    "--commit-interval", "5.0" if s == "quix-eos-5s" else "0.1"] + (
                        ["--instance-id", self.instance] if self.instance else []) + (
                        ["--transactional-id", f"{self.tag}-txn"] if self.instance and s == "quix-eos" else []) + (
                        ["--ml", str(self.ml["root"])] if self.ml else []), ml_env
        if s == "faust":
            env = {"FAUST_BENCH_GROUP": self.group, "FAUST_BENCH_BOOTSTRAP": C.BOOTSTRAP,
                   "FAUST_BENCH_DATADIR": str(self.dir / "state"), "FAUST_BENCH_PARTITIONS": str(self.partitions),
                   "FAUST_BENCH_INPUT": self.input, "FAUST_BENCH_OUTPUT": self.names["output"]}
            if self.instance:
                env["FAUST_BENCH_INSTANCE"] = self.instance
            if self.ml:
                env.update(ml_env, FAUST_BENCH_ML=str(self.ml["root"]))
            return [py, str(HERE / "faust_app.py"), "worker", "-l", "warn", "--without-web"], env
        raise ValueError(s)

    def start(self) -> C.Proc:
        argv, env = self.argv_env()
        self.starts += 1
        self.proc = C.Proc(argv, self.dir / f"process-{self.starts}.log", env=env)
        return self.proc

    async def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill9()
        await C.delete_topics(list(self.names.values()))
        # internal topics the peers create for themselves (changelogs, leader topics)
        await C.delete_prefixed(f"changelog__{self.group}")
        await C.delete_prefixed(f"{self.group}-")
        if not os.environ.get("BENCH_KEEP"):  # BENCH_KEEP=1 keeps logs and state under bench/out/peers/
            shutil.rmtree(self.dir, ignore_errors=True)


EXACTLY_ONCE = {"failoverd-eos", "quix-eos", "quix-eos-5s"}  # outputs == committed inputs after a clean stop


def out_hash(o: dict, ml: bool) -> tuple:
    """(card, hash, score or None) of one output: grouped by card (per-card order is what every system
    keeps; Quix and faust partition their output by their own partitioner), the hash over every field
    (over every field but the score for ``ml``, whose score is compared within ML_SCORE_TOLERANCE).
    Hashing a tuple of the decoded values compares them after JSON decoding (198 == 198.0)."""
    if ml:
        return o["card_id"], hash((o["card_id"], o["seq"], o["count"], o["mean_amount"], len(o))), o["score"]
    return o["card_id"], hash((o["card_id"], o["seq"], o["score"], o["count"], o["mean_amount"], len(o))), None


def make_input(topic: str, plan: C.Plan, cards: int, seed: int, ml: dict | None) -> C.Seqs:
    """Produce the throughput input (chunk by chunk) and compute the reference on the fly: every
    input's expected output, sequentially per card with workload.step (``ml``: step_scored with the
    scores the release computes for the same records on its own environment, workload.py scores)."""
    from array import array

    scores = None
    if ml is not None:
        path = OUT / f"scores-{ml['key']}.f64"
        t0 = time.monotonic()
        proc = C.Proc([ml["python"], str(HERE / "workload.py"), "scores", "--bundle", str(ml["root"]),
                       "--records", str(plan.records), "--cards", str(cards), "--seed", str(seed), "--out", str(path)],
                      OUT / f"scores-{ml['key']}.log", env={"FAILOVERD_BENCH_APPEND_PATH": ml["append"]})
        if proc.proc.wait(3600) != 0:
            raise RuntimeError(f"reference scores for {ml['key']} failed:\n{proc.log()[-3000:]}")
        scores = array("d")
        with open(path, "rb") as fh:
            scores.frombytes(fh.read())
        if len(scores) != plan.records:
            raise RuntimeError(f"{path}: {len(scores)} scores for {plan.records} records")
        print(f"reference scores ({ml['key']}): {len(scores):,} in {time.monotonic() - t0:.1f}s", flush=True)
    ref = C.Seqs()
    states: dict = {}
    i = 0

    def on_chunk(records) -> None:
        nonlocal i
        for _, raw in records:
            v = orjson.loads(raw)
            card = v["card_id"]
            if scores is None:
                o, states[card] = step(states.get(card), v)
            else:
                o, states[card] = step_scored(states.get(card), v, scores[i])
            ref.add(*out_hash(o, scores is not None))
            i += 1

    t0 = time.monotonic()
    C.produce_stream(topic, plan.records, n_cards=cards, seed=seed, on_chunk=on_chunk)
    print(f"input: {plan.records:,} records, {PARTITIONS} partitions, {cards:,} cards, produced with the reference "
          f"outputs in {time.monotonic() - t0:.1f}s; {plan.describe()}", flush=True)
    return ref


async def throughput_run(system: str, input_topic: str, plan: C.Plan, ref: C.Seqs, bundle: Path,
                         ml: dict | None = None) -> dict:
    """One run: start, measure the steady window, stop; then the whole output must be, card by card,
    the start of the reference's outputs (nothing duplicated, reordered or different), and hold an
    output for every committed input (exactly-once systems: exactly as many)."""
    run = Run(system, input_topic, PARTITIONS, ml["fdb"] if ml else bundle, ml=ml)
    await run.setup()
    try:
        proc = run.start()
        rss = C.RssSampler(proc.pid)
        try:
            res = await C.measure(proc, run.group, input_topic, plan, name=system, output=run.names["output"])
        finally:
            peak = rss.stop()
            proc.stop()
        committed = await C.committed_now(run.group, input_topic)
        out = await C.collect(run.names["output"], lambda _p, _k, v: out_hash(orjson.loads(v), ml is not None))
        tol = ML_SCORE_TOLERANCE if ml else 0.0
        c = C.compare_seqs(out, ref, tol=tol, reference=True)
        problem = c["problem"]
        if not problem and (out.n != committed if system in EXACTLY_ONCE else out.n < committed):
            problem = f"{out.n:,} outputs for {committed:,} committed inputs"
        if problem:
            raise AssertionError(f"{system}: outputs differ from the reference: {problem} (logs in {run.dir})")
        res.update(system=system, rss_mb=peak / 2**20, outputs=out.n, committed_final=committed,
                   near=c["near"], check=C.check_line(system, "reference", c, tol))
        return res
    finally:
        await run.cleanup()


async def recovery_run(system: str, bundle: Path, state_records: int, n_cards: int, rate: int, seed: int,
                       static: bool) -> dict:
    from bench.failover import Feeder, Watcher

    input_topic = C.unique("peers-rec-input")
    await C.create_topics({input_topic: PARTITIONS})
    C.produce(input_topic, C.transactions_cycling(state_records, n_cards=n_cards, seed=seed))
    run = Run(system, input_topic, PARTITIONS, bundle, static=static)
    await run.setup()
    feeder = watcher = None
    try:
        proc = run.start()
        async with C.GroupWatcher(run.group, input_topic) as w:
            await w.wait(state_records, timeout=max(120, state_records / 300), alive=proc.alive)
        feeder = Feeder(input_topic, rate, seed=seed + 1)
        feeder.sent = 0
        feeder.start()
        await asyncio.sleep(1.0)
        t_kill = time.monotonic()
        proc.kill9()
        await asyncio.sleep(0.3)  # whatever the dead process had in flight lands before the watcher arms
        watcher = Watcher(run.names["output"])
        await watcher.arm()
        proc2 = run.start()
        t_seen, _ = await watcher.first(lambda r: True, timeout=150)
        proc2.stop()
        return {"system": system, "static": static, "seconds": t_seen - t_kill,
                "restart_to_output": t_seen - proc2.t_spawn}
    except BaseException:
        print(f"  recovery {system}: failed; logs in {run.dir}", file=sys.stderr)
        raise
    finally:
        if watcher is not None:
            await watcher.close()
        if feeder is not None:
            await feeder.stop()
        await run.cleanup()
        await C.delete_topics([input_topic])


def java_partition(key: bytes, n: int) -> int:
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n


def bootstrap_state(changelog: str, input_topic: str, partitions: int, n_keys: int) -> float:
    """Write one committed changelog record per card (what a restore applies) — seconds taken."""
    from confluent_kafka import Producer

    from daemon.engine.state import changelog_key

    ns = "peers-scorer/s1"
    p = Producer({"bootstrap.servers": C.BOOTSTRAP, "linger.ms": 20, "batch.size": 1 << 20,
                  "queue.buffering.max.messages": 2_000_000, "acks": "all"})
    t0 = time.monotonic()
    for i in range(n_keys):
        card = f"card-{i:07d}".encode()
        value = orjson.dumps({"count": 1 + i % 7, "mean_amount": 10.0 + (i % 997) / 10})
        while True:
            try:
                p.produce(changelog, value, changelog_key(input_topic, ns, card),
                          partition=java_partition(card, partitions), headers=[("fd.checkpoint", b"0")])
                break
            except BufferError:
                p.poll(0.05)
        if i % 20000 == 0:
            p.poll(0)
    if p.flush(300):
        raise RuntimeError("changelog bootstrap not delivered")
    return time.monotonic() - t0


async def scaling_run(partitions: int, n_keys: int, plan: C.Plan, bundle: Path) -> dict:
    """failoverd-eos on ``partitions`` input partitions with ``n_keys`` keys of state (bootstrapped
    through the changelog), measured over a steady window like the throughput phase."""
    import re

    input_topic = C.unique(f"peers-scale-p{partitions}-input")
    await C.create_topics({input_topic: partitions})
    run = Run("failoverd-eos", input_topic, partitions, bundle)
    await run.setup()
    try:
        boot_s = bootstrap_state(run.names["changelog"], input_topic, partitions, n_keys)
        C.produce_stream(input_topic, plan.records, n_cards=n_keys, seed=partitions * 7 + n_keys)
        proc = run.start()
        rss = C.RssSampler(proc.pid)
        try:
            res = await C.measure(proc, run.group, input_topic, plan, name=f"scaling p={partitions} keys={n_keys}")
        finally:
            peak = rss.stop()
            proc.stop()
        restored = [float(x) for x in re.findall(r"state restored .*seconds=([\d.]+)", proc.log())]
        committed = await C.committed_now(run.group, input_topic)
        got = await C.scan(run.names["output"], lambda _p, _recs: None)
        if got != committed:
            raise AssertionError(f"scaling p={partitions} keys={n_keys}: {got} outputs for {committed} committed inputs")
        res.update(partitions=partitions, keys=n_keys, restore_s=max(restored) if restored else 0.0,
                   bootstrap_s=boot_s, first_commit_after_spawn_s=res["startup_s"], rss_mb=peak / 2**20)
        return res
    finally:
        await run.cleanup()
        await C.delete_topics([input_topic])


async def main(args) -> int:
    # counted at the output: faust commits offsets far behind its outputs on a backlog (issue17_notes.md)
    plan = dataclasses.replace(C.make_plan(args), basis="outputs")
    ml_keys = [k for k in args.releases.split(",") if k] if args.workload == "ml" else []
    keys = [s for s in (args.systems.split(",") if args.systems else (ML_DEFAULT if ml_keys else DEFAULT))]
    phases = args.phases or ("throughput" if ml_keys else "throughput,recovery,scaling")
    if ml_keys and phases != "throughput":
        raise SystemExit("--workload ml has the throughput phase only (recovery and scaling use the rule-based "
                         "workload): drop --phases or run them without --workload ml")
    rec_keys = [k for k in keys if k != "quix-eos-5s"]  # recovery: the commit interval changes nothing there
    big = 100_000 if args.quick else 1_000_000
    env = C.environment()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    bundle = peers_bundle()
    # a --no-doc run (a diagnostic) must not replace the results behind the doc (--report-only)
    name = "peers-ml-results" if ml_keys else "peers-results"
    saved = C.OUT / (f"{name}-nodoc.json" if args.no_doc else f"{name}.json")
    # ml: one set of systems per release, "sk:failoverd-eos", ...; interleaved across releases too
    tp_keys = [f"{r}:{k}" for r in ml_keys for k in keys] if ml_keys else keys
    results = {"throughput": {k: [] for k in tp_keys}, "recovery": {k: [] for k in keys}, "scaling": []}
    t_start = time.monotonic()
    inputs: dict = {}
    rels: dict = {}
    try:
        if "throughput" in phases:
            rels = {r: ml_release(r) for r in ml_keys}
            refs: dict = {}
            for r in ml_keys or [None]:
                inputs[r] = C.unique(f"peers-input-{r or 'rules'}")
                await C.create_topics({inputs[r]: PARTITIONS})
                refs[r] = make_input(inputs[r], plan, args.cards, seed=11, ml=rels.get(r))

            async def run(key: str, _round: int) -> dict:
                r, system = key.split(":") if ml_keys else (None, key)
                return await throughput_run(system, inputs[r], plan, refs[r], bundle, ml=rels.get(r))

            results["throughput"] = await C.interleaved(
                tp_keys, plan, run, describe=lambda res: f"peak RSS {res['rss_mb']:.0f} MB  (checked: {res['check']})")
            for line in C.short_windows(results["throughput"], plan):
                print(f"WARNING: {line}", flush=True)
    finally:
        await C.delete_topics(list(inputs.values()))
    if "recovery" in phases:
        state_n = args.state_records or (3_000 if args.quick else 10_000)
        rec_plan = [(r, k, True) for r in range(args.recovery_rounds or (1 if args.quick else 2)) for k in rec_keys]
        if not args.quick:  # each system's default session timeout, once, for the exactly-once systems
            rec_plan += [(0, k, False) for k in keys if k in ("failoverd-eos", "quix-eos", "faust")]
        results["recovery_default"] = {k: [] for k in keys}
        for r, k, static in rec_plan:
            res = await recovery_run(k, bundle, state_records=state_n, n_cards=state_n, rate=300, seed=100 + r,
                                     static=static)
            results["recovery" if static else "recovery_default"][k].append(res)
            print(f"recovery {r + 1} {k:14s} {'static membership' if static else 'default session'}: kill -9 -> "
                  f"first new committed output {res['seconds']:6.2f} s (restart -> output "
                  f"{res['restart_to_output']:.2f} s)", flush=True)
    if "scaling" in phases:
        # failoverd exactly-once alone: its own input size (a rate ceiling of SCALING_RATE_CEILING)
        splan = dataclasses.replace(plan, basis="commits", records=args.scaling_records or math.ceil(
            plan.seconds * SCALING_RATE_CEILING * C.HEADROOM))
        for parts, nk in ((1, args.cards), (4, args.cards), (16, args.cards), (4, big)):
            res = await scaling_run(parts, nk, splan, bundle)
            results["scaling"].append(res)
            print(f"scaling partitions={parts:2d} keys={nk:>9,}  {C.run_line(res, splan)}  restore "
                  f"{res['restore_s']:.1f}s  RSS {res['rss_mb']:.0f} MB", flush=True)
    env["commit_end"] = C.environment()["commit"]  # the engine may change while a long run goes on
    elapsed = time.monotonic() - t_start
    saved.write_text(json.dumps({"args": vars(args), "argv": sys.argv, "n": plan.records, "rounds": plan.rounds,
                                 "plan": dataclasses.asdict(plan), "workload": args.workload, "keys": keys,
                                 "ml": {r: {"label": x["label"], "fdb": x["fdb"].name, "pins": x["pins"]}
                                        for r, x in rels.items()},
                                 "state_n": args.state_records or (3_000 if args.quick else 10_000),
                                 "results": results, "env": env, "elapsed": elapsed}, indent=1))
    report(saved)
    return 0


def report(saved: Path, write: bool = True) -> None:
    d = json.loads(saved.read_text())
    res, keys, env, n = d["results"], d["keys"], d["env"], d["n"]
    args = argparse.Namespace(**d["args"])
    publish = write and not getattr(args, "no_doc", False)  # a diagnostic run leaves the doc and chart alone
    if "plan" not in d:
        raise SystemExit(f"{saved} predates the steady-window method (issue 17): re-run the benchmark")
    plan = C.Plan(**d["plan"])
    if d.get("workload") == "ml":
        report_ml(d, plan, publish)
        return
    tp = res["throughput"]
    ref = "failoverd-eos"
    med = {k: C.stats([r["rate"] for r in tp[k]])["median"] for k in keys if tp.get(k)}
    t_table = C.rate_table(tp, keys, SYSTEMS.get, ref=ref, ref_over_this=True, extra=TABLE_EXTRA)
    rrows = []
    rec_med: dict = {}
    rec_def: dict = {}
    defaults = {"failoverd-eos": "session 10 s (failoverd default)", "quix-eos": "session 45 s (librdkafka default)",
                "faust": "session 60 s (faust default)"}
    for group, label, store in (("recovery", "static membership", rec_med), ("recovery_default", None, rec_def)):
        for k in keys:
            rs = res.get(group, {}).get(k) or []
            if not rs:
                continue
            xs = [r["seconds"] for r in rs]
            store[k] = C.stats(xs)["median"]
            note = "state is lost on restart (not durable): reference only" if k == "plain" else ""
            rrows.append([SYSTEMS[k], label or defaults.get(k, "default session timeout"),
                          f"{C.stats(xs)['median']:.2f}", f"{min(xs):.2f}", f"{max(xs):.2f}",
                          f"{C.stats([r['restart_to_output'] for r in rs])['median']:.2f}", len(xs), note])
    r_table = C.md_table(["system", "group membership", "kill -9 → first new committed output, s (median)", "min",
                          "max", "of which restart → output (median)", "runs", "note"], rrows)
    srows = [[r["partitions"], f"{r['keys']:,}", C.fmt_rate(r["rate"]), f"{r['window_s']:.1f}", f"{r['restore_s']:.1f}",
              f"{r['first_commit_after_spawn_s']:.1f}", f"{r['rss_mb']:.0f}"] for r in res["scaling"]]
    s_table = C.md_table(["input partitions", "keys of state", "records/s (steady)", "window s", "state restore s",
                          "spawn → first commit s", "peak RSS MB"], srows)
    verdicts = []
    if ref in med:
        for k, target, label in (("quix-eos", 1.5, "Quix Streams exactly-once (both at 100 ms commits)"),
                                 ("quix-eos-5s", 1.5, "Quix Streams exactly-once at its default 5 s commit interval"),
                                 ("faust", 10.0, "faust-streaming agent")):
            if k in med:
                st = C.ratio_stats(tp, ref, k)  # per round, then the median (the method)
                verdicts.append(f"- failoverd exactly-once ≥ {target:g}× {label}: measured {st['median']:.2f}× "
                                f"(per-round {st['min']:.2f}–{st['max']:.2f}; medians {C.fmt_rate(med[ref])} vs "
                                f"{C.fmt_rate(med[k])} rec/s) — **{'MET' if st['median'] >= target else 'NOT MET'}**")
    for store, how in ((rec_med, "static membership on every system"), (rec_def, "each system's default session timeout")):
        if ref in store:
            others = {k: v for k, v in store.items() if k not in (ref, "plain", "failoverd-alo")}
            if others:
                ok = all(store[ref] < v for v in others.values())
                verdicts.append(f"- failoverd's restart-to-first-output shorter than every peer's ({how}): failoverd "
                                f"{store[ref]:.2f} s vs " + ", ".join(f"{SYSTEMS[k]} {v:.2f} s" for k, v in others.items())
                                + f" — **{'MET' if ok else 'NOT MET'}**")
    print("\n" + t_table + "\n\n" + r_table + "\n\n" + s_table + "\n\n" + "\n".join(verdicts))
    if publish:
        chart(d)
    big = max((r["keys"] for r in res["scaling"]), default=0)
    body = [
        "## Peers (issue 7)\n",
        f"Command: `.venv/bin/python {' '.join([os.path.relpath(d['argv'][0], C.ROOT), *d['argv'][1:]])}` "
        f"(took {d['elapsed'] / 60:.1f} min)\n",
        C.env_block(env),
        f"- workload (`bench/peers/workload.py`, the same function in every system): an input of {n:,} JSON card transactions "
        f"(~300 bytes, {args.cards:,} cards, key = card) in one topic with {PARTITIONS} partitions; logistic score "
        "over 8 features + merchant risk + log1p(amount); per-card state (count, mean amount); output "
        "`{card_id, seq, score (6 places), count, mean_amount (4 places)}`.",
        "- every throughput run is checked, record by record: card by card, the output topic (read_committed) must "
        "be the start of what the reference computes sequentially (equal after JSON decoding; a duplicate, a gap or "
        "a reordering fails the run), with an output for every input the system committed (exactly-once systems: "
        "exactly as many); every run passed.",
        "- systems: failoverd = the daemon subprocess with the bundle `bench/peers/bundle` (subprocess model "
        "worker, JSON-Schema validation of input and output, provenance headers, SQLite state + changelog, "
        "checkpoint.interval_ms=100); plain = `bench/plain_loop.py --workload peers` (dict state, no "
        "durability); Quix Streams = `bench/peers/quix_app.py` (StreamingDataFrame `apply(stateful=True)`, "
        "RocksDB state + changelog, commit_interval=0.1 s to match failoverd's 100 ms checkpoints — its default "
        "is 5 s); faust = `bench/peers/faust_app.py` (one agent, a Table with the default in-memory store + "
        "changelog, at_least_once, broker_commit_interval=0.1 s — default 2.8 s).",
        C.method_md(plan),
        "- peak RSS = sum over the process tree (daemon + model worker for failoverd), sampled every 0.2 s.\n",
        "### Throughput\n", t_table, "",
        C.per_round_md(tp, keys),
        "### Recovery after kill -9\n",
        f"Each system first processes the same {d.get('state_n', 10000):,} state-building records (one per card, so "
        "every system holds the same state: that many keys), then a feeder adds 300 records/s; 1 s later the whole "
        "process tree gets `kill -9`; 0.3 s later a read_committed watcher arms at the output's end offsets and "
        "the same command restarts (same group, same state directory). Time = from the kill to the first new "
        "committed output (includes the 0.3 s). *Static membership*: every system restarts with the same "
        "`group.instance.id` (failoverd `kafka.group_instance_id`, Quix `consumer_extra_config`, faust "
        "`consumer_group_instance_id`, aiokafka `group_instance_id`), so the broker hands the dead member's "
        "partitions to the new process at once: the time is restart + restore + first checkpoint; Quix "
        "exactly-once also gets a stable `transactional.id` there (its default is a random id per start, so the "
        "killed process's open transaction is never fenced and blocks every read_committed reader of the output "
        "until `transaction.timeout.ms`, 60 s, expires; failoverd's per-partition transactional ids fence it at "
        "once). *Default session*: no instance id, so the group waits for the dead member's session to expire "
        "first — each system's own defaults, as a user gets them.\n",
        r_table, "",
        "### failoverd scaling (exactly-once)\n",
        f"Input partitions 1/4/16 with {args.cards:,} keys of state, and 4 partitions with {big:,} keys. The state is "
        "bootstrapped by writing one committed changelog record per key (the daemon restores it at start, the "
        "same path as a restart on a new machine): streaming 1M records through the model first would take "
        "~10 min at today's rate. Then inputs drawn from all keys; steady records/s over a window as above, counted by "
        "the group's committed input offsets (failoverd alone: its commits and outputs go together).\n",
        s_table, "",
    ]
    if verdicts:
        body += ["### Targets (issue 7)\n", "\n".join(verdicts), ""]
    body.append("![peers chart](benchmarks-peers.png)\n")
    C.publish_section("peers", body, HERE / "notes.md", write=publish,
                      also=" and docs/benchmarks-peers.png")


TABLE_EXTRA = (("peak RSS MB (process tree)", lambda _k, rs: f"{max(r['rss_mb'] for r in rs):.0f}"),
               ("CPU s / 100k records", C.median_of("cpu_per_100k", "{:.0f}")))
ML_TARGETS = (("quix-eos", 3.0, "Quix Streams exactly-once"), ("faust", 10.0, "a faust-streaming agent"))


def report_ml(d: dict, plan: C.Plan, publish: bool) -> None:
    """Issue 17, target 1: per release, failoverd exactly-once against Quix Streams exactly-once and a
    faust agent (and the plain loop), each on the same fitted model and the same per-card state."""
    tp, keys, env = d["results"]["throughput"], d["keys"], d["env"]
    args = argparse.Namespace(**d["args"])
    tables, verdicts = [], []
    for r, rel in d["ml"].items():
        ks = [f"{r}:{k}" for k in keys]
        label = lambda k: SYSTEMS[k.split(":", 1)[1]]  # noqa: E731
        table = C.rate_table(tp, ks, label, ref=f"{r}:failoverd-eos", ref_name="failoverd-eos", ref_over_this=True,
                             extra=TABLE_EXTRA)
        tables += [f"#### {rel['label']} (`{rel['fdb']}`; pins {', '.join(rel['pins'])})\n", table, "",
                   C.per_round_table(tp, ks), ""]
        for k, target, what in ML_TARGETS:
            if tp.get(f"{r}:{k}") and tp.get(f"{r}:failoverd-eos"):
                st = C.ratio_stats(tp, f"{r}:failoverd-eos", f"{r}:{k}")
                verdicts.append(f"- {rel['label']}: failoverd exactly-once ≥ {target:g}× {what}: measured "
                                f"{st['median']:.2f}× (per-round {st['min']:.2f}–{st['max']:.2f}) — "
                                f"**{'MET' if st['median'] >= target else 'NOT MET'}**")
    checks = [r["check"] for rs in tp.values() for r in rs]
    near = sum(r.get("near", 0) for rs in tp.values() for r in rs)
    print("\n" + "\n".join(tables) + "\n" + "\n".join(verdicts))
    for line in C.short_windows(tp, plan):
        print(f"WARNING: {line}")
    body = [*C.section_head("### Target 1: real models (issue 17)\n", env, d["elapsed"] / 60),
            f"- workload `ml` (`bench/peers/workload.py`): the peers workload ({args.cards:,} cards, {PARTITIONS} "
            "partitions, per-card state {count, mean_amount}, output {card_id, seq, score, count, mean_amount}) with "
            "the score computed by the example release's own model class on its own fitted model file "
            "(examples/bundles/fraud-ml-sklearn: a scikit-learn pipeline, joblib; fraud-ml-onnx: the same pipeline "
            "in ONNX Runtime). failoverd runs the peers-ml bundle built from the release (its data, lock and wheels "
            "as they are; `bench/peers/ml_model.py` adds the per-card state around the release's `predict`, called "
            "once per batch); Quix Streams (`sdf.apply(stateful=True)`) and the faust agent (Table) call the same "
            "`predict` one record at a time — their per-record APIs; the plain loop (`bench/plain_loop.py "
            "--workload model`) batches like the daemon. Every peer runs on the release environment's python (the "
            "release's pins: numpy, scikit-learn / onnxruntime), the Kafka clients appended after it.",
            C.method_md(plan),
            f"- checks: every run's output, card by card, is the start of the reference (the release's scores for "
            f"the same records, computed in batches of 1000 on its environment; the state sequentially), every field "
            f"equal but the score within ±{ML_SCORE_TOLERANCE:g} (float32 / BLAS results are not batch-invariant: "
            f"{near:,} outputs needed it), and holds an output for every committed input: {len(checks)} runs, all "
            "passed.", "", *tables, *verdicts, ""]
    if publish:
        C.write_section("peers-ml", "\n".join(body))
        print(f"\nwrote the peers-ml section of {C.DOC.relative_to(C.ROOT)}")


def chart(d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, keys = d["results"], d["keys"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    tp = [(k, [r["rate"] for r in res["throughput"].get(k, [])]) for k in keys if res["throughput"].get(k)]
    ax = axes[0]
    if tp:
        import statistics

        meds = [statistics.median(v) for _, v in tp]
        lo = [m - min(v) for m, (_, v) in zip(meds, tp)]
        hi = [max(v) - m for m, (_, v) in zip(meds, tp)]
        colors = ["#1f77b4" if k.startswith("failoverd") else "#999999" for k, _ in tp]
        ax.bar([SYSTEMS[k].replace(" ", "\n", 2) for k, _ in tp], meds, yerr=[lo, hi], color=colors, capsize=4)
        ax.set_title(f"throughput, records/s (median, min–max of {d['rounds']})")
        ax.tick_params(axis="x", labelsize=7)
    rec = [(k, [r["seconds"] for r in res["recovery"].get(k, [])]) for k in keys if res["recovery"].get(k)]
    ax = axes[1]
    if rec:
        import statistics

        ax.bar([SYSTEMS[k].replace(" ", "\n", 2) for k, _ in rec], [statistics.median(v) for _, v in rec],
               color=["#1f77b4" if k.startswith("failoverd") else "#999999" for k, _ in rec])
        ax.set_title("kill -9 → first new committed output, s\n(median, static membership)")
        ax.tick_params(axis="x", labelsize=7)
    ax = axes[2]
    sc = res["scaling"]
    if sc:
        labels = [f"{r['partitions']} part.\n{r['keys']:,} keys" for r in sc]
        ax.bar(labels, [r["rate"] for r in sc], color="#1f77b4")
        ax.set_title("failoverd exactly-once: partitions and state size")
        ax.set_ylabel("records/s")
    fig.suptitle(f"failoverd vs peers — {d['env']['date']}, {d['env']['nproc']} cores, shared machine "
                 "(bench/peers/run.py)")
    fig.tight_layout()
    fig.savefig(C.ROOT / "docs" / "benchmarks-peers.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_method_args(ap, rate_ceiling=RATE_CEILING)
    ap.add_argument("--cards", type=int, default=10_000)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--workload", choices=("rules", "ml"), default="rules",
                    help="rules: bench/peers/workload.py's logistic score; ml: the example releases' fitted models "
                         "(issue 17, target 1; throughput phase only)")
    ap.add_argument("--releases", default="sk,onnx", help="--workload ml: comma-separated subset of sk,onnx")
    ap.add_argument("--systems", default="", help=f"comma-separated subset of {','.join(SYSTEMS)} (default "
                    f"{','.join(DEFAULT)}; --workload ml: {','.join(ML_DEFAULT)})")
    ap.add_argument("--phases", default="", help="comma-separated subset of throughput,recovery,scaling (default "
                    "all three; --workload ml: throughput)")
    ap.add_argument("--recovery-rounds", type=int, default=0,
                    help="static-membership recovery rounds per system (default 2, --quick 1)")
    ap.add_argument("--state-records", type=int, default=0,
                    help="recovery: keys of state built before the kill (default 10000, --quick 3000)")
    ap.add_argument("--scaling-records", type=int, default=0,
                    help="scaling inputs (default: sized for the window at 100,000 rec/s)")
    ap.add_argument("--report-only", action="store_true", help="re-render from bench/out/peers-results.json")
    a = ap.parse_args()
    if a.report_only:
        report(C.OUT / ("peers-ml-results.json" if a.workload == "ml" else "peers-results.json"), write=not a.no_doc)
        sys.exit(0)
    sys.exit(asyncio.run(main(a)))
