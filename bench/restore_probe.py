"""Probes of the engine's start-up with state (issue 17, target 5 "faster start with big state" and
target 7 "memory"), and the micro-benchmark behind an earlier finding in docs/BENCHMARKS.md.

    .venv/bin/python bench/restore_probe.py start [--keys 1000000] [--partitions 4] [--profile]
        [--order shuffled|sorted] [--cases fresh,local] [--root base=DIR --cases fresh:base,fresh]
    .venv/bin/python bench/restore_probe.py fetch-wait [--partitions 4] [--records 600]

``start``: a failoverd exactly-once daemon (the peers workload of bench/peers/) over ``--keys`` keys
of state in ``--partitions`` partitions. The state is bootstrapped by writing one committed
changelog record per key (what a restore applies; streaming 1M records through the model first
would take minutes), then two starts are measured, each with ``--inputs`` new input records
drawn from all keys waiting for it:

- *fresh*: an empty state directory, so every key is restored from the changelog (a new machine);
- *local*: the same state directory after a clean stop (SIGTERM), so the local store is kept and
  only the changelog delta past its position is read (a restart on the same machine); with
  ``--stop kill`` after a kill -9 instead (a crash: the delta since the store's last flush).

The changelog is written in shuffled key order by default (``--order sorted`` is what
bench/peers/run.py writes: SQLite inserts sorted keys several times faster, which flatters a restore).
``--root NAME=DIR`` runs the daemon of case ``fresh:NAME`` from another source tree (e.g. a ``git
archive`` of an earlier commit) against the same bootstrapped changelog: an A/B in one run.

For each: spawn → first commit (the group's committed input offsets move: the first checkpoint),
the CPU seconds of daemon + worker until then (steadier than wall time on a shared machine), the
restore's span from the daemon's log, peak RSS of the process tree (daemon + model worker, sampled
every 0.1 s), and the phases of the start from the daemon's JSON log (ms timestamps). Every output
is checked against the reference (bench/peers/workload.py applied to the bootstrapped state): a
restore that lost or mangled a key shows up as a wrong ``count``/``mean_amount``. ``--profile``
attaches py-spy (`.venv/bin/py-spy`, the bench extra) to the daemon and its worker from spawn to
the first commit and prints where the samples fell; the raw stacks stay in bench/out/restore/.

``fetch-wait``: the state restore of the engine used one shared read_committed consumer,
re-assigned partition by partition, and paid the consumer's `fetch_max_wait_ms` (aiokafka default
500 ms) once per partition after the first: the long-poll fetch still in flight for the previous
partition had to return before the newly assigned one was fetched. Writes a small transactional
changelog-like topic, then restores it that way with fetch_max_wait_ms=500 and =20, twice each,
and prints the total and per-partition seconds.

Loopback broker only (FAILOVERD_BENCH_BOOTSTRAP, else 127.0.0.1:$FAILOVERD_KAFKA_PORT, else
127.0.0.1:9092); every topic is deleted at the end. BENCH_KEEP=1 keeps logs and state.
"""

import argparse
import asyncio
import collections
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if "FAILOVERD_BENCH_BOOTSTRAP" not in os.environ and os.environ.get("FAILOVERD_KAFKA_PORT"):
    os.environ["FAILOVERD_BENCH_BOOTSTRAP"] = f"127.0.0.1:{os.environ['FAILOVERD_KAFKA_PORT']}"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "peers"))

import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from bench import common as C  # noqa: E402

OUT = C.OUT / "restore"
NS = "peers-scorer/s1"


# ---- fetch-wait (the earlier micro-benchmark) -------------------------------------------------

async def fill(topic: str, parts: int, n: int) -> None:
    p = AIOKafkaProducer(bootstrap_servers=C.BOOTSTRAP, transactional_id=C.unique("probe"))
    await p.start()
    try:
        for part in range(parts):
            await p.begin_transaction()
            for i in range(n):
                await p.send(topic, b"v" * 60, key=b"k%d" % i, partition=part)
            await p.commit_transaction()
    finally:
        await p.stop()


