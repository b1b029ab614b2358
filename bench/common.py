"""Shared pieces of the benchmark scripts (bench/*.py, bench/peers/run.py).

Everything here talks only to the local broker on loopback (127.0.0.1:9092 unless
FAILOVERD_BENCH_BOOTSTRAP says otherwise), creates uniquely named topics and deletes them
again, and bounds every wait by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"  # git-ignored: logs, configs, state dirs, profiles
DOC = ROOT / "docs" / "BENCHMARKS.md"
BOOTSTRAP = os.environ.get("FAILOVERD_BENCH_BOOTSTRAP", "127.0.0.1:9092")
PY = sys.executable

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def unique(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


# ---- workload --------------------------------------------------------------------------------

MERCHANTS = ["m-grocery", "m-fuel", "m-giftcards", "m-travel", "m-electronics", "m-pharmacy", "m-unknown"]
DEVICES = ["ios-17.4", "android-14", "web-chrome-124", "web-firefox-125", "pos-terminal-v3"]


def transaction(rng: random.Random, card: int, seq: int) -> tuple[bytes, bytes]:
    """One card transaction, ~300 bytes of JSON; key = card id. ``seq`` is unique per record."""
    card_id = f"card-{card:07d}"
    value = {
        "card_id": card_id,
        "seq": seq,
        "merchant_id": rng.choice(MERCHANTS),
        "amount": round(rng.uniform(1, 500), 2),
        "currency": "EUR",
        "features": [round(rng.random(), 4) for _ in range(8)],
        "device": rng.choice(DEVICES),
        "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
        "country": rng.choice(["DE", "FR", "NL", "ES", "IT"]),
        "ts": 1717000000000 + seq * 7,
        "channel": rng.choice(["card-present", "e-commerce", "contactless", "recurring"]),
        "mcc": rng.choice(["5411", "5541", "5732", "4511", "5912"]),
        "auth": f"{rng.getrandbits(32):08x}",
    }
    return card_id.encode(), orjson.dumps(value)


def transactions(n: int, *, n_cards: int, seed: int = 7, start_seq: int = 0) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [transaction(rng, rng.randrange(n_cards), start_seq + i) for i in range(n)]


def transactions_cycling(n: int, *, n_cards: int, seed: int = 7, start_seq: int = 0) -> list[tuple[bytes, bytes]]:
    """Every card once, in order, then again: ``n >= n_cards`` touches every key (state bootstrap)."""
    rng = random.Random(seed)
    return [transaction(rng, i % n_cards, start_seq + i) for i in range(n)]


# ---- Kafka helpers ---------------------------------------------------------------------------

async def create_topics(topics: dict[str, int], compact: tuple[str, ...] = ()) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, n, 1, topic_configs={"cleanup.policy": "compact"}
                                            if name in compact else {}) for name, n in topics.items()])
    finally:
        await admin.close()


async def delete_topics(names) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    names = [n for n in names if n]
    if not names:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.delete_topics(names)
    except Exception as exc:  # noqa: BLE001 - cleanup is best effort
        print(f"  (could not delete topics {names[:3]}...: {exc!r})", file=sys.stderr)
    finally:
        await admin.close()


async def delete_prefixed(prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix`` (leftovers of an interrupted run)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()
    for i in range(0, len(names), 50):
        await delete_topics(names[i:i + 50])


def produce(topic: str, records: list[tuple[bytes, bytes]], partition_of=None) -> float:
    """Produce fast with librdkafka (confluent-kafka, a quixstreams dependency); Java-compatible
    murmur2 partitioning by key, so every system sees the same partition of every key.
    Returns the seconds it took. ``partition_of(i)`` forces partitions (None = by key).
    Without confluent-kafka (the `bench` extra), falls back to aiokafka (slower, same partitioning)."""
    try:
        from confluent_kafka import Producer
    except ImportError:
        import concurrent.futures  # callers may be inside an event loop: run it on a thread of its own

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _produce_aiokafka(topic, records, partition_of)).result()

    p = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20, "batch.size": 1 << 20,
                  "queue.buffering.max.messages": 1_000_000, "acks": "all", "partitioner": "murmur2_random",
                  "compression.type": "none", "enable.idempotence": True})
    t0 = time.monotonic()
    errors: list = []

    def cb(err, _msg):
        if err is not None:
            errors.append(err)

    for i, (k, v) in enumerate(records):
        while True:
            try:
                if partition_of is None:
                    p.produce(topic, v, k, on_delivery=cb)
                else:
                    p.produce(topic, v, k, partition=partition_of(i), on_delivery=cb)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    left = p.flush(120)
    if left or errors:
        raise RuntimeError(f"producing to {topic}: {left} undelivered, errors {errors[:3]}")
    return time.monotonic() - t0


async def _produce_aiokafka(topic: str, records, partition_of) -> float:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await p.start()
    t0 = time.monotonic()
    try:
        futs = []
        for i, (k, v) in enumerate(records):
            futs.append(await p.send(topic, v, key=k, partition=None if partition_of is None else partition_of(i)))
        await asyncio.gather(*futs)
    finally:
        await p.stop()
    return time.monotonic() - t0


async def partition_count(topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP)
    await c.start()
    try:
        for _ in range(100):
            parts = c.partitions_for_topic(topic)
            if parts:
                return len(parts)
            await c._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic} has no partitions")
    finally:
        await c.stop()


async def read_all(topic: str, *, isolation: str = "read_committed", expect: int | None = None,
                   timeout: float = 120.0, values: bool = True) -> list:
    """Every record of ``topic`` from the start (read_committed by default): (partition, offset, key,
    value, headers, timestamp ms) tuples, or only a count when ``values`` is false (list of None)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, enable_auto_commit=False,
                         isolation_level=isolation, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await c.start()
    out: list = []
    try:
        n = await partition_count(topic)
        tps = [TopicPartition(topic, p) for p in range(n)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if expect is not None and len(out) >= expect:
                break
            done = True
            for tp in tps:
                if await c.position(tp) < end[tp]:
                    done = False
            if done and expect is None:
                break
            batch = await c.getmany(timeout_ms=200, max_records=50000)
            for tp, recs in batch.items():
                if values:
                    out.extend((r.partition, r.offset, r.key, r.value, r.headers, r.timestamp) for r in recs)
                else:
                    out.extend([None] * len(recs))
            if expect is not None and done:
                end = await c.end_offsets(tps)
        return out
    finally:
        await c.stop()


class GroupWatcher:
    """Polls the committed offsets of a consumer group (admin API, cheap: no records are read).

    A system commits input offsets only after (transactional: together with) the outputs of those
    inputs, so "sum of committed offsets == number of inputs" means "the last output is committed".
    """

    def __init__(self, group: str, topic: str) -> None:
        self.group, self.topic = group, topic
        self.admin = None

    async def __aenter__(self) -> "GroupWatcher":
        from aiokafka.admin import AIOKafkaAdminClient

        self.admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=5000)
        await self.admin.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.admin.close()

    async def committed(self) -> int:
        try:
            offs = await self.admin.list_consumer_group_offsets(self.group)
        except Exception:  # noqa: BLE001 - the group may not exist yet
            return 0
        return sum(max(0, o.offset) for tp, o in offs.items() if tp.topic == self.topic)

    async def wait(self, total: int, *, timeout: float, interval: float = 0.05, alive=None) -> dict:
        """Wait until ``total`` input records are committed; returns times (monotonic) and counts."""
        t_first = c_first = None
        deadline = time.monotonic() + timeout
        last = 0
        while True:
            c = await self.committed()
            now = time.monotonic()
            if c > 0 and t_first is None:
                t_first, c_first = now, c
            last = c
            if c >= total:
                return {"t_first": t_first, "c_first": c_first, "t_end": now, "committed": c}
            if now > deadline:
                raise TimeoutError(f"group {self.group}: {c} of {total} inputs committed after {timeout:.0f}s")
            if alive is not None and not alive():
                raise RuntimeError(f"group {self.group}: process under test exited with {last} of {total} committed")
            await asyncio.sleep(interval)


