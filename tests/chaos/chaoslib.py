"""Machinery of the chaos suite: a paced feeder, a supervised daemon, broker kill/restart, progress.

Everything here waits on conditions with deadlines (``kafkatools.wait_for``); the only sleeps pace
the feeder and model how long a killed broker stays down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from daemon.kafka_local import LocalBroker
from tests import kafkatools
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc

SEED_ENV = "FAILOVERD_CHAOS_SEED"

FAILOVER_RE = re.compile(r"FAILOVER from=(?P<src>\S+) to=(?P<dst>\S+) reason=(?P<reason>\S+) "
                         r"replayed=(?P<replayed>\d+)")


def _now() -> str:
    return time.strftime("%H:%M:%S")


class Timeline:
    """What the test did and when, printed on failure (captured stdout) to read next to the logs."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{_now()} +{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)


# ---- the broker ---------------------------------------------------------------------------------
class BrokerControl:
    """kill -9 and restart of the local broker the tests use (whatever port the fixture gave)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.port = int(bootstrap.rsplit(":", 1)[1])
        self.local = LocalBroker(ROOT, port=self.port)
        self.kills = 0

    def is_up(self) -> bool:
        return self.local.pid() is not None and self.local.port_open()

    async def kill9(self) -> int:
        pid = self.local.pid()
        assert pid is not None, f"no broker pid in {self.local.pid_file}: is the broker on {self.bootstrap} ours?"
        os.kill(pid, signal.SIGKILL)
        self.kills += 1
        await kafkatools.wait_for(lambda: self.local.pid() is None and not self.local.port_open(), timeout=30,
                                  what=f"broker pid {pid} to die")
        return pid

    def _up_cmd(self) -> list[str]:
        return [sys.executable, "-m", "daemon", "kafka", "up", "--port", str(self.port)]

    async def up(self, timeout: float = 180) -> str:
        """Restart it the way an operator does: ``python -m daemon kafka up --port P``."""
        proc = await asyncio.create_subprocess_exec(*self._up_cmd(), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            raise AssertionError(f"`failoverd kafka up --port {self.port}` did not finish within {timeout}s")
        text = out.decode(errors="replace").strip()
        assert proc.returncode == 0, f"broker restart failed ({proc.returncode}): {text}"
        return text

    def ensure_up(self) -> None:
        """Teardown: the broker must be UP when the chaos suite ends (later tests use it)."""
        if self.is_up():
            return
        proc = subprocess.run(self._up_cmd(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"could not restart the broker on port {self.port}:\n{proc.stdout}\n{proc.stderr}")


# ---- the daemon, supervised ---------------------------------------------------------------------
@dataclasses.dataclass
class Exit:
    incarnation: int
    code: int | None
    expected: bool
    log_tail: str


class Supervisor:
    """Runs the daemon like systemd with ``Restart=on-failure`` and ``RestartSec=2`` (deploy/systemd):
    a daemon that exits unexpectedly is recorded (the test fails on it at the end) and started
    again, so the exactly-once check still covers the whole stream. A kill -9 by the test is an
    expected exit, followed at once by a restart."""

    RESTART_SEC = 2.0

    def __init__(self, config: Path, args: list[str], logdir: Path, timeline: Timeline) -> None:
        self.config = config
        self.args = args
        self.logdir = logdir
        self.timeline = timeline
        self.procs: list[DaemonProc] = []
        self.exits: list[Exit] = []
        self._died_at: float | None = None
        self._stopping = False

    @property
    def current(self) -> DaemonProc:
        return self.procs[-1]

    def start(self) -> DaemonProc:
        n = len(self.procs) + 1
        d = DaemonProc(self.config, *self.args, log=self.logdir / f"daemon-{n}.log").start()
        self.procs.append(d)
        self._died_at = None
        self._stopping = False
        self.timeline(f"daemon #{n} started (pid {d.pid})")
        return d

    def poll(self) -> bool:
        """True while the current daemon runs; restarts it (recording the exit) when it died."""
        d = self.current
        if d.alive():
            return True
        if self._stopping:
            return False  # stopped on purpose (``sigterm``): no restart
        if self._died_at is None:
            self._died_at = time.monotonic()
            code = d.proc.returncode
            self.exits.append(Exit(len(self.procs), code, False, d.log()[-5000:]))
            self.timeline(f"!! daemon #{len(self.procs)} exited on its own with code {code}; restarting it in "
                          f"{self.RESTART_SEC:.0f}s (Restart=on-failure)")
        if time.monotonic() - self._died_at >= self.RESTART_SEC:
            self.start()
        return False

    def kill9(self) -> None:
        d = self.current
        d.kill9()
        self.exits.append(Exit(len(self.procs), d.proc.returncode, True, ""))
        self.timeline(f"kill -9 of daemon #{len(self.procs)} (pid {d.pid}) and its workers")

    def sigterm(self) -> None:
        """``systemctl stop``: SIGTERM, no restart when the daemon exits (see ``stopped``)."""
        self._stopping = True
        self.current.proc.send_signal(signal.SIGTERM)
        self.timeline(f"SIGTERM to daemon #{len(self.procs)} (pid {self.current.pid})")

    async def stopped(self, timeout: float) -> int | None:
        """Exit code of a daemon stopped with ``sigterm``; None (and kill -9, as systemd does after
        TimeoutStopSec) when it is still running after ``timeout`` seconds."""
        d = self.current
        try:
            await kafkatools.wait_for(lambda: not d.alive(), timeout=timeout, interval=0.2, what="the daemon to stop")
        except AssertionError:
            d.kill9()
            self.exits.append(Exit(len(self.procs), None, True, ""))
            self.timeline(f"daemon #{len(self.procs)} still running {timeout:.0f}s after SIGTERM: kill -9")
            return None
        self.exits.append(Exit(len(self.procs), d.proc.returncode, True, ""))
        return d.proc.returncode

    def unexpected_exits(self) -> list[Exit]:
        return [e for e in self.exits if not e.expected]

    async def status(self) -> dict | None:
        code, body = await asyncio.to_thread(self.current.get, "/status")
        if code != 200:
            return None
        return json.loads(body)

    def logs(self) -> str:
        return "".join(p.log() for p in self.procs)

    def failovers(self) -> list[dict]:
        out = []
        for n, p in enumerate(self.procs, 1):
            for m in FAILOVER_RE.finditer(p.log()):
                out.append({"daemon": n, "from": m["src"], "to": m["dst"], "reason": m["reason"],
                            "replayed": int(m["replayed"])})
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.alive():
                p.kill9()


# ---- the feeder ---------------------------------------------------------------------------------
class Feeder:
    """Produces ``records`` at ``rate`` records/s in the background with one idempotent producer.

    ``lock`` is held while a chunk is in flight: an injector that takes it (a broker kill, a burst of
    fault records) knows nothing of the feeder's is on the wire. At each of ``points`` (record
    indices) the feeder waits until the previous fault's injection is over, then hands the next one
    to ``on_point(planned_index, actual_index)`` and goes on feeding while it is being injected;
    while it waits for the previous fault, the stream trickles on (``trickle`` records per 0.2 s).
    """

    def __init__(self, bootstrap: str, topic: str, records: list, *, rate: float, chunk: int = 250,
                 trickle: int = 40, points: list[int] | None = None, on_point=None) -> None:
        self.bootstrap, self.topic, self.records = bootstrap, topic, records
        self.rate, self.chunk, self.trickle = rate, chunk, trickle
        self.points = sorted(points or [])
        self.on_point = on_point
        self.lock = asyncio.Lock()
        self.sent = 0
        self.extra = 0
        self.producer: AIOKafkaProducer | None = None
        self.injection: asyncio.Task | None = None

    async def _producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            p = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                 linger_ms=5, request_timeout_ms=15000)
            await p.start()
            self.producer = p
        return self.producer

    async def _reset_producer(self) -> None:
        p, self.producer = self.producer, None
        if p is not None:
            try:
                await asyncio.wait_for(p.stop(), 10)
            except Exception:  # noqa: BLE001
                pass

    async def send(self, records: list, partition: int | None = None) -> None:
        """Send ``records`` ((key, value) pairs) until acknowledged; retried with a fresh producer
        on an error (a retry may duplicate input records: harmless, the input topic is the truth)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                producer = await self._producer()
                futures = [await producer.send(self.topic, v, key=k, partition=partition) for k, v in records]
                await asyncio.gather(*futures)
                return
            except Exception:  # noqa: BLE001
                await self._reset_producer()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _send_chunk(self, start: int, end: int) -> None:
        async with self.lock:
            await self.send(self.records[start:end])
        self.sent = end

    async def run(self) -> None:
        next_t = time.monotonic()
        points = list(self.points)
        try:
            i = 0
            while i < len(self.records):
                if points and points[0] <= i:
                    planned = points.pop(0)
                    # one fault at a time, in the planned order; until the previous one is over, the
                    # stream trickles on (a worker kill is only noticed by the next batch)
                    while self.injection is not None and not self.injection.done():
                        if i < len(self.records):
                            end = min(len(self.records), i + self.trickle)
                            await self._send_chunk(i, end)
                            i = end
                        await asyncio.wait({self.injection}, timeout=0.2)
                    if self.injection is not None:
                        self.injection.result()  # an injection that failed fails the feeder
                    self.injection = asyncio.create_task(self.on_point(planned, i))
                    await asyncio.sleep(0)
                    next_t = time.monotonic()
                end = min(len(self.records), i + self.chunk)
                if points:
                    end = max(i + 1, min(end, points[0]))
                await self._send_chunk(i, end)
                # pace at `rate`; after a wait, go on at `rate` rather than bursting to catch up
                next_t = max(next_t + (end - i) / self.rate, time.monotonic() - 1.0)
                i = end
                ahead = next_t - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if self.injection is not None:
                await self.injection
        finally:
            await self._reset_producer()