async def restore(topic: str, parts: int, wait_ms: int) -> tuple[float, list[float]]:
    c = AIOKafkaConsumer(bootstrap_servers=C.BOOTSTRAP, group_id=None, enable_auto_commit=False,
                         isolation_level="read_committed", auto_offset_reset="earliest", fetch_max_wait_ms=wait_ms)
    await c.start()
    per = []
    t_all = time.monotonic()
    try:
        for part in range(parts):  # like the engine's restore then: assign, seek, read to the end offset
            ctp = TopicPartition(topic, part)
            end = (await c.end_offsets([ctp]))[ctp]
            c.assign([ctp])
            c.seek(ctp, 0)
            t0, pos = time.monotonic(), 0
            while pos < end:
                await c.getmany(ctp, timeout_ms=1000, max_records=10000)
                pos = await c.position(ctp)
            per.append(round(time.monotonic() - t0, 3))
    finally:
        await c.stop()
    return round(time.monotonic() - t_all, 3), per


async def fetch_wait(args) -> int:
    topic = C.unique("probe-changelog")
    await C.create_topics({topic: args.partitions})
    try:
        await fill(topic, args.partitions, args.records)
        for wait in (500, 20, 500, 20):
            total, per = await restore(topic, args.partitions, wait)
            print(f"fetch_max_wait_ms={wait:3d}: restore of {args.partitions} partitions took {total:.3f} s "
                  f"(per partition: {per})")
    finally:
        await C.delete_topics([topic])
    return 0


# ---- start (issue 17 targets 5 and 7) ---------------------------------------------------------

def boot_state(i: int) -> dict:
    """The bootstrapped state of card ``i`` (what bootstrap_state in bench/peers/run.py writes)."""
    return {"count": 1 + i % 7, "mean_amount": 10.0 + (i % 997) / 10}


def bootstrap(changelog: str, input_topic: str, partitions: int, n_keys: int, shuffled: bool) -> float:
    """One committed changelog record per card (what bootstrap_state in bench/peers/run.py writes),
    in card order or shuffled (a real changelog is in write order: keys in no particular order,
    which costs the store's B-tree far more than sorted inserts). Returns the seconds taken."""
    import random

    from confluent_kafka import Producer

    from daemon.engine.state import changelog_key
    from peers_run import java_partition

    order = list(range(n_keys))
    if shuffled:
        random.Random(17).shuffle(order)
    p = Producer({"bootstrap.servers": C.BOOTSTRAP, "linger.ms": 20, "batch.size": 1 << 20,
                  "queue.buffering.max.messages": 2_000_000, "acks": "all"})
    t0 = time.monotonic()
    for n, i in enumerate(order):
        card = f"card-{i:07d}".encode()
        while True:
            try:
                p.produce(changelog, orjson.dumps(boot_state(i)), changelog_key(input_topic, NS, card),
                          partition=java_partition(card, partitions), headers=[("fd.checkpoint", b"0")])
                break
            except BufferError:
                p.poll(0.05)
        if n % 20000 == 0:
            p.poll(0)
    if p.flush(300):
        raise RuntimeError("changelog bootstrap not delivered")
    return time.monotonic() - t0


def expected(records: list[tuple[bytes, bytes]], states: dict) -> dict:
    from workload import step

    out = {}
    for _, raw in records:
        v = orjson.loads(raw)
        card = v["card_id"]
        if card not in states:
            states[card] = boot_state(int(card.split("-")[1]))
        o, states[card] = step(states[card], v)
        out[(o["card_id"], o["seq"])] = o
    return out


async def check(topic: str, want: dict, already: int) -> str | None:
    got = await C.read_all(topic, expect=already + len(want), timeout=120)
    seen = {}
    for _p, _o, _k, value, _h, _t in got:
        o = orjson.loads(value)
        seen.setdefault((o["card_id"], o["seq"]), []).append(o)
    mine = {k: v for k, v in seen.items() if k in want}
    dups = sum(len(v) - 1 for v in mine.values())
    missing = [k for k in want if k not in mine]
    wrong = [k for k in want if k in mine and mine[k][0] != want[k]]
    if dups or missing or wrong:
        ex = f"; e.g. {mine[wrong[0]][0]} != {want[wrong[0]]}" if wrong else ""
        return f"{dups} duplicates, {len(missing)} missing, {len(wrong)} different{ex}"
    return None


