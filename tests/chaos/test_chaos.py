"""Chaos: 100,000 records through the real daemon while every kind of failure strikes at a random
point; read back with ``read_committed``, every input is there exactly once.

One stream, one daemon (supervised like systemd's ``Restart=on-failure``), 4 input partitions.
The faults, in a random order at random points of the stream (the seed decides both):

- ``worker_kill``  the test kill -9s the active model worker (v2)            -> failover, worker_crashed
- ``crash``        a record makes v2 SIGKILL its own worker process          -> failover, worker_crashed
- ``hang``         a record makes v2's predict hang                          -> failover, predict_timeout
- ``raise_all``    a record breaks v2: every batch raises from then on       -> failover, exception_rate
  (a mere ``raise`` record is a poison record since issue #11: dead-lettered, no failover)
- ``slow``         a latency spike: 12 records of one partition take 0.5 s each -> failover, latency_slo
- ``bad_output``   1200 records of one partition get outputs that violate the output schema
                                                                             -> failover, output_invalid
  (one partition: the invalid-output rate is judged per batch, and a batch drains one partition's
  fetch at a time, so the burst must fill whole batches)
- ``daemon_kill``  kill -9 of the daemon and its workers, then a restart (v2 active, v1 standby again)
- ``broker_kill``  kill -9 of the broker, down for 0.5-3 s, restarted with ``failoverd kafka up``
- and one model fault, chosen at random, is followed by a kill -9 of the daemon 0-0.5 s after its
  FAILOVER line (mid-replay, fail-back loading): the restarted daemon runs v2 again, which may meet
  the fault records once more (they were not yet behind a checkpoint) and fail over again.

How several model faults fit in one stream: v2 (obeys "fault" fields) runs active, v1 (ignores
them) standby, with ``failover.failback`` on. After a fault fails v2 over to v1, fail-back reloads
v2 as the standby; before the next model fault the test kill -9s v1's worker, which fails the
daemon back over to v2 (another real worker kill -9, reason worker_crashed), and fail-back reloads
v1 as the standby. So every model fault hits a v2 that is active with a healthy standby, and the
daemon goes through about a dozen failovers in one run. Before the next fault, the test waits
until the fault records are behind a checkpoint, so each failover has exactly one cause and its
reason can be asserted.

The daemon must ride out the broker restart, and every fault but ``daemon_kill``: we assert it
never exits on its own. If it does, the supervisor records the exit and restarts the daemon (as
systemd's ``Restart=on-failure`` would), so the exactly-once check still covers the whole stream,
and the test fails naming the exit and its log.

Bounded replay: every ``FAILOVER ... replayed=N`` line of every daemon log has
N <= interval_records x partitions + max_batch_records x partitions (the records since the last
checkpoint: the policy checkpoints once ``interval_records`` are processed in total, one fetch
returns at most ``max_batch_records``, and a partition is never rewound past its own checkpoint;
counted per partition because a retried interval may have spread differently over partitions).

``FAILOVERD_CHAOS_SEED=N`` reproduces a run's plan (fault order, points, fault partitions and
broker downtime); the seed is printed at the start and in the terminal summary.
``FAILOVERD_CHAOS_STANDBY_MODE=hot`` runs the same chaos with a hot standby (default: warm).

Thresholds are set for a loaded 2-core machine: normal 500-record batches were seen at p99 1.2 s
there, so the latency SLO is 2.5 s and the "slow" burst (12 x 0.5 s, a batch or two) exceeds it
however it is split; the predict timeout (10 s) stays above that burst.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal

import orjson
import pytest

from daemon.engine import headers as H
from tests import kafkatools, streams
from tests.chaos.chaoslib import Feeder, Progress, Supervisor, Timeline, sleeping_in_model
from tests.daemonproc import make_topics, write_config

pytestmark = pytest.mark.xdist_group("chaos-broker")  # its own broker: one worker (tests/conftest.py)

N_RECORDS = 100_000
PARTITIONS = 4
FEED_RATE = 4000  # records/s: the daemon does ~6000/s on 2 cores; faults (restarts, outages) make backlogs
INTERVAL_RECORDS = 1000
INTERVAL_MS = 200
MAX_BATCH = 500
REPLAY_BOUND = PARTITIONS * INTERVAL_RECORDS + PARTITIONS * MAX_BATCH

V1, V2 = "fraud-scorer@1.0.0", "fraud-scorer@2.0.0"

FAILOVER = {
    "standby_mode": os.environ.get("FAILOVERD_CHAOS_STANDBY_MODE", "warm"),
    "cooldown_ms": 0, "max_failovers": 100, "window_ms": 600000,
    "min_samples": 5, "error_window": 20, "error_rate_threshold": 0.5,
    "latency_p99_slo_ms": 2500, "output_invalid_rate_threshold": 0.5,
    "failback": True, "failback_delay_ms": 300,
}
WORKER = {"predict_timeout_ms": 10000, "max_batch_records": MAX_BATCH}
CHECKPOINT = {"interval_ms": INTERVAL_MS, "interval_records": INTERVAL_RECORDS}

# fault -> (records carrying it, all in one partition?, the failover reason it must cause)
DATA_FAULTS = {
    "crash": (1, True, "worker_crashed"),
    "hang": (1, True, "predict_timeout"),
    "raise_all": (1, False, "exception_rate"),
    "slow": (12, True, "latency_slo"),
    "bad_output": (1200, True, "output_invalid"),
}
FAULTS = ["worker_kill", *DATA_FAULTS, "daemon_kill", "broker_kill"]


def plan_faults(rng: random.Random, n: int) -> list[tuple[int, str]]:
    """Every fault once, shuffled, each at a random point of its own slice of the stream; one model
    fault (``X+daemon_kill``) is followed by a kill -9 of the daemon in the middle of its failover."""
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    data = [i for i, kind in enumerate(kinds) if kind in DATA_FAULTS]
    kinds[rng.choice(data)] += "+daemon_kill"
    lo, hi = int(0.04 * n), int(0.90 * n)
    width = (hi - lo) // len(kinds)
    return [(lo + k * width + rng.randrange(width // 10, width - width // 10), kind) for k, kind in enumerate(kinds)]


class Chaos:
    """Injects the planned faults into the running system and checks that each was answered."""

    def __init__(self, *, sup: Supervisor, feeder: Feeder, broker, progress: Progress, rng: random.Random,
                 plan: dict[int, str], timeline: Timeline, n_cards: int) -> None:
        self.sup, self.feeder, self.broker, self.progress = sup, feeder, broker, progress
        self.rng, self.plan, self.log, self.n_cards = rng, plan, timeline, n_cards
        self.problems: list[str] = []
        self.injected: list[str] = []
        self.fault_seq = N_RECORDS

    # ---- observing the daemon -----------------------------------------------------------
    async def status(self, predicate, what: str, timeout: float = 60.0) -> dict:
        async def check():
            self.sup.poll()
            st = await self.sup.status()
            if st is None or "active" not in st or st.get("active") is None:
                return None
            if st.get("paused"):
                raise AssertionError(f"daemon paused while waiting for {what}: {st.get('pause_reason')}")
            return st if predicate(st) else None

        return await kafkatools.wait_for(check, timeout=timeout, interval=0.2, what=what)

    async def expect_failover(self, since: int, src: str, reason: str, what: str, timeout: float = 45.0) -> dict:
        def new_failover():
            self.sup.poll()
            evs = self.sup.failovers()
            return evs[since] if len(evs) > since else None

        ev = await kafkatools.wait_for(new_failover, timeout=timeout, interval=0.2,
                                       what=f"a failover after {what}")
        self.log(f"   FAILOVER {ev['from']} -> {ev['to']} reason={ev['reason']} replayed={ev['replayed']}")
        if ev["from"] != src or ev["reason"] != reason:
            self.problems.append(f"{what}: expected a failover from {src} with reason {reason}, got {ev}")
        return ev

    async def ensure_v2_active(self) -> None:
        """v2 active with v1 ready as standby; if v1 is active, kill -9 its worker to fail back to v2."""
        st = await self.status(lambda s: s["active"]["name"] + "@" + s["active"]["version"] in (V1, V2),
                               "an active release")
        if _ref(st["active"]) == V1:
            st = await self.status(lambda s: _ref(s["active"]) == V1 and s["standby_ready"]
                                   and _ref(s["standby"]) == V2, "v2 back as standby (fail-back)")
            since = len(self.sup.failovers())
            pid = st["active"]["pid"]
            os.kill(pid, signal.SIGKILL)
            self.log(f"   kill -9 of v1's worker (pid {pid}) to make v2 active again")
            await self.expect_failover(since, V1, "worker_crashed", "kill -9 of v1's worker")
        await self.status(lambda s: _ref(s["active"]) == V2 and s["standby_ready"] and _ref(s["standby"]) == V1,
                          "v2 active with v1 ready as standby")

    # ---- the faults ---------------------------------------------------------------------
    async def inject(self, planned: int, at: int) -> None:
        kind = self.plan[planned]
        self.log(f"fault {kind} at record {at} (planned at {planned})")
        try:
            if kind.split("+")[0] in DATA_FAULTS:
                await self.data_fault(kind.split("+")[0], then_kill_daemon=kind.endswith("+daemon_kill"))
            elif kind == "worker_kill":
                await self.worker_kill()
            elif kind == "daemon_kill":
                await self.daemon_kill()
            elif kind == "broker_kill":
                await self.broker_kill()
            else:  # pragma: no cover
                raise AssertionError(kind)
            self.injected.append(kind)
        except Exception as exc:
            self.log(f"!! fault {kind} failed: {exc!r}")
            raise

    def fault_records(self, fault: str, n: int, partition: int | None) -> list[tuple[bytes, bytes]]:
        out = []
        for _ in range(n):
            self.fault_seq += 1
            key, raw = streams.transaction(self.rng, self.n_cards, self.fault_seq)
            if partition is not None:  # distinct keys: records of one partition all in one predict wave
                key = f"card-{fault}-{self.fault_seq}".encode()
            v = orjson.loads(raw)
            v["card_id"] = key.decode()
            v["fault"] = fault
            out.append((key, orjson.dumps(v)))
        return out

    async def data_fault(self, fault: str, then_kill_daemon: bool = False) -> None:
        n, one_partition, reason = DATA_FAULTS[fault]
        await self.ensure_v2_active()
        partition = self.rng.randrange(PARTITIONS) if one_partition else None
        records = self.fault_records(fault, n, partition)
        since = len(self.sup.failovers())
        async with self.feeder.lock:  # one contiguous burst
            await self.feeder.send(records, partition=partition)
        self.feeder.extra += len(records)
        self.log(f"   {n} record(s) with fault={fault} sent" + (f" to partition {partition}" if partition is not None
                                                                 else " across partitions"))
        ends = await self.progress.ends()
        await self.expect_failover(since, V2, reason, f"fault={fault}")
        if then_kill_daemon:
            # mid-failover: replaying from the checkpoint, fail-back loading v2 as the standby
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))
            self.sup.kill9()
            self.sup.start()
            await self.status(lambda s: s.get("ready"), "the restarted daemon to be ready")
            self.log("   restarted daemon is ready")
        # the next fault only once these records are behind a checkpoint: otherwise a later failover
        # back to v2 (or a daemon restart) replays them into v2 and that failover has their reason
        await kafkatools.wait_for(lambda: self.sup.poll() and self.progress.caught_up(ends), timeout=90,
                                  interval=0.5, what=f"the fault={fault} records to be checkpointed")
        self.log("   the fault records are checkpointed")
        if then_kill_daemon:
            # the restarted daemon runs v2 again: fault records not yet behind a checkpoint when it was
            # killed meet v2 again, which fails over once more for the same reason; nothing else may happen
            again = self.sup.failovers()[since + 1:]
            if len(again) > 1 or any((f["from"], f["reason"]) != (V2, reason) for f in again):
                self.problems.append(f"after fault={fault} and a daemon restart: unexpected failovers {again}")
            self.log(f"   failovers of the restarted daemon on the same records: {len(again)}")

    async def worker_kill(self) -> None:
        await self.ensure_v2_active()
        st = await self.sup.status()
        since = len(self.sup.failovers())
        pid = st["active"]["pid"]
        os.kill(pid, signal.SIGKILL)
        self.log(f"   kill -9 of the active (v2) worker pid {pid}")
        await self.expect_failover(since, V2, "worker_crashed", "kill -9 of the active worker")

    async def daemon_kill(self) -> None:
        self.sup.kill9()
        self.sup.start()  # no await in between: the watchdog never sees it down
        await self.status(lambda s: s.get("ready"), "the restarted daemon to be ready")
        self.log("   restarted daemon is ready")

    async def broker_kill(self) -> None:
        daemon = self.sup.current
        before = 0
        async with self.feeder.lock:  # the feeder waits while the broker is down
            before = await self.progress.total_committed()
            pid = await self.broker.kill9()
            down = self.rng.uniform(0.5, 3.0)
            self.log(f"   kill -9 of the broker (pid {pid}); down for {down:.1f}s")
            await asyncio.sleep(down)  # how long the broker stays down: part of the fault
            self.log(f"   broker restarted: {await self.broker.up()}")
        await kafkatools.wait_for(
            lambda: self.sup.poll() and _more(self.progress.total_committed(), before), timeout=120, interval=0.5,
            what="the daemon to commit new checkpoints after the broker restart")
        if self.sup.current is not daemon:
            self.problems.append("the daemon did not ride out the broker restart (see the exits)")
        self.log("   daemon committed new checkpoints after the broker restart")


async def _more(total, before: int) -> bool:
    return (await total) > before


def _ref(release: dict | None) -> str | None:
    return f"{release['name']}@{release['version']}" if release else None


@pytest.mark.timeout(600)
async def test_chaos_100k_records_every_fault_exactly_once(kafka_bootstrap, broker, tmp_path, chaos_bundles,
                                                          chaos_seed):
    """100,000 records, every fault of the module docstring at a random point, exactly once."""
    rng = random.Random(chaos_seed)
    log = Timeline()
    n_cards = 500
    names = await make_topics(kafka_bootstrap, "chaos", partitions=PARTITIONS)
    group = kafkatools.unique("g-chaos")
    cfg = write_config(tmp_path / "failoverd.toml", bootstrap=kafka_bootstrap, names=names,
                       state_dir=tmp_path / "state", group=group, app=kafkatools.unique("chaos"),
                       instance_id="chaos-a",
                       extra={"failover": FAILOVER, "worker": WORKER, "checkpoint": CHECKPOINT})
    sup = Supervisor(cfg, ["--active-bundle", str(chaos_bundles["v2"]), "--standby-bundle",
                           str(chaos_bundles["v1"])], tmp_path, log)
    records = streams.transactions(N_RECORDS, seed=chaos_seed, n_cards=n_cards)
    plan = plan_faults(rng, N_RECORDS)
    log("plan: " + ", ".join(f"{kind}@{at}" for at, kind in plan))
    progress = Progress(kafka_bootstrap, group, names["input"], PARTITIONS)
    feeder = Feeder(kafka_bootstrap, names["input"], records, rate=FEED_RATE, points=[at for at, _ in plan])
    chaos = Chaos(sup=sup, feeder=feeder, broker=broker, progress=progress, rng=rng, plan=dict(plan),
                  timeline=log, n_cards=n_cards)
    feeder.on_point = chaos.inject

    async def watchdog():
        while True:
            sup.poll()
            await asyncio.sleep(0.5)

    sup.start()
    watch = None
    feed = None
    try:
        await chaos.status(lambda s: s.get("ready"), "the daemon to be ready", timeout=90)
        watch = asyncio.create_task(watchdog())
        feed = asyncio.create_task(feeder.run())
        await asyncio.wait_for(asyncio.shield(feed), 420)
        log(f"feeder done: {feeder.sent} records + {feeder.extra} fault records; faults: {chaos.injected}")
        await kafkatools.wait_for(lambda: sup.poll() and progress.caught_up(), timeout=180, interval=1.0,
                                  what="the daemon to commit every input")
        log("every input committed")
        watch.cancel()
        code = sup.current.terminate()
        log(f"daemon stopped with SIGTERM: exit {code}")
        if code != 0:
            chaos.problems.append(f"SIGTERM after the chaos: exit code {code}")
    finally:
        for task in (watch, feed):
            if task is not None:
                task.cancel()
        sup.close()

    inputs, outputs, dead = await read_back(kafka_bootstrap, names)
    log(f"read back: {len(inputs)} inputs, {len(outputs)} outputs, {len(dead)} dead letters")

    problems = list(chaos.problems)
    try:
        streams.assert_exactly_once(inputs, outputs, dead)
    except AssertionError as exc:
        problems.append(f"exactly-once: {exc}")
    if len(inputs) < N_RECORDS:
        problems.append(f"only {len(inputs)} inputs in the topic")
    if sorted(chaos.injected) != sorted(kind for _, kind in plan):
        problems.append(f"injected {chaos.injected}, planned {plan}")
    # nothing valid was dead-lettered by the chaos: only v2's invalid outputs may be, and the
    # raise_all record itself when it was alone in its predict call (the last wave of its batch:
    # a card's later records go to later waves). It breaks v2 *from that record on*, so alone it
    # fails on its own exactly as a poison record does, and is dead-lettered (model_exception)
    # before every later batch fails and the exception rate fails v2 over: the two cannot be told
    # apart, and either way the record is accounted for once. Likewise a record that kills or hangs
    # v2 when no standby is ready at that moment (one is still being reloaded after an earlier
    # fault): with nothing to fail over to, crash isolation probes the batch at once and the record
    # becomes a model_crash dead letter instead of pausing the daemon (daemon/engine/isolation.py).
    reasons = collections.Counter(H.as_dict(r.headers)[H.H_DLQ_REASON].decode() for r in dead)
    allowed = {("bad_output", "output_schema"), ("raise_all", "model_exception"),
               ("crash", "model_crash"), ("hang", "model_crash")}
    for r in dead:
        why = (orjson.loads(r.value).get("fault"), H.as_dict(r.headers)[H.H_DLQ_REASON].decode())
        if why not in allowed:
            problems.append(f"unexpected dead letters: {dict(reasons)}; e.g. (fault, reason) = {why}: "
                            f"{r.value[:200]!r}")
            break
    # a record that kills, hangs or fails v2 can only have been answered by v1
    by_pos = {streams.source_position(r): r for r in outputs}
    for pos, raw in inputs.items():
        fault = orjson.loads(raw).get("fault")
        if fault in ("crash", "hang", "raise_all") and pos in by_pos:
            version = H.as_dict(by_pos[pos].headers)[H.H_RELEASE_VERSION].decode()
            if version != "1.0.0":
                problems.append(f"record {pos} with fault={fault} answered by {version}")
    failovers = sup.failovers()
    too_big = [f for f in failovers if f["replayed"] > REPLAY_BOUND]
    if too_big:
        problems.append(f"failovers replayed more than {REPLAY_BOUND} records: {too_big}")
    for e in sup.unexpected_exits():
        problems.append(f"daemon #{e.incarnation} exited on its own with code {e.code}; log tail:\n{e.log_tail}")
    log(f"{len(failovers)} failovers, replayed max {max((f['replayed'] for f in failovers), default=0)} "
        f"(bound {REPLAY_BOUND}); seed {chaos_seed}")
    assert not problems, f"seed {chaos_seed}:\n" + "\n".join(problems)


async def read_back(bootstrap: str, names: dict) -> tuple[dict, list, list]:
    """tests/streams.read_back, the three topics read concurrently (100k records: saves seconds)."""
    inputs, outputs, dead = await asyncio.gather(*(kafkatools.read_committed(bootstrap, names[role])
                                                   for role in ("input", "output", "dlq")))
    return {(r.partition, r.offset): r.value for r in inputs}, outputs, dead


TIMEOUT_STOP_SEC = 30  # deploy/systemd/failoverd.service: SIGKILL this long after SIGTERM


class OutageDaemon:
    """One daemon of the broker-outage test, with its own topics, group and state."""

    def __init__(self, name: str, sup: Supervisor, names: dict, progress: Progress) -> None:
        self.name, self.sup, self.names, self.progress = name, sup, names, progress

    @classmethod
    async def start(cls, name: str, bootstrap: str, tmp_path, args: list[str], extra: dict,
                    log: Timeline) -> "OutageDaemon":
        names = await make_topics(bootstrap, f"chaos-{name}", partitions=PARTITIONS)
        group = kafkatools.unique(f"g-chaos-{name}")
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name / "failoverd.toml", bootstrap=bootstrap, names=names,
                           state_dir=tmp_path / name / "state", group=group, app=kafkatools.unique(f"chaos-{name}"),
                           instance_id=f"chaos-{name}", extra=extra)
        sup = Supervisor(cfg, args, tmp_path / name, log)
        sup.start()
        return cls(name, sup, names, Progress(bootstrap, group, names["input"], PARTITIONS))

    async def ready(self) -> bool:
        st = await self.sup.status()
        return bool(st and st.get("ready"))

    async def open_work(self) -> dict:
        st = await self.sup.status()
        return {p["partition"]: p["position"] - p["committed"] for p in (st or {}).get("partitions", [])}


@pytest.mark.timeout(400)
async def test_chaos_broker_outage_failover_and_stop(kafka_bootstrap, broker, tmp_path, chaos_bundles, chaos_seed):
    """Two daemons (own topics each) through one kill -9 of the broker, both with checkpoint
    intervals of 5 s, so transactions are open when it dies.

    ``fo``: v2 hangs on a record; the moment its worker is seen sleeping in predict
    (``/proc/PID/wchan``), the broker is killed. The predict timeout (6 s) fires while the broker
    is down: the daemon must abort the interval (the abort itself times out without a transaction
    coordinator, so the producers are replaced), switch to v1 and go on from the checkpoint once
    the broker is back: every input exactly once, one failover (predict_timeout) with a bounded
    replay, and no exit of the daemon.

    ``stop``: in the same outage (0-6 s after the kill), an operator stops the service: SIGTERM.
    deploy/systemd says the shutdown shares one deadline that stays below ``TimeoutStopSec``
    (30 s), after which systemd sends SIGKILL; we assert the daemon exits by then (and kill -9 it
    if not, as systemd would). Restarted once the broker is back, it must lose and duplicate
    nothing either.
    """
    rng = random.Random(chaos_seed)
    log = Timeline()
    slow_checkpoints = {"interval_ms": 5000, "interval_records": 20000}
    fo = await OutageDaemon.start(
        "fo", kafka_bootstrap, tmp_path, ["--active-bundle", str(chaos_bundles["v2"]),
                                          "--standby-bundle", str(chaos_bundles["v1"])],
        {"failover": {**FAILOVER, "failback": False}, "worker": {**WORKER, "predict_timeout_ms": 6000},
         "checkpoint": slow_checkpoints}, log)
    stop = await OutageDaemon.start("stop", kafka_bootstrap, tmp_path, ["--active-bundle", str(chaos_bundles["v1"])],
                                    {"checkpoint": slow_checkpoints}, log)
    daemons = (fo, stop)
    chaos = Chaos(sup=fo.sup, feeder=None, broker=broker, progress=fo.progress, rng=rng, plan={}, timeline=log,
                  n_cards=200)
    problems: list[str] = []
    codes: dict[str, int | None] = {}
    try:
        for d in daemons:
            await kafkatools.wait_for(lambda: d.sup.poll() and d.ready(), timeout=90, interval=0.3,
                                      what=f"daemon {d.name} to be ready")
            await kafkatools.produce(kafka_bootstrap, d.names["input"],
                                     streams.transactions(2000, seed=chaos_seed, n_cards=200))
        for d in daemons:
            await kafkatools.wait_for(lambda: d.sup.poll() and d.progress.caught_up(), timeout=60, interval=0.5,
                                      what=f"daemon {d.name}: the warm-up records committed")
        burst = streams.transactions(6000, seed=chaos_seed + 1, n_cards=200)
        await kafkatools.produce(kafka_bootstrap, stop.names["input"], burst)
        at = rng.randrange(2500, 5500)
        burst.insert(at, chaos.fault_records("hang", 1, None)[0])
        v2_pid = (await fo.sup.status())["active"]["pid"]
        await kafkatools.produce(kafka_bootstrap, fo.names["input"], burst)
        log(f"6000 records to each daemon, a hang at {at} for fo; waiting for v2 (pid {v2_pid}) to hang")
        await kafkatools.wait_for(lambda: fo.sup.poll() and sleeping_in_model(v2_pid), timeout=60, interval=0.02,
                                  what="v2's worker to hang in predict")
        pid = await broker.kill9()
        log(f"v2 hangs: kill -9 of the broker (pid {pid}); records since the checkpoint: "
            f"fo {await fo.open_work()}, stop {await stop.open_work()}")
        # 0-6 s later: before, or (interval 5 s) while, the daemon's next checkpoint waits on the dead broker
        await asyncio.sleep(rng.uniform(0.0, 6.0))
        stop.sup.sigterm()
        t0 = asyncio.get_running_loop().time()
        codes["stop"] = await stop.sup.stopped(TIMEOUT_STOP_SEC)
        took = asyncio.get_running_loop().time() - t0
        log(f"daemon stop: exit {codes['stop']} {took:.1f}s after SIGTERM")
        if codes["stop"] is None:
            problems.append(f"SIGTERM while the broker is down: the daemon was still running after "
                            f"TimeoutStopSec={TIMEOUT_STOP_SEC}s (systemd SIGKILLs it then); see BUG in the report")
        await kafkatools.wait_for(lambda: fo.sup.poll() and "release failed" in fo.sup.logs(), timeout=30,
                                  interval=0.2, what="fo: v2's predict timeout while the broker is down")
        await kafkatools.wait_for(lambda: fo.sup.poll() and ("abort failed" in fo.sup.logs() or fo.sup.failovers()),
                                  timeout=30, interval=0.2, what="fo: the interval aborted while the broker is down")
        log("fo: v2 failed and its interval was aborted while the broker is down; restarting the broker")
        await asyncio.sleep(rng.uniform(0.0, 2.0))  # how much longer the broker stays down
        log(f"broker restarted: {await broker.up()}")
        stop.sup.start()  # the operator starts the stopped service again
        for d in daemons:
            await kafkatools.wait_for(lambda: d.sup.poll() and d.progress.caught_up(), timeout=120, interval=1.0,
                                      what=f"daemon {d.name}: every input committed after the broker restart")
            codes[d.name + "-end"] = d.sup.current.terminate()
        log(f"every input committed; SIGTERM exits: {codes}")
    finally:
        for d in daemons:
            d.sup.close()

    read = await asyncio.gather(*(read_back(kafka_bootstrap, d.names) for d in daemons))
    for d, (inputs, outputs, dead) in zip(daemons, read):
        log(f"{d.name}: read back {len(inputs)} inputs, {len(outputs)} outputs, {len(dead)} dead letters")
        try:
            streams.assert_exactly_once(inputs, outputs, dead)
        except AssertionError as exc:
            problems.append(f"{d.name}: exactly-once: {exc}")
        if codes.get(d.name + "-end") != 0:
            problems.append(f"{d.name}: SIGTERM after the outage: exit code {codes.get(d.name + '-end')}")
        for e in d.sup.unexpected_exits():
            problems.append(f"{d.name}: daemon #{e.incarnation} exited on its own with code {e.code}; "
                            f"log tail:\n{e.log_tail}")
    failovers = fo.sup.failovers()
    if [(f["from"], f["reason"]) for f in failovers] != [(V2, "predict_timeout")]:
        problems.append(f"fo: expected one failover of v2 on predict_timeout, got {failovers}")
    bound = PARTITIONS * slow_checkpoints["interval_records"] + PARTITIONS * MAX_BATCH
    if any(f["replayed"] > bound for f in failovers):
        problems.append(f"fo: replayed more than {bound}: {failovers}")
    assert not problems, f"seed {chaos_seed}:\n" + "\n".join(problems)