def steady_rate(t: dict, n: int, t_spawn: float) -> tuple[float, bool]:
    """(records/s from the first to the last commit, True) — or, when the run was too short for that
    to mean anything (first commit already held half the records, or < 0.3 s between them),
    (records/s from process spawn, False)."""
    span = t["t_end"] - t["t_first"]
    if span >= 0.3 and t["c_first"] < n / 2:
        return (n - t["c_first"]) / span, True
    return n / (t["t_end"] - t_spawn), False


# ---- processes -------------------------------------------------------------------------------

class Proc:
    """A process under test, in its own session (so kill -9 reaches its children)."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> None:
        self.argv, self.log_path = argv, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "ab")
        e = dict(os.environ, PYTHONUNBUFFERED="1")
        e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        e.update(env or {})
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill9()  # whatever is left of its session
        return self.proc.returncode


def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of a process and its children (nan without psutil)."""
    try:
        import psutil
    except ImportError:
        return float("nan")

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


class RssSampler:
    """Peak RSS (sum over the process tree) sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import threading

        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._t.join(2)
        return self.peak


# ---- failoverd -------------------------------------------------------------------------------

def build_bundle(src: Path, out: Path) -> Path:
    from daemon.bundle import build

    out.mkdir(parents=True, exist_ok=True)
    return build(src, out).path


def daemon_topics(prefix: str, partitions: int) -> dict:
    return {role: unique(f"{prefix}-{role}") for role in ("output", "dlq", "changelog", "checkpoint", "control")}


async def create_daemon_topics(names: dict, partitions: int) -> None:
    """Every topic the daemon uses, as `failoverd topics apply` would (a missing control topic would make
    the daemon poll for it for 10 s at start, refreshing full cluster metadata every 0.2 s)."""
    await create_topics({names["output"]: partitions, names["dlq"]: 1, names["changelog"]: partitions,
                         names["checkpoint"]: 1, names["control"]: 1},
                        compact=(names["changelog"], names["checkpoint"], names["control"]))


def write_config(path: Path, *, input_topic: str, names: dict, state_dir: Path, group: str, app: str,
                 extra: dict | None = None) -> Path:
    sections: dict[str, dict] = {
        "kafka": {"bootstrap_servers": BOOTSTRAP, "group_id": group},
        "app": {"name": app},
        "inputs": {"topics": [input_topic]},
        "output": {"topic": names["output"]},
        "dead_letter": {"topic": names["dlq"]},
        "checkpoint": {"interval_ms": 100, "topic": names["checkpoint"]},
        "state": {"directory": str(state_dir), "changelog_topic": names["changelog"]},
        "registry": {"path": str(state_dir / "registry"), "control_topic": names["control"]},
        "metrics": {"port": 0},
        "admin": {"bind": "127.0.0.1:0"},  # any free port: several daemons run side by side
    }
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, list):
                lines.append(f"{k} = [{', '.join(orjson.dumps(str(x)).decode() for x in v)}]")
            else:
                lines.append(f"{k} = {orjson.dumps(str(v)).decode()}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def daemon_argv(config: Path, active: Path, standby: Path | None = None) -> list[str]:
    argv = [PY, "-m", "daemon", "--log-level", "info", "run", "--config", str(config), "--active-bundle", str(active)]
    if standby is not None:
        argv += ["--standby-bundle", str(standby)]
    return argv


# ---- reporting -------------------------------------------------------------------------------

def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1]}


def quantile(xs: list[float], q: float) -> float:
    """Nearest-rank quantile (p99 of 20 samples = the maximum: said so in the docs)."""
    import math

    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def kafka_version() -> str:
    lib = ROOT / ".local" / "kafka" / "lib"
    for jar in sorted(lib.glob("kafka_*.jar")) if lib.is_dir() else []:
        m = re.match(r"kafka_[\d.]+-([\d.]+)\.jar", jar.name)
        if m:
            return m.group(1)
    return "4.4.0 (expected; jar not found)"


def environment() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    return {
        "failoverd": _pkg_version("failoverd"), "aiokafka": _pkg_version("aiokafka"),
        "kafka": kafka_version(), "quixstreams": _pkg_version("quixstreams"),
        "faust-streaming": _pkg_version("faust-streaming"), "confluent-kafka": _pkg_version("confluent-kafka"),
        "orjson": _pkg_version("orjson"), "python": platform.python_version(),
        "nproc": os.cpu_count(), "cpu": cpu, "ram": mem, "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes under daemon/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_block(env: dict) -> str:
    code = f"failoverd commit {env.get('commit', 'unknown')}"
    if env.get("commit_end") and env["commit_end"] != env.get("commit"):
        code = (f"failoverd commit {env.get('commit', 'unknown')} at the start; **the engine changed during the "
                f"run**: {env['commit_end']} at the end (see the notes below for which phases ran on which)")
    return (f"- code: {code}\n"
            f"- versions: failoverd {env['failoverd']}, aiokafka {env['aiokafka']}, Apache Kafka {env['kafka']} "
            f"(single-node KRaft broker on 127.0.0.1, shared with other work while measuring), "
            f"quixstreams {env['quixstreams']} (confluent-kafka {env['confluent-kafka']}), "
            f"faust-streaming {env['faust-streaming']}, orjson {env['orjson']}, Python {env['python']}\n"
            f"- machine: nproc={env['nproc']}, CPU {env['cpu']}, RAM {env['ram']}, Linux {env['kernel']}; "
            f"run {env['date']}\n")


HEADER = """# Benchmarks