# ---- progress -----------------------------------------------------------------------------------
class Progress:
    """Committed offsets of the daemon's group vs the end offsets of the input topic."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    async def committed(self) -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            offsets = await admin.list_consumer_group_offsets(self.group)
            return {tp.partition: om.offset for tp, om in offsets.items() if tp.topic == self.topic}
        except Exception:  # noqa: BLE001 - broker down or coordinator loading: no answer yet
            return {}
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001
                pass

    async def ends(self) -> dict[int, int]:
        c = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        try:
            await c.start()
            end = await c.end_offsets(self.tps)
            return {tp.partition: off for tp, off in end.items()}
        except Exception:  # noqa: BLE001
            return {}
        finally:
            try:
                await c.stop()
            except Exception:  # noqa: BLE001
                pass

    async def total_committed(self) -> int:
        return sum((await self.committed()).values())

    async def caught_up(self, ends: dict[int, int] | None = None) -> bool:
        """Every partition committed up to ``ends`` (default: the current end offsets)."""
        ends = ends or await self.ends()
        committed = await self.committed()
        return bool(ends) and all(committed.get(p, -1) >= end for p, end in ends.items())


# nanosleep and clock_nanosleep (what time.sleep calls) on x86_64 and aarch64
_SLEEP_SYSCALLS = {"x86_64": {"35", "230"}, "aarch64": {"101", "115"}}


def sleeping_in_model(pid: int) -> bool:
    """True while process ``pid`` sleeps in a timer (``time.sleep`` in the model's predict: a "hang"
    or "slow" record is being processed), not waiting on its request pipe. Reads the kernel's
    ``/proc/PID/wchan``; where that is hidden ("0"), the current system call in ``/proc/PID/syscall``."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        if wchan not in ("", "0"):
            return wchan in ("hrtimer_nanosleep", "do_nanosleep")
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        return syscall in _SLEEP_SYSCALLS.get(os.uname().machine, set())
    except (OSError, IndexError):
        return False
