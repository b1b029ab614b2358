"""Shared pieces of the benchmark scripts (bench/*.py, bench/peers/run.py).

Everything here talks only to the local broker on loopback (127.0.0.1:9092, or the port
FAILOVERD_KAFKA_PORT names, as `failoverd kafka up` does; FAILOVERD_BENCH_BOOTSTRAP overrides both),
creates uniquely named topics and deletes them again, and bounds every wait by a deadline.

The measurement method every throughput script shares (issue 17) is the "method" section below:
interleaved rounds of the systems compared, each run measured over a steady window of
``--seconds`` (default 30 s) between its first and its last commit, min/median/max over the
rounds, outputs checked record by record (64-bit hashes, so millions of records fit in memory),
and one markdown shape for the tables (command, versions, machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from array import array
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"  # git-ignored: logs, configs, state dirs, profiles
DOC = ROOT / "docs" / "BENCHMARKS.md"
KAFKA_PORT = int(os.environ.get("FAILOVERD_KAFKA_PORT") or 9092)
BOOTSTRAP = os.environ.get("FAILOVERD_BENCH_BOOTSTRAP") or f"127.0.0.1:{KAFKA_PORT}"
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


def transactions_iter(n: int, *, n_cards: int, seed: int = 7, chunk: int = 50_000):
    """The records of ``transactions(n, ...)``, the same ones in the same order, in lists of ``chunk``:
    a 30 s window at 100k records/s is millions of records, too many to hold at once."""
    rng = random.Random(seed)
    for start in range(0, n, chunk):
        yield [transaction(rng, rng.randrange(n_cards), i) for i in range(start, min(n, start + chunk))]


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


def produce_stream(topic: str, n: int, *, n_cards: int, seed: int, encode=None, on_chunk=None) -> dict:
    """Produce ``transactions_iter(n, ...)`` chunk by chunk (``encode(records)`` may re-encode a chunk,
    ``on_chunk(records)`` sees every chunk as produced: a reference computed on the fly). Returns
    {"seconds": producing, "bytes_per_record": average value size}."""
    secs = 0.0
    size = 0
    for chunk in transactions_iter(n, n_cards=n_cards, seed=seed):
        if encode is not None:
            chunk = encode(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
        size += sum(len(v) for _, v in chunk)
        secs += produce(topic, chunk)
    return {"seconds": secs, "bytes_per_record": size / max(1, n)}


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


class _Counter:
    """Something counted by polling (``count``): GroupWatcher (a group's committed input offsets) or
    OutputWatcher (the records an output topic holds for a read_committed reader)."""

    async def count(self) -> int:
        raise NotImplementedError

    async def wait(self, total: int, *, timeout: float, interval: float = 0.05, alive=None,
                   window: float | None = None) -> dict:
        """Wait until the count reaches ``total`` -- or, with ``window``, until ``window`` seconds have
        passed since the count was first above 0, whichever comes first; returns times (monotonic) and
        counts ("committed" = the count at the end)."""
        t_first = c_first = None
        deadline = time.monotonic() + timeout
        last = 0
        while True:
            c = await self.count()
            now = time.monotonic()
            if c > 0 and t_first is None:
                t_first, c_first = now, c
                if window is not None:  # the window needs the time it needs, whatever the caller guessed
                    deadline = max(deadline, now + window + 60)
            last = c
            if c >= total or (window is not None and t_first is not None and now - t_first >= window):
                return {"t_first": t_first, "c_first": c_first, "t_end": now, "committed": c}
            if now > deadline:
                raise TimeoutError(f"{self}: {c} of {total} after {timeout:.0f}s")
            if alive is not None and not alive():
                raise RuntimeError(f"{self}: process under test exited at {last} of {total}")
            await asyncio.sleep(interval)


class OutputWatcher(_Counter):
    """Polls an output topic's last stable offsets (ListOffsets, read_committed: no records are read):
    the outputs a downstream read_committed reader can see -- for a transactional producer also one
    marker per partition per transaction (with 100 ms commits, 40/s on 4 partitions: < 0.2 % of the
    rates measured here). Counts what a system delivered, whatever its offset-commit cadence: faust's
    commits lag far behind its outputs on a backlog (bench/issue17_notes.md)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.consumer = None
        self.tps: list = []

    def __str__(self) -> str:
        return f"output topic {self.topic}"

    async def __aenter__(self) -> "OutputWatcher":
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.tps = [TopicPartition(self.topic, p) for p in range(await partition_count(self.topic))]
        self.consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, enable_auto_commit=False,
                                         isolation_level="read_committed")
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()

    async def count(self) -> int:
        return sum((await self.consumer.end_offsets(self.tps)).values())