Every number here is produced by a script in `bench/` against the real local broker (Apache Kafka,
`failoverd kafka up`, loopback only). The machine is small (2 cores) and shared with other work
while the benchmarks run, so absolute numbers are noisy: each script runs the systems it compares
**interleaved in the same run** (A B C …, A B C …) and reports ratios between them, plus the
median, minimum and maximum of the repetitions. Each script rewrites only its own section
(between the `BEGIN`/`END` marker comments) and states the exact command, versions and machine.

"""


def write_section(name: str, body: str) -> None:
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> in docs/BENCHMARKS.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def publish_section(name: str, body: list[str], notes: Path, write: bool, also: str = "") -> None:
    """Append the hand-written notes kept next to a script, then (unless ``write`` is False: a
    diagnostic run) replace the script's section of docs/BENCHMARKS.md."""
    if notes.exists():
        body = [*body, notes.read_text()]
    if write:
        write_section(name, "\n".join(body))
        print(f"\nwrote the {name} section of {DOC.relative_to(ROOT)}{also}")


async def wait_for_inputs(proc: "Proc", group: str, topic: str, n: int, *, timeout: float, name: str,
                          tail: int = 3000) -> tuple[dict, float]:
    """Wait until ``group`` committed ``n`` inputs of ``topic`` (see GroupWatcher); returns the
    times and the CPU seconds of the process tree. On failure, print the end of its log."""
    try:
        async with GroupWatcher(group, topic) as w:
            t = await w.wait(n, timeout=timeout, alive=proc.alive)
        return t, tree_cpu(proc.pid)
    except BaseException:
        print(f"  {name}: failed; log tail:\n{proc.log()[-tail:]}", file=sys.stderr)
        raise


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_rate(x: float) -> str:
    return "—" if x != x else f"{x:,.0f}"


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    script = os.path.relpath(sys.argv[0], ROOT)
    return f".venv/bin/python {script}{(' ' + args) if args else ''}"
