"""Failover time under real faults, per standby mode, against the Kafka-native rebalance (issue 5).

    .venv/bin/python bench/failover.py           # 20 faults per mode + 10 rebalance faults (~8-11 min)
    .venv/bin/python bench/failover.py --quick   # 5 faults per mode + 1 rebalance fault (~2 min)

Standby modes (hot, warm, cold). Every fault gets a fresh set of topics (input with 4 partitions,
output, DLQ, changelog, checkpoints) and a fresh daemon: `python -m daemon run` with
fraud-scorer 2.0.0 active and 1.0.0 standby, subprocess workers, checkpoint.interval_ms=100.
A feeder in this process produces ~300-byte transactions at a steady rate the whole time. Once the
daemon has committed outputs for a while, the bench sends **kill -9 to the active model worker
process** (the child of the daemon that logged "worker ready ... channel=active"), and a
read_committed consumer on the output topic, polling tightly (fetch_max_wait_ms=5), waits for the
first committed record whose header fd.release.version is the standby's (1.0.0).
failover time = that detection - the kill. The daemon's own view (log "failover complete ...
seconds=X", the failoverd_failover_seconds metric: from the switch decision to the first committed
checkpoint) and the records replayed (log "FAILOVER ... replayed=N") are reported too.

Baseline (Kafka-native failover, no standby): two daemon instances of fraud-scorer 1.0.0 in one
consumer group, default session_timeout_ms=10000 (heartbeat 3000), dynamic membership. The bench
kills -9 one instance (daemon and worker) and waits for the first checkpoint record committed by
the survivor (instance id host-pid) for one of the dead instance's partitions: checkpoint records
are committed in the same transaction as that partition's outputs, so that is the survivor's first
committed output for them. Records replayed = outputs of those partitions that the dead instance
wrote in transactions that were then aborted (read_uncommitted minus read_committed).

Rounds are interleaved: fault i of hot, of warm, of cold, of the baseline, then fault i+1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

PARTITIONS = 4
STANDBY_VERSION = b"1.0.0"
FAILOVER = {"cooldown_ms": 0, "min_samples": 5, "error_window": 20}


class Feeder:
    """Produces transactions at ``rate`` records/s into ``topic`` until stopped."""

    def __init__(self, topic: str, rate: int, seed: int) -> None:
        self.topic, self.rate, self.seed = topic, rate, seed
        self.sent = 0
        self._stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        import random

        from aiokafka import AIOKafkaProducer

        rng = random.Random(self.seed)
        p = AIOKafkaProducer(bootstrap_servers=C.BOOTSTRAP, linger_ms=5, acks=1)
        await p.start()
        try:
            tick = 0.02
            per_tick = max(1, int(self.rate * tick))
            t0 = time.monotonic()
            while not self._stop.is_set():
                for _ in range(per_tick):
                    k, v = C.transaction(rng, rng.randrange(2000), self.sent)
                    await p.send(self.topic, v, key=k)
                    self.sent += 1
                behind = t0 + self.sent / self.rate - time.monotonic()
                if behind > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), behind)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.stop(), 5)

    def start(self) -> "Feeder":
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)


class Watcher:
    """read_committed consumer of a topic from its current end, polling tightly."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.c = None

    async def arm(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.c = AIOKafkaConsumer(bootstrap_servers=C.BOOTSTRAP, group_id=None, enable_auto_commit=False,
                                  isolation_level="read_committed", fetch_max_wait_ms=5,
                                  auto_offset_reset="latest")
        await self.c.start()
        n = await C.partition_count(self.topic)
        tps = [TopicPartition(self.topic, p) for p in range(n)]
        self.c.assign(tps)
        end = await self.c.end_offsets(tps)
        for tp in tps:
            self.c.seek(tp, end[tp])

    async def first(self, match, timeout: float) -> tuple[float, object]:
        """(monotonic time, record) of the first committed record for which ``match(record)``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await self.c.getmany(timeout_ms=5)
            now = time.monotonic()
            for recs in batch.values():
                for r in recs:
                    if match(r):
                        return now, r
        raise TimeoutError(f"no matching committed record on {self.topic} within {timeout:.0f}s")

    async def close(self) -> None:
        if self.c is not None:
            with contextlib.suppress(Exception):
                await self.c.stop()


def log_events(text: str) -> dict[str, dict]:
    """Last JSON log line per message (``--log-format json``), with ``_t`` = its time (epoch s)."""
    import calendar

    out: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            doc = orjson.loads(line)
            ts = doc["ts"]  # 2026-11-27T09:32:22.123Z
            doc["_t"] = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000
        except (ValueError, KeyError):
            continue
        out[doc.get("msg", "")] = doc
    return out


def version_of(record) -> bytes | None:
    for k, v in record.headers or ():
        if k == "fd.release.version":
            return v
    return None


async def wait_log(proc: C.Proc, pattern: str, timeout: float) -> re.Match:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = None
        for m in rx.finditer(proc.log()):
            pass
        if m is not None:
            return m
        if not proc.alive():
            raise RuntimeError(f"process exited; log tail:\n{proc.log()[-2000:]}")
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{pattern!r} not in the log within {timeout}s; tail:\n{proc.log()[-2000:]}")


async def wait_steady(group: str, topic: str, feeder: Feeder, proc_alive, *, min_committed: int,
                      timeout: float = 60) -> None:
    """Until the group has committed ``min_committed`` inputs and is less than ~0.5 s behind the feeder."""
    async with C.GroupWatcher(group, topic) as w:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = await w.committed()
            if c >= min_committed and feeder.sent - c < max(50, feeder.rate // 2):
                return
            if not all(a() for a in proc_alive):
                raise RuntimeError("a daemon exited before the fault")
            await asyncio.sleep(0.05)
    raise TimeoutError(f"group {group} did not keep up with the feeder within {timeout}s")


async def fresh_topics(prefix: str) -> tuple[str, dict]:
    input_topic = C.unique(f"{prefix}-input")
    names = C.daemon_topics(prefix, PARTITIONS)
    await C.create_topics({input_topic: PARTITIONS})
    await C.create_daemon_topics(names, PARTITIONS)
    return input_topic, names


async def standby_fault(mode: str, i: int, bundles: dict, args, workdir: Path) -> dict:
    input_topic, names = await fresh_topics(f"fo-{mode}")
    tag = C.unique(f"fo-{mode}")
    run_dir = workdir / tag
    group = f"{tag}-g"
    cfg = C.write_config(run_dir / "failoverd.toml", input_topic=input_topic, names=names,
                         state_dir=run_dir / "state", group=group, app=f"{tag}-app",
                         extra={"failover": {"standby_mode": mode, **FAILOVER}})
    feeder = Feeder(input_topic, args.rate, seed=i).start()
    argv = C.daemon_argv(cfg, bundles["v2"], bundles["v1"])
    argv.insert(argv.index("run"), "--log-format")
    argv.insert(argv.index("run"), "json")  # millisecond timestamps: the phases of each failover
    proc = C.Proc(argv, run_dir / "daemon.log")
    watcher = Watcher(names["output"])
    try:
        m = await wait_log(proc, r'"msg":"worker ready".*"release":"fraud-scorer@2\.0\.0","pid":(\d+),"channel":"active"', 60)
        worker_pid = int(m.group(1))
        await wait_steady(group, input_topic, feeder, [proc.alive], min_committed=args.rate)
        await asyncio.sleep(args.warmup)
        await watcher.arm()
        t_fault, wall_fault = time.monotonic(), time.time()
        os.kill(worker_pid, signal.SIGKILL)
        t_seen, _ = await watcher.first(lambda r: version_of(r) == STANDBY_VERSION, timeout=60)
        wall_seen = wall_fault + (t_seen - t_fault)
        await wait_log(proc, r'"msg":"failover complete"', 10)
        ev = log_events(proc.log())
        done, fo, failed = ev.get("failover complete", {}), ev.get("FAILOVER", {}), ev.get("release failed", {})
        phases = None
        if done and fo and failed:
            phases = {"detect": failed["_t"] - wall_fault, "abort_switch": fo["_t"] - failed["_t"],
                      "replay_commit": done["_t"] - fo["_t"], "visible": wall_seen - done["_t"]}
        return {"mode": mode, "seconds": t_seen - t_fault, "daemon_seconds": float(done.get("seconds", "nan")),
                "replayed": int(fo["replayed"]) if "replayed" in fo else None,
                "reason": fo.get("reason", "?"), "phases": phases}
    except BaseException:
        print(f"  {mode} fault {i}: failed; log {proc.log_path}", file=sys.stderr)
        raise
    finally:
        await watcher.close()
        proc.kill9()
        await feeder.stop()
        await C.delete_topics([input_topic, *names.values()])
        shutil.rmtree(run_dir / "state", ignore_errors=True)


async def rebalance_fault(i: int, bundles: dict, args, workdir: Path) -> dict:
    input_topic, names = await fresh_topics("fo-rebal")
    tag = C.unique("fo-rebal")
    group, app = f"{tag}-g", f"{tag}-app"
    procs = []
    for name in ("a", "b"):
        cfg = C.write_config(workdir / tag / f"{name}.toml", input_topic=input_topic, names=names,
                             state_dir=workdir / tag / f"state-{name}", group=group, app=app,
                             extra={"kafka": {"session_timeout_ms": 10000, "heartbeat_interval_ms": 3000}})
        procs.append(C.Proc(C.daemon_argv(cfg, bundles["v1"]), workdir / tag / f"{name}.log"))
    feeder = Feeder(input_topic, args.rate, seed=1000 + i).start()
    watcher = Watcher(names["checkpoint"])
    victim, survivor = procs
    try:
        # both instances own partitions (2 + 2) and keep up
        pat = r"partitions assigned assigned=\[([^\]]*)\]"
        deadline = time.monotonic() + 90
        while True:
            owned = []
            for p in procs:
                m = None
                for m in re.finditer(pat, p.log()):
                    pass
                owned.append(set(re.findall(r":(\d+)'", m.group(1))) if m else set())
            if all(owned) and len(owned[0] | owned[1]) == PARTITIONS and not (owned[0] & owned[1]):
                break
            if time.monotonic() > deadline or not all(p.alive() for p in procs):
                raise TimeoutError(f"instances did not split the partitions: {owned}")
            await asyncio.sleep(0.1)
        await wait_steady(group, input_topic, feeder, [p.alive for p in procs], min_committed=args.rate)
        await asyncio.sleep(args.warmup)
        victim_parts = {int(x) for x in owned[0]}
        survivor_instance = f"{socket.gethostname()}-{survivor.pid}"
        await watcher.arm()
        t_fault = time.monotonic()
        victim.kill9()

        def survivor_took(r) -> bool:
            try:
                v = orjson.loads(r.value)
            except Exception:  # noqa: BLE001
                return False
            return v.get("instance") == survivor_instance and v.get("partition") in victim_parts

        t_seen, _ = await watcher.first(survivor_took, timeout=90)
        await asyncio.sleep(0.5)
        survivor.kill9()
        await feeder.stop()
        committed = await C.read_all(names["output"])
        everything = await C.read_all(names["output"], isolation="read_uncommitted")
        in_victim = lambda recs: sum(1 for r in recs if r[0] in victim_parts)  # noqa: E731
        # outputs are co-partitioned with inputs (same key, same partition count): partition = source partition
        return {"mode": "rebalance", "seconds": t_seen - t_fault, "daemon_seconds": None,
                "replayed": in_victim(everything) - in_victim(committed), "reason": "session timeout + rebalance"}
    except BaseException:
        print(f"  rebalance fault {i}: failed; logs in {workdir / tag}", file=sys.stderr)
        raise
    finally:
        await watcher.close()
        for p in procs:
            p.kill9()
        await feeder.stop()
        await C.delete_topics([input_topic, *names.values()])
        for name in ("a", "b"):  # keep the logs (bench/out/failover/<tag>/*.log) for outliers
            shutil.rmtree(workdir / tag / f"state-{name}", ignore_errors=True)


async def main(args) -> int:
    if args.report_only:
        import json

        d = json.loads((C.OUT / "failover-results.json").read_text())
        ns = argparse.Namespace(**d["args"])
        ns.no_doc = args.no_doc
        sys.argv = d.get("argv", sys.argv)
        report(d["results"], [m for m in ns.modes.split(",") if m], ns, d["env"], d.get("elapsed", 0.0))
        return 0
    faults = args.faults or (5 if args.quick else 20)
    rebal = args.rebalance_faults if args.rebalance_faults >= 0 else (1 if args.quick else 10)
    modes = [m for m in args.modes.split(",") if m]
    env = C.environment()
    workdir = C.OUT / "failover"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    bundles = {v: C.build_bundle(C.ROOT / "examples" / "bundles" / f"fraud-{v}", C.OUT / "bundles")
               for v in ("v1", "v2")}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    results["rebalance"] = []
    t_start = time.monotonic()
    for i in range(max(faults, rebal)):
        for mode in modes:
            if i < faults:
                r = await standby_fault(mode, i, bundles, args, workdir)
                results[mode].append(r)
                print(f"fault {i + 1:2d} {mode:5s} {r['seconds'] * 1000:7.0f} ms  (daemon: "
                      f"{r['daemon_seconds'] * 1000:.0f} ms, replayed {r['replayed']}, reason {r['reason']})",
                      flush=True)
        if i < rebal:
            r = await rebalance_fault(i, bundles, args, workdir)
            results["rebalance"].append(r)
            print(f"fault {i + 1:2d} rebalance {r['seconds'] * 1000:7.0f} ms  (replayed {r['replayed']})", flush=True)
    elapsed = time.monotonic() - t_start
    import json

    env["commit_end"] = C.environment()["commit"]  # the engine may change while a long run goes on
    name = "failover-results-nodoc.json" if args.no_doc else "failover-results.json"  # --no-doc: a diagnostic
    (workdir.parent / name).write_text(json.dumps(
        {"args": vars(args), "argv": sys.argv, "results": results, "env": env, "elapsed": elapsed}, indent=1))
    report(results, modes, args, env, elapsed)
    return 0


def report(results: dict, modes: list[str], args, env: dict, elapsed: float) -> None:
    base = [r["seconds"] for r in results["rebalance"]]
    base_p50 = C.quantile(base, 0.5) if base else float("nan")
    rows = []
    verdicts = []
    for mode in [*modes, "rebalance"]:
        rs = results[mode]
        if not rs:
            continue
        secs = [r["seconds"] for r in rs]
        d = [r["daemon_seconds"] for r in rs if r["daemon_seconds"] is not None]
        rep = [r["replayed"] for r in rs if r["replayed"] is not None]
        p50, p99, mx = C.quantile(secs, 0.5), C.quantile(secs, 0.99), max(secs)
        speedup = base_p50 / p50 if base and mode != "rebalance" else None
        label = {"rebalance": "baseline: 2 instances, kill -9 one, Kafka rebalance (session 10 s)"}.get(
            mode, f"failoverd {mode} standby, kill -9 of the active worker")
        rows.append([label, len(rs), f"{p50 * 1000:.0f}", f"{p99 * 1000:.0f}", f"{mx * 1000:.0f}",
                     f"{C.quantile(d, 0.5) * 1000:.0f} / {C.quantile(d, 0.99) * 1000:.0f}" if d else "—",
                     f"{C.quantile(rep, 0.5):.0f} / {max(rep)}" if rep else "—",
                     f"{speedup:.0f}×" if speedup else "—"])
        if mode in ("hot", "warm"):
            ok = p50 <= 0.25 and p99 <= 1.0 and (speedup or 0) >= 10
            verdicts.append(f"- {mode}: p50 {p50 * 1000:.0f} ms (target ≤ 250), p99 {p99 * 1000:.0f} ms (target ≤ 1000), "
                            f"{speedup:.0f}× faster than the rebalance baseline at p50 (target ≥ 10×): "
                            f"**{'MET' if ok else 'NOT MET'}**" if speedup else f"- {mode}: no baseline measured")
    prow = []
    for mode in modes:
        ph = [r["phases"] for r in results[mode] if r.get("phases")]
        if ph:
            prow.append([mode, len(ph)] + [f"{C.quantile([p[k] for p in ph], 0.5) * 1000:.0f} / "
                                             f"{max(p[k] for p in ph) * 1000:.0f}"
                                             for k in ("detect", "abort_switch", "replay_commit", "visible")])
    phase_table = C.md_table(["standby mode", "faults", "kill → `release failed` logged (detection)",
                              "→ `FAILOVER` logged (abort open transactions, switch; cold: load)",
                              "→ `failover complete` (replay from checkpoint, first commit)",
                              "→ seen by the read_committed consumer (negative: the first partition's "
                              "commit was visible before the daemon logged the whole checkpoint)"], prow) if prow else ""
    headers = ["failure handling", "faults", "p50 ms", "p99 ms", "max ms", "daemon's own view p50 / p99 ms",
               "records replayed p50 / max", "p50 speed-up vs rebalance"]
    table = C.md_table(headers, rows)
    print()
    print(table)
    print(phase_table)
    print("\n".join(verdicts))
    body = [
        "## Failover (issue 5)\n",
        f"Command: `{C.command_line()}` (took {elapsed / 60:.1f} min)\n",
        C.env_block(env),
        f"- every fault: fresh topics (input {PARTITIONS} partitions) and a fresh daemon (`python -m daemon run "
        f"--active-bundle fraud-scorer-2.0.0 --standby-bundle fraud-scorer-1.0.0`, subprocess workers, "
        f"checkpoint.interval_ms=100, failover.cooldown_ms=0); a feeder produces ~300-byte transactions at "
        f"{args.rate} records/s throughout; after the daemon keeps up and {args.warmup:.1f} s more, the bench "
        f"sends `kill -9` to the active model worker process (pid from the daemon's \"worker ready ... "
        f"channel=active\" line).",
        "- **failover time** = from the kill to the moment a read_committed consumer of the output topic (armed "
        "at the end offsets before the kill, fetch_max_wait_ms=5) receives the first record whose header "
        "`fd.release.version` is the standby's (1.0.0): measured from the outside, it includes detection of the "
        "dead worker, aborting the open transactions, the switch, (cold: loading the standby), replaying from "
        "the last checkpoint and the first checkpoint commit.",
        "- *daemon's own view*: the `failover complete ... seconds=X` log line (= the failoverd_failover_seconds "
        "histogram): from the switch decision to the first committed checkpoint after it; it leaves out "
        "detection and the abort before the switch. *records replayed*: `replayed=N` of the daemon's FAILOVER "
        "line (inputs processed after the last checkpoint, processed again by the standby).",
        "- baseline: two `fraud-scorer 1.0.0` daemons in one group (no standby), default "
        "`session_timeout_ms=10000`, `heartbeat_interval_ms=3000`, dynamic membership; `kill -9` of one "
        "instance's process group (daemon + worker); time to the first checkpoint record committed by the "
        "survivor for one of the dead instance's partitions (same transaction as those outputs). Replayed = the "
        "dead instance's outputs of those partitions that were aborted.",
        "- p99 is the nearest-rank 99th percentile: with fewer than 100 faults per mode it is the largest "
        "sample, i.e. the max.\n",
        table, "",
    ]
    if phase_table:
        body.append("Where the failover time goes (median / max ms per phase; from the daemon's JSON log "
                    "timestamps, millisecond resolution, against the bench's clock at the kill):\n")
        body.append(phase_table + "\n")
    if verdicts:
        body.append("Targets (issue 5): hot and warm p50 ≤ 250 ms and p99 ≤ 1 s, and at least 10× faster than the "
                    "rebalance baseline:\n")
        body.append("\n".join(verdicts) + "\n")
    per = ["| fault | " + " | ".join([*modes, "rebalance"]) + " |", "|---|" + "---|" * (len(modes) + 1)]
    for i in range(max(len(v) for v in results.values())):
        per.append(f"| {i + 1} | " + " | ".join(
            f"{results[m][i]['seconds'] * 1000:.0f}" if i < len(results[m]) else "—" for m in [*modes, "rebalance"])
            + " |")
    body.append("Every fault, in run order (ms from kill to the first committed output of the new owner):\n")
    body.append("\n".join(per) + "\n")
    C.publish_section("failover", body, NOTES, write=not args.no_doc)


NOTES = Path(__file__).resolve().parent / "failover_notes.md"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 faults per mode, 1 rebalance fault (~2 min)")
    ap.add_argument("--faults", type=int, default=0, help="faults per standby mode (default 20, --quick 5)")
    ap.add_argument("--rebalance-faults", type=int, default=-1, help="baseline faults (default 10, --quick 1)")
    ap.add_argument("--modes", default="hot,warm,cold")
    ap.add_argument("--rate", type=int, default=500, help="input records/s fed during each fault")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of steady processing before the fault")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="re-render from bench/out/failover-results.json")
    sys.exit(asyncio.run(main(ap.parse_args())))