def phases(log: str, t_spawn_wall: float) -> list[tuple[float, str]]:
    """(seconds after spawn, message) of the daemon's JSON log lines that mark the start's phases."""
    keep = ("worker ready", "partitions assigned", "restoring state", "state restored", "engine started",
            "ready", "checkpoint")
    out = []
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        msg = d.get("msg", "")
        if not any(msg.startswith(k) for k in keep) or msg == "restoring state: progress":
            continue
        ts = datetime.datetime.strptime(d["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        extra = {k: v for k, v in d.items() if k in ("partition", "records", "seconds", "from", "to")}
        out.append((round(ts.timestamp() - t_spawn_wall, 3), f"{msg} {extra}" if extra else msg))
    return out


def profile_summary(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample counts of py-spy's collapsed stacks (frames named function (file:line))."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";")]
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples (100/s, active threads only)", "self:"]
    lines += [f"  {n:6d} {100 * n / max(1, total):5.1f}%  {f}" for f, n in self_c.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {n:6d} {100 * n / max(1, total):5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(lines)


async def one_start(name: str, cfg: Path, bundle: Path, group: str, input_topic: str, baseline: int,
                    n: int, profile: bool, timeout: float, root: Path, kill: bool = False) -> dict:
    argv = C.daemon_argv(cfg, bundle)
    argv[argv.index("run"):argv.index("run")] = ["--log-format", "json"]
    log_path = OUT / f"{name}.log"
    log_path.unlink(missing_ok=True)
    t_wall = time.time()
    proc = C.Proc(argv, log_path, env={"PYTHONPATH": str(root)}, cwd=root)
    rss = C.RssSampler(proc.pid, interval=0.1)
    spy = None
    raw = OUT / f"{name}.pyspy.txt"
    if profile:
        spy = subprocess.Popen([str(Path(C.PY).parent / "py-spy"), "record", "--pid", str(proc.pid), "--subprocesses",
                                "--rate", "100", "--format", "raw", "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with C.GroupWatcher(group, input_topic) as w:
            deadline = time.monotonic() + timeout
            t_first = None
            while True:
                c = await w.committed()
                now = time.monotonic()
                if c > baseline and t_first is None:
                    t_first, cpu_first = now, C.tree_cpu(proc.pid)
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                if c >= baseline + n:
                    break
                if now > deadline or not proc.alive():
                    raise RuntimeError(f"{name}: {c - baseline} of {n} inputs committed; log tail:\n{proc.log()[-3000:]}")
                await asyncio.sleep(0.02)
        peak = rss.stop()
        if kill:  # a crash: the store keeps only what its last overlay flush wrote
            proc.kill9()
            rc = proc.proc.returncode
        else:
            rc = proc.stop()
    finally:
        rss.stop()
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)
        if spy is not None:
            spy.wait(60)
        proc.kill9()
    log = proc.log()
    ph = phases(log, t_wall)
    began = [t for t, msg in ph if msg.startswith("restoring state ")]
    ended = [t for t, msg in ph if msg.startswith("state restored")]
    restored = [orjson.loads(x) for x in log.splitlines() if x.startswith("{") and '"state restored"' in x]
    return {"name": name, "first_commit_s": round(t_first - proc.t_spawn, 3), "cpu_to_first_commit_s": round(cpu_first, 2),
            "all_committed_s": round(now - proc.t_spawn, 3), "rss_mb": round(peak / 2**20, 1),
            "restore_s": round(max(ended) - min(began), 3) if began and ended else 0.0,
            "restored_records": sum(int(r["records"]) for r in restored), "exit": rc,
            "phases": ph, "profile": profile_summary(raw) if profile and raw.exists() else None}


async def start(args) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("peers_run", HERE / "peers" / "run.py")
    assert spec and spec.loader
    peers = importlib.util.module_from_spec(spec)
    sys.modules["peers_run"] = peers
    spec.loader.exec_module(peers)

    OUT.mkdir(parents=True, exist_ok=True)
    tag = C.unique("restore")
    workdir = OUT / tag
    input_topic = f"{tag}-input"
    names = C.daemon_topics(tag, args.partitions)
    await C.create_topics({input_topic: args.partitions})
    await C.create_daemon_topics(names, args.partitions)
    results = []
    try:
        src = OUT / "bundle-src"  # bench/peers/run.py's peers_bundle(), in a directory of our own
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(HERE / "peers" / "bundle", src)
        shutil.copy(HERE / "peers" / "workload.py", src / "code" / "workload.py")
        bundle = C.build_bundle(src, OUT / "bundles")
        boot_s = bootstrap(names["changelog"], input_topic, args.partitions, args.keys, args.order == "shuffled")
        print(f"bootstrapped {args.keys:,} keys ({args.order}) into {args.partitions} changelog partitions in {boot_s:.1f} s", flush=True)
        extra = {"checkpoint": {"interval_ms": 100, "exactly_once": True}}
        for section, kv in (x.split(".", 1) for x in args.set):
            k, v = kv.split("=", 1)
            extra.setdefault(section, {})[k] = int(v) if v.isdigit() else v
        cfg = C.write_config(workdir / "failoverd.toml", input_topic=input_topic, names=names,
                             state_dir=workdir / "state", group=f"{tag}-g", app=f"{tag}-app", extra=extra)
        states: dict = {}
        done = 0
        cases = args.cases.split(",")
        roots = {"": C.ROOT, **{k: Path(v).resolve() for k, v in (r.split("=", 1) for r in args.root)}}
        for i, spec in enumerate(cases):
            case, _, root_name = spec.partition(":")
            if case == "fresh":
                shutil.rmtree(workdir / "state", ignore_errors=True)
            inputs = C.transactions(args.inputs, n_cards=args.keys, seed=100 + i, start_seq=i * args.inputs)
            want = expected(inputs, states)
            C.produce(input_topic, inputs)
            res = await one_start(f"{tag}-{i}-{case}", cfg, bundle, f"{tag}-g", input_topic, done, len(inputs),
                                  args.profile, timeout=300, root=roots[root_name], kill=args.stop == "kill")
            res["case"], res["root"] = case, str(roots[root_name])
            problem = await check(names["output"], want, done)
            done += len(inputs)
            res["outputs"] = "exact" if problem is None else problem
            results.append(res)
            print(f"\n== {spec}: spawn → first commit {res['first_commit_s']:.2f} s (CPU of daemon + worker "
                  f"{res['cpu_to_first_commit_s']:.2f} s), all {len(inputs)} inputs "
                  f"committed {res['all_committed_s']:.2f} s, restore (first began → last done) {res['restore_s']:.2f} s "
                  f"({res['restored_records']:,} records), peak RSS {res['rss_mb']:.0f} MB, outputs {res['outputs']}",
                  flush=True)
            for t, msg in res["phases"]:
                print(f"  {t:7.3f}  {msg}")
            if res["profile"]:
                print(res["profile"])
        (OUT / f"{tag}.json").write_text(orjson.dumps({"argv": sys.argv, "results": results},
                                                      option=orjson.OPT_INDENT_2).decode())
        print(f"\nresults: {OUT / (tag + '.json')}")
        return 0 if all(r["outputs"] == "exact" for r in results) else 1
    finally:
        await C.delete_topics([input_topic, *names.values()])
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    fw = sub.add_parser("fetch-wait", help="the restore consumer's fetch_max_wait_ms, per partition")
    fw.add_argument("--partitions", type=int, default=4)
    fw.add_argument("--records", type=int, default=600, help="records per partition")
    st = sub.add_parser("start", help="spawn → first commit with big state: fresh and local store")
    st.add_argument("--keys", type=int, default=1_000_000)
    st.add_argument("--partitions", type=int, default=4)
    st.add_argument("--inputs", type=int, default=2000, help="input records waiting for each start")
    st.add_argument("--cases", default="fresh,local", help="starts, in order: fresh (empty state dir), local (kept)")
    st.add_argument("--stop", choices=("term", "kill"), default="term",
                    help="how each start ends once its inputs are committed: SIGTERM (a clean stop: the store "
                         "is flushed) or kill -9 (the next local start restores what the store had not flushed)")
    st.add_argument("--order", choices=("shuffled", "sorted"), default="shuffled",
                    help="changelog key order: shuffled (like a real changelog, default) or sorted (bench/peers/run.py)")
    st.add_argument("--root", action="append", default=[], metavar="NAME=DIR",
                    help="another source tree to run the daemon from, for A/B runs against one bootstrapped "
                         "state: --root base=/tmp/base --cases fresh:base,fresh,fresh:base,fresh")
    st.add_argument("--profile", action="store_true", help="py-spy from spawn to the first commit")
    st.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra daemon setting, e.g. state.cache_keys=100000")
    a = ap.parse_args()
    sys.exit(asyncio.run(fetch_wait(a) if a.mode == "fetch-wait" else start(a)))