class GroupWatcher(_Counter):
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

    def __str__(self) -> str:
        return f"group {self.group}"

    async def count(self) -> int:
        return await self.committed()


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
                          tail: int = 3000, window: float | None = None, output: str | None = None) -> tuple[dict, float]:
    """Wait until ``group`` committed ``n`` inputs of ``topic`` (or, with ``window``, until that many
    seconds after its first commit; see GroupWatcher) -- with ``output``, counting that output topic's
    records instead (OutputWatcher); returns the times and the CPU seconds of the process tree. On
    failure, print the end of its log."""
    try:
        async with (OutputWatcher(output) if output else GroupWatcher(group, topic)) as w:
            t = await w.wait(n, timeout=timeout, alive=proc.alive, window=window)
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



# ---- method (issue 17): steady windows, interleaved rounds, record-by-record checks ----------

WINDOW_S = 30.0
QUICK_WINDOW_S = 5.0
HEADROOM = 1.2  # the input holds seconds x rate ceiling x this: the fastest system's window still fits


def add_method_args(ap, *, rate_ceiling: float, quick_records: int | None = None, rounds: int = 3,
                    input_args: bool = False) -> None:
    """The options every throughput script shares: --quick, --seconds, --records, --rate-ceiling, --rounds;
    with ``input_args`` also --no-doc, --partitions and --cards (defaults 4 and 10,000).
    ``quick_records``: the input of a --quick run (default: sized for its window like any other)."""
    quick_input = f"{quick_records:,} records, " if quick_records else ""
    ap.add_argument("--quick", action="store_true",
                    help=f"for review: {quick_input}{QUICK_WINDOW_S:g} s windows, 1 round (a few minutes); not a "
                         "measurement")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help=f"steady window per run, from the first commit (default {WINDOW_S:g}; --quick {QUICK_WINDOW_S:g})")
    ap.add_argument("--records", type=int, default=0,
                    help=f"input records (default: seconds x --rate-ceiling x {HEADROOM:g}, so the fastest system's "
                         "window fits); a run stops at its window or at the end of the input, whichever comes first")
    ap.add_argument("--rate-ceiling", type=float, default=rate_ceiling,
                    help=f"records/s no system is expected to exceed (default {rate_ceiling:,.0f}): sizes the input; "
                         "a run whose input runs out before its window is flagged")
    ap.add_argument("--rounds", type=int, default=0, help=f"interleaved rounds (default {rounds}, --quick 1)")
    if input_args:
        ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
        ap.add_argument("--partitions", type=int, default=4, help="input partitions")
        ap.add_argument("--cards", type=int, default=10_000, help="distinct keys (cards) of the input")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a script measures: input size, window per run, interleaved rounds."""

    records: int
    seconds: float
    rounds: int
    quick: bool = False
    basis: str = "commits"
    """What the window counts: "commits" (the group's committed input offsets) or "outputs" (the
    output topic's records, read_committed: for systems whose offset commits lag their outputs)."""

    def timeout(self, startup: float = 180.0) -> float:
        """Bound on one run's wait: start-up (model load, group join, environment build) + the window
        (GroupWatcher.wait extends its deadline by the window once the first commit is seen)."""
        return startup + self.seconds

    def describe(self) -> str:
        return (f"{self.rounds} interleaved round{'s' if self.rounds != 1 else ''}, steady window {self.seconds:g} s "
                f"per run, input {self.records:,} records" + (" (--quick: not a measurement)" if self.quick else ""))


def make_plan(args, *, quick_records: int | None = None, rounds: int = 3) -> Plan:
    """--records, or (--quick with ``quick_records``: that) --seconds x --rate-ceiling x HEADROOM records."""
    quick = bool(getattr(args, "quick", False))
    seconds = args.seconds or (QUICK_WINDOW_S if quick else WINDOW_S)
    records = args.records or (quick_records if quick and quick_records else
                               math.ceil(seconds * args.rate_ceiling * HEADROOM))
    return Plan(records=records, seconds=seconds, rounds=args.rounds or (1 if quick else rounds), quick=quick)


def window_result(t: dict, proc: "Proc", cpu: float, total: int) -> dict:
    """One run's figures from GroupWatcher.wait's times: the steady rate over the window (records
    committed after the first commit ÷ time from the first commit to the end of the window), the
    window's length and records, whether the input ran out first, start-up and from-start rate."""
    c_end, span = t["committed"], t["t_end"] - t["t_first"]
    if span >= 0.3 and t["c_first"] < c_end / 2:
        rate, ok = (c_end - t["c_first"]) / span, True
    else:  # too short for a window to mean anything: from spawn, said so
        rate, ok = c_end / (t["t_end"] - proc.t_spawn), False
    return {"rate": rate, "steady_ok": ok, "window_s": span, "window_records": c_end - t["c_first"],
            "committed": c_end, "exhausted": c_end >= total, "startup_s": t["t_first"] - proc.t_spawn,
            "e2e": c_end / (t["t_end"] - proc.t_spawn), "cpu_per_100k": cpu / max(1, c_end) * 100_000}


async def measure(proc: "Proc", group: str, topic: str, plan: Plan, *, name: str, output: str | None = None) -> dict:
    """Wait for ``proc``'s steady window (see window_result) and return its figures; the caller stops it.
    ``plan.basis`` "outputs" counts the ``output`` topic's records instead of the group's commits."""
    if plan.basis == "outputs" and not output:
        raise ValueError(f"{name}: plan.basis is 'outputs' but no output topic was given to measure")
    t, cpu = await wait_for_inputs(proc, group, topic, plan.records, timeout=plan.timeout(), name=name,
                                   window=plan.seconds, output=output if plan.basis == "outputs" else None)
    return window_result(t, proc, cpu, plan.records)


async def committed_now(group: str, topic: str) -> int:
    """The group's committed input offsets, summed (after a process stopped: what it finished)."""
    async with GroupWatcher(group, topic) as w:
        return await w.committed()


async def scan(topic: str, on_batch, *, isolation: str = "read_committed", timeout: float = 600.0) -> int:
    """Every record of ``topic`` from the start to its end offsets as of now, fed partition by partition
    in offset order to ``on_batch(partition, records)`` (aiokafka ConsumerRecords); returns the count.
    Streams, so millions of records need no more memory than what ``on_batch`` keeps."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, enable_auto_commit=False,
                         isolation_level=isolation, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await c.start()
    n = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(await partition_count(topic))]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        deadline = time.monotonic() + timeout
        left = [tp for tp in tps if end[tp] > 0]
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: {n} records after {timeout:.0f}s, partitions "
                                   f"{[tp.partition for tp in left]} not at their end offsets")
            batch = await c.getmany(*left, timeout_ms=200, max_records=50_000)
            for tp, recs in batch.items():
                on_batch(tp.partition, recs)
                n += len(recs)
            left = [tp for tp in left if await c.position(tp) < end[tp]]
        return n
    finally:
        await c.stop()


class Seqs:
    """An output topic as sequences, per group (output partition, or record key), of 64-bit hashes of
    the values -- with, optionally, one float per record compared within a tolerance (a model's
    score). Python's ``hash`` is salted per process, so only compare Seqs made in one process."""

    def __init__(self) -> None:
        self.h: dict = {}
        self.f: dict = {}
        self.n = 0

    def add(self, group, h: int, f: float | None = None) -> None:
        a = self.h.get(group)
        if a is None:
            a = self.h[group] = array("q")
        a.append(h)
        if f is not None:
            b = self.f.get(group)
            if b is None:
                b = self.f[group] = array("d")
            b.append(f)
        self.n += 1


def raw_hash(_partition: int, _key, value: bytes) -> tuple:
    """Group by output partition, hash the value's bytes (outputs compared byte for byte)."""
    return _partition, hash(value), None


async def collect(topic: str, hasher=raw_hash, *, timeout: float = 600.0) -> Seqs:
    """The output topic (read_committed) as Seqs; ``hasher(partition, key, value) -> (group, hash, float|None)``."""
    seqs = Seqs()

    def on_batch(partition: int, recs) -> None:
        for r in recs:
            g, h, f = hasher(partition, r.key, r.value)
            seqs.add(g, h, f)

    await scan(topic, on_batch, timeout=timeout)
    return seqs


def compare_seqs(a: Seqs, b: Seqs, *, tol: float = 0.0, reference: bool = False) -> dict:
    """Per group, the shorter sequence must be the start of the longer (two runs stopped at different
    points of one input); with ``reference`` (``b`` holds every expected output), ``a`` must be a start
    of ``b``. A duplicate, a missing or a reordered output misaligns the rest of its group and fails.
    Returns {"compared", "exact", "near" (equal but for the float within ``tol``), "problem": "" or the
    first difference}."""
    compared = exact = near = 0
    problem = ""
    for g in sorted(set(a.h) | set(b.h), key=repr):
        xa, xb = a.h.get(g, array("q")), b.h.get(g, array("q"))
        if reference and len(xa) > len(xb):
            problem = problem or f"{g!r}: {len(xa)} outputs, only {len(xb)} inputs"
        m = min(len(xa), len(xb))
        fa, fb = a.f.get(g), b.f.get(g)
        if xa[:m] == xb[:m] and (fa is None or fb is None or fa[:m] == fb[:m]):
            compared += m
            exact += m
            continue
        for i in range(m):
            compared += 1
            if xa[i] != xb[i]:
                problem = problem or f"{g!r} #{i}: values differ"
                continue
            if fa is None or fb is None or fa[i] == fb[i]:
                exact += 1
            elif abs(fa[i] - fb[i]) <= tol + 1e-12:
                near += 1
            else:
                problem = problem or f"{g!r} #{i}: {fa[i]!r} vs {fb[i]!r} (tolerance {tol:g})"
    return {"compared": compared, "exact": exact, "near": near, "problem": problem}


def check_line(name: str, ref: str, c: dict, tol: float = 0.0) -> str:
    return (f"{name} = {ref} on {c['compared']:,} outputs" +
            (f" ({c['near']:,} equal but for the score within ±{tol:g})" if c["near"] else ""))


async def interleaved(keys: list[str], plan: Plan, run, *, after_round=None, describe=None) -> dict:
    """Run ``await run(key, round_index)`` for every key, ``plan.rounds`` times over (A B C, A B C, ...),
    print a line per run, and after every round ``after_round(round_index, {key: result})`` (may be a
    coroutine; a string it returns is printed as a check). Returns {key: [result of each round]}."""
    results: dict[str, list[dict]] = {k: [] for k in keys}
    width = max(len(k) for k in keys)
    for r in range(plan.rounds):
        for k in keys:
            res = await run(k, r)
            results[k].append(res)
            print(f"round {r + 1}/{plan.rounds} {k:{width}s} {run_line(res, plan)}"
                  + (f"  {describe(res)}" if describe else ""), flush=True)
        if after_round is not None:
            msg = after_round(r, {k: results[k][-1] for k in keys})
            if inspect.isawaitable(msg):
                msg = await msg
            if msg:
                print(f"  check: {msg}", flush=True)
    return results


def run_line(res: dict, plan: Plan) -> str:
    short = " INPUT RAN OUT before the window" if res.get("exhausted") and res["window_s"] < 0.95 * plan.seconds else ""
    return (f"steady {res['rate']:9,.0f} rec/s over {res['window_s']:5.1f} s ({res['window_records']:,} records)"
            f"  startup {res['startup_s']:.1f}s  CPU {res['cpu_per_100k']:.1f}s/100k{short}"
            + ("" if res.get("steady_ok", True) else " (too short for a window: from spawn)"))


def ratio_stats(results: dict, a: str, b: str, field: str = "rate") -> dict:
    """Stats of a/b per round (the two ran in the same round: closest in time)."""
    return stats([x[field] / y[field] for x, y in zip(results[a], results[b]) if y[field]])


def ratio_text(st: dict) -> str:
    return "—" if not st["n"] else f"{st['median']:.2f} ({st['min']:.2f}–{st['max']:.2f})"


def rate_table(results: dict, keys: list[str], label=str, *, ref: str | None = None, ref_name: str = "",
               ref_over_this: bool = False, extra: tuple = ()) -> str:
    """The shared throughput table: system, steady rec/s median/min/max over the rounds, the shortest
    window and the median records in it, the per-round ratio to ``ref`` (or ref ÷ this), then
    ``extra`` columns: (header, function of (system, its list of results) -> str)."""
    headers = ["system", "steady rec/s median", "min", "max", "window s (shortest)", "records in window (median)"]
    if ref:
        name = ref_name or ref
        headers.append(f"{name} ÷ this: median of per-round (min–max)" if ref_over_this
                       else f"ratio to {name}: median of per-round (min–max)")
    headers += [h for h, _ in extra]
    rows = []
    for k in keys:
        rs = results.get(k) or []
        if not rs:
            continue
        s = stats([r["rate"] for r in rs])
        row = [label(k), fmt_rate(s["median"]), fmt_rate(s["min"]), fmt_rate(s["max"]),
               f"{min(r['window_s'] for r in rs):.1f}" + ("*" if any(not r.get("steady_ok", True) for r in rs) else ""),
               f"{statistics.median(r['window_records'] for r in rs):,.0f}"]
        if ref:
            if k == ref:
                row.append("1 (reference)")
            elif ref in results:
                row.append(ratio_text(ratio_stats(results, ref, k) if ref_over_this else ratio_stats(results, k, ref)))
            else:
                row.append("—")
        row += [fn(k, rs) for _, fn in extra]
        rows.append(row)
    return md_table(headers, rows)


def median_of(field: str, fmt: str = "{:.1f}"):
    """An ``extra`` column for rate_table: the median of a per-run field."""
    return lambda _k, rs: fmt.format(statistics.median(r[field] for r in rs))


def per_round_table(results: dict, keys: list[str]) -> str:
    """Steady rec/s (and window) of every run, a row per interleaved round."""
    rounds = max((len(results.get(k, [])) for k in keys), default=0)
    lines = ["| round | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for i in range(rounds):
        cells = []
        for k in keys:
            rs = results.get(k, [])
            cells.append(f"{fmt_rate(rs[i]['rate'])} ({rs[i]['window_s']:.0f} s)" if i < len(rs) else "—")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_round_md(results: dict, keys: list[str]) -> str:
    """per_round_table under its caption, as every section shows it."""
    return ("Steady rec/s (and window) of every run, in run order (each row one interleaved round):\n\n"
            + per_round_table(results, keys) + "\n")


def short_windows(results: dict, plan: Plan) -> list[str]:
    """Systems whose window was shorter than asked in some run (the input ran out): a warning line each."""
    out = []
    for k, rs in results.items():
        short = [r for r in rs if r["window_s"] < 0.95 * plan.seconds]
        if short:
            out.append(f"{k}: {len(short)} of {len(rs)} runs had a window under {plan.seconds:g} s (shortest "
                       f"{min(r['window_s'] for r in short):.1f} s): the input ran out first; raise --records or "
                       "--rate-ceiling")
    return out


def method_md(plan: Plan) -> str:
    """The method bullet every section states (docs/BENCHMARKS.md, issue 17)."""
    if plan.basis == "outputs":
        counted = ("from the first record in the output topic (its last stable offsets, polled every 50 ms: what a "
                   "read_committed reader sees, whatever each system's offset-commit cadence) to the first poll at "
                   "least that long after; records/s = outputs delivered in the window ÷ its length")
    else:
        counted = ("from the group's first commit of input offsets (polled every 50 ms through the admin API; outputs "
                   "are committed with, or before, the offsets) to the first poll at least that long after; records/s "
                   "= inputs committed in the window ÷ its length")
    text = (f"- method (issue 17): {plan.rounds} interleaved round{'s' if plan.rounds != 1 else ''} (every system once "
            f"per round, in the same order); every run is measured over a **steady window of {plan.seconds:g} s**: "
            f"{counted}. Start-up (process start, model load, group join) is outside the "
            f"window. The input ({plan.records:,} records) is sized for the fastest system; a run stops at its "
            "window or at the end of the input, and the *window* column shows the shortest window of any run. "
            "median/min/max are over the rounds; a ratio is computed per round (the two systems ran minutes apart "
            "at most) and given as the median (min–max) of the rounds.")
    if plan.quick:
        text += " **This was a --quick run: windows too short to be a measurement, for review only.**"
    return text


def section_head(title: str, env: dict, took_min: float | None = None) -> list[str]:
    """Title, the command that produced the section, versions and machine."""
    took = f" (took {took_min:.1f} min)" if took_min is not None else ""
    return [title, f"Command: `{command_line()}`{took}\n", env_block(env)]


async def start_system(key: str, input_topic: str, partitions: int, run_dir: Path, *, plain: list[str] | None = None,
                       bundle: Path | None = None, daemon_extra: dict | None = None, py: str = PY,
                       env: dict | None = None, cwd: Path = ROOT) -> tuple["Proc", dict, str]:
    """Start one system under test on ``input_topic`` with a fresh group and fresh output topics:
    ``plain`` = bench/plain_loop.py with these arguments (run by ``py``), else the failoverd daemon on
    ``bundle`` (exactly-once, 100 ms checkpoints, subprocess worker, updated by ``daemon_extra``).
    Returns (process, its topics by role, its group)."""
    tag = unique(key)
    group = f"{tag}-g"
    run_dir = run_dir / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    if plain is not None:
        names = {"output": f"{tag}-output"}
        await create_topics({names["output"]: partitions})
        argv = [py, str(BENCH / "plain_loop.py"), "--bootstrap", BOOTSTRAP, "--input", input_topic,
                "--output", names["output"], "--group", group, *plain]
    else:
        names = daemon_topics(key, partitions)
        await create_daemon_topics(names, partitions)
        extra: dict = {"checkpoint": {"interval_ms": 100, "exactly_once": True}, "worker": {"mode": "subprocess"}}
        for section, values in (daemon_extra or {}).items():
            extra.setdefault(section, {}).update(values)
        cfg = write_config(run_dir / "failoverd.toml", input_topic=input_topic, names=names,
                           state_dir=run_dir / "state", group=group, app=f"{tag}-app", extra=extra)
        argv = daemon_argv(cfg, bundle)
    return Proc(argv, run_dir / "process.log", env=env, cwd=cwd), names, group


async def finish_run(proc: "Proc", names: dict, group: str, input_topic: str, *, exactly_once: bool, name: str,
                     hasher=raw_hash, collector=None):
    """After ``proc`` stopped: its output topic as Seqs (``collector(topic)`` instead, for another shape:
    anything with ``.n``), checked -- exactly one output per committed input (``exactly_once``; else at
    least one), no dead letters -- then its topics and state directory deleted."""
    try:
        committed = await committed_now(group, input_topic)
        out = await (collector(names["output"]) if collector else collect(names["output"], hasher))
        dead = len(await read_all(names["dlq"], values=False)) if "dlq" in names else 0
    finally:
        await delete_topics(list(names.values()))
        shutil.rmtree(proc.log_path.parent / "state", ignore_errors=True)
    if (out.n != committed if exactly_once else out.n < committed) or dead:
        raise AssertionError(f"{name}: {out.n:,} committed outputs and {dead} dead letters for {committed:,} committed "
                             f"inputs (log {proc.log_path})")
    return out


# ---- py-spy profiles (bench/throughput.py --profile, bench/partitions.py --profile) ----------------
async def start_profilers(proc: Proc, out: Path, *, worker: bool = True, seconds: float | None = None) -> list:
    """``py-spy record`` (raw collapsed stacks and a flame graph, 100 Hz) on the daemon and, with
    ``worker``, on its first model worker subprocess, for ``seconds`` (default: until it exits)."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    targets = [("daemon", proc.pid)]
    deadline = time.monotonic() + 30
    while worker and time.monotonic() < deadline:
        kids = [p for p in children(proc.pid) if "worker_main" in " ".join(p.cmdline())]
        if kids:
            targets.append(("worker", kids[0].pid))
            break
        await asyncio.sleep(0.05)
    duration = ["--duration", str(max(1, int(seconds) - 1))] if seconds is not None else []
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100", "--format", fmt,
                              "-o", str(out / f"{name}.{ext}"), "--nonblocking", *duration],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets for fmt, ext in (("raw", "txt"), ("flamegraph", "svg"))]


def top_frames(raw: Path, n: int = 15) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """(self-time top, inclusive top, samples) of a py-spy raw (collapsed-stack) file. Frames on
    (nearly) every stack -- interpreter, runpy, asyncio.run, the event loop -- say nothing: left out."""
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
    for f in [f for f, v in incl.items() if v >= 0.8 * total or f.startswith(("BaseEventLoop._run_once",
                                                                              "Handle._run"))]:
        del incl[f]
    pct = lambda cnt: [(f, 100.0 * v / max(1, total)) for f, v in cnt.most_common(n)]  # noqa: E731
    return pct(self_t), pct(incl), total
