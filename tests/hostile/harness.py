"""Machinery of the hostile suite: bundles written from a model's source, inputs whose positions are
known from the produce acknowledgements (a hostile record may be unreadable by aiokafka, so the
input topic is never read back), a real daemon with an active and a standby release, and the checks
every run makes: every input once under read_committed, each output answers its own input, and the
pipeline finishes on its own (alive, exit 0 on SIGTERM, no process of its left behind).

Everything waits on conditions with deadlines (``kafkatools.wait_for``); nothing sleeps and hopes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import subprocess
import textwrap
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from daemon.engine import headers as H
from tests import bundlesmith, kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config  # noqa: F401 - DaemonProc for tests
from tests.integration.test_failover import FAST_FAILOVER, assert_switched_once, release_of  # noqa: F401 - for tests

PAUSED_GIVE_UP_S = 10.0
"""A daemon paused this long while inputs wait will not finish on its own (a standby reloads in
about a second): the wait fails then instead of at its deadline."""

GOOD_VERSION = "1.0.0"
HOSTILE_VERSION = "2.0.0"  # assert_switched_once's default switch is from HOSTILE_VERSION to GOOD_VERSION

# ---- bundles --------------------------------------------------------------------------------------
INPUT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
    "required": ["card_id", "amount", "features"],
    "properties": {"card_id": {"type": "string", "minLength": 1}, "amount": {"type": "number"},
                   "features": {"type": "array", "items": {"type": "number"}}},
    "additionalProperties": True,
}
OUTPUT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
    "required": ["card_id", "count", "seq", "score"],
    "properties": {"card_id": {"type": "string"}, "count": {"type": "integer", "minimum": 1},
                   "seq": {"type": ["integer", "null"]}, "score": {"type": "number"}},
    "additionalProperties": True,  # lets a hostile model pad an output past what the broker accepts
}

PROTOCOL_OUT = '''\
def protocol_out():
    """The worker's protocol channel (what a model is never meant to reach): main()'s proto_out."""
    f = sys._getframe()
    while f is not None:
        if "proto_out" in f.f_locals:
            return f.f_locals["proto_out"]
        f = f.f_back
    raise RuntimeError("protocol channel not found")
'''
"""Model source (needs ``import sys``) of ``protocol_out()``: the channel a hostile model writes
its own frames on, found by walking up the worker's stack to ``main()``."""

MODEL_TEMPLATE = '''\
"""A model of the hostile suite: counts records per card; misbehaves on records marked "fault"."""
import ctypes
import math
import os
import signal
import subprocess
import sys
import time

from daemon.model import Prediction


{protocol_out}

class Model:
    def __init__(self, context):
        self.context = context
{init}

    def good(self, r):
        count = (r.state or {{}}).get("count", 0) + 1
        return Prediction({{"card_id": r.value["card_id"], "count": count, "seq": r.value.get("seq"),
                           "score": 0.5}}, {{"count": count}})

    def predict(self, batch):
        results = [self.good(r) for r in batch]
{on_batch}
        faulty = [i for i, r in enumerate(batch) if r.value.get("fault")]
        if faulty:
{on_fault}
        return results

    def close(self):
{close}
'''


def model_source(on_fault: str = "pass", *, init: str = "pass", close: str = "pass", on_batch: str = "pass") -> str:
    """The suite's model with ``on_fault`` run on every batch that holds a fault record (locals:
    ``batch``, ``results``, ``faulty`` = indexes of the fault records; it may replace results or
    return), ``on_batch`` on every batch, ``init`` in the constructor, ``close`` in ``close()``."""
    def block(code: str, indent: int) -> str:
        return textwrap.indent(textwrap.dedent(code).strip(), " " * indent)

    return MODEL_TEMPLATE.format(on_fault=block(on_fault, 12), init=block(init, 8), close=block(close, 8),
                                 on_batch=block(on_batch, 8), protocol_out=PROTOCOL_OUT)


def write_bundle_source(root: Path, *, name: str, version: str, source: str, state_schema_version: int = 1) -> Path:
    """A bundle source directory laid out like examples/bundles/fraud-v1 (with a data file)."""
    return bundlesmith.write_source(root, bundlesmith.source_files(
        name=name, version=version, entrypoint="model:Model", model=source, input_schema=INPUT_SCHEMA,
        output_schema=OUTPUT_SCHEMA, state_schema_version=state_schema_version,
        data={"data/note.txt": "hostile suite\n"}))


def build_bundle(tmp: Path, *, name: str, version: str, source: str) -> Path:
    from daemon.bundle import build

    src = write_bundle_source(tmp / f"src-{name}-{version}", name=name, version=version, source=source)
    return build(src, tmp / "dist").path


# ---- inputs ---------------------------------------------------------------------------------------
def transactions(n: int, *, seed: int = 5, start: int = 0) -> list[tuple[bytes, bytes]]:
    return streams.transactions(start + n, seed=seed, n_cards=30)[start:]


def with_fault(record: tuple[bytes, bytes], fault: str = "1") -> tuple[bytes, bytes]:
    key, raw = record
    v = orjson.loads(raw)
    v["fault"] = fault
    return key, orjson.dumps(v)


class _RawKey(str):
    """A header key sent as the given bytes, valid UTF-8 or not (aiokafka's pure-Python batch
    builder writes ``key.encode()``; the C builder would refuse a str that is not the bytes)."""

    def __new__(cls, raw: bytes):
        s = super().__new__(cls, raw.decode("latin-1"))
        s.raw = raw
        return s

    def encode(self, *args, **kwargs) -> bytes:  # noqa: ARG002
        return self.raw


@dataclasses.dataclass
class Sent:
    """What was produced: input bytes by position (partition, offset), and labels of special ones."""

    values: dict[tuple[int, int], bytes | None] = dataclasses.field(default_factory=dict)
    labels: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def ends(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for part, off in self.values:
            out[part] = max(out.get(part, 0), off + 1)
        return out


async def produce(bootstrap: str, topic: str, records: list, sent: Sent, *, labels: list[str | None] | None = None,
                  raw_headers: bool = False) -> None:
    """Produce ``records`` — (key, value) or (key, value, headers) — and note their positions.
    ``raw_headers``: one batch per record with header keys as raw bytes (may be invalid UTF-8)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=1 << 21)
    await producer.start()
    try:
        futures = []
        for rec in records:
            key, value, hdrs = (*rec, None) if len(rec) == 2 else rec
            if raw_headers:
                batch = producer.create_batch()
                batch._builder = _DefaultRecordBatchBuilderPy(2, 0, is_transactional=0, producer_id=-1,
                                                              producer_epoch=-1, base_sequence=0,
                                                              batch_size=1 << 21)
                hs = [(_RawKey(k if isinstance(k, bytes) else k.encode()), v) for k, v in (hdrs or [])]
                assert batch.append(key=key, value=value, timestamp=None, headers=hs) is not None
                batch.close()
                partition = (await _partition_of(producer, topic, key))
                futures.append((await producer.send_batch(batch, topic, partition=partition), value))
            else:
                hs = [(k if isinstance(k, str) else k.decode(), v) for k, v in (hdrs or [])] or None
                futures.append((await producer.send(topic, value, key=key, headers=hs), value))
        for i, (fut, value) in enumerate(futures):
            md = await fut
            sent.values[(md.partition, md.offset)] = value
            if labels and labels[i]:
                sent.labels[labels[i]] = (md.partition, md.offset)
    finally:
        await producer.stop()


async def _partition_of(producer, topic: str, key: bytes | None) -> int:
    from aiokafka.partitioner import murmur2

    parts = sorted(await producer.partitions_for(topic))
    return (murmur2(key) & 0x7FFFFFFF) % len(parts) if key is not None else parts[0]


# ---- the daemon -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    bootstrap: str
    names: dict
    group: str
    daemon: DaemonProc
    sent: Sent
    tmp: Path

    async def committed(self) -> dict[int, int]:
        return await kafkatools.committed_offsets(self.bootstrap, self.group, self.names["input"])

    async def wait_committed(self, ends: dict[int, int] | None = None, timeout: float = 60.0) -> None:
        """Until the group's committed offsets reach ``ends`` (default: every input sent), with the
        daemon alive all along (a daemon that exits fails the wait with its log tail)."""
        ends = ends or self.sent.ends()
        last: dict[int, int] = {}
        paused_since: float | None = None

        async def done() -> bool:
            nonlocal last, paused_since
            self.daemon.check()
            last = await self.committed()
            if all(last.get(p, -1) >= end for p, end in ends.items()):
                return True
            code, body = self.daemon.get("/status")
            doc = json.loads(body) if code == 200 else {}
            if not doc.get("paused"):
                paused_since = None
            elif paused_since is None:
                paused_since = time.monotonic()
            elif time.monotonic() - paused_since > PAUSED_GIVE_UP_S:
                raise AssertionError(f"the daemon paused consumption for over {PAUSED_GIVE_UP_S:.0f}s "
                                     f"({doc.get('pause_reason')})")
            return False

        try:
            await kafkatools.wait_for(done, timeout=timeout, interval=0.5, what="the group to commit every input")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: committed {last}, input ends {ends}; log tail:\n"
                                 f"{tail(self.daemon.log())}") from None

    async def wait_standby_ready(self, timeout: float = 60.0) -> None:
        """Until /status says a standby is installed and healthy: a fault injected before that
        meets no standby, and crash isolation (not a failover) answers it, by design."""
        def ready() -> bool:
            self.daemon.check()
            code, body = self.daemon.get("/status")
            return code == 200 and bool(json.loads(body).get("standby_ready"))

        await kafkatools.wait_for(ready, timeout=timeout, interval=0.2, what="the standby to be ready")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the daemon must exit 0 within ``timeout`` and leave no process behind: none of its
        session, and none of its model workers' sessions (each worker has one of its own)."""
        workers = self.daemon.worker_pids_in_session()
        code = self.daemon.terminate(timeout=timeout)
        assert code == 0, f"daemon exited {code} on SIGTERM; log tail:\n{tail(self.daemon.log())}"
        left = session_processes(self.daemon.pid)
        for worker in workers:
            left += session_processes(worker, include_leader=True)
        if left:
            kill_pids([pid for pid, _ in left])
        assert not left, f"processes of the daemon's session survived it: {left}"


async def start(bootstrap: str, tmp: Path, *, active: Path, standby: Path | None, prefix: str,
                failover: dict | None = None, worker: dict | None = None, dead_letter: dict | None = None,
                env: dict | None = None) -> Run:
    names = await make_topics(bootstrap, prefix, partitions=2)
    group = kafkatools.unique("g-hostile")
    cfg = write_config(tmp / "f.toml", bootstrap=bootstrap, names=names, state_dir=tmp / "state", group=group,
                       app=kafkatools.unique("app-hostile"),
                       extra={"failover": {"standby_mode": "warm", **FAST_FAILOVER, **(failover or {})},
                              "worker": {"predict_timeout_ms": 1500, **(worker or {})},
                              "dead_letter": dead_letter or {}})
    args = ["--active-bundle", str(active)] + (["--standby-bundle", str(standby)] if standby else [])
    d = DaemonProc(cfg, *args, log=tmp / "daemon.log", env=env).start()
    return Run(bootstrap, names, group, d, Sent(), tmp)


# ---- read-back and checks -------------------------------------------------------------------------
async def read_results(run: Run) -> tuple[list, list]:
    """(outputs, dead letters) under read_committed. A dead letter aiokafka cannot parse is a
    failure in itself: every consumer of the dead-letter topic would stop at it."""
    outputs = await kafkatools.read_committed(run.bootstrap, run.names["output"])
    try:
        dead = await kafkatools.read_committed(run.bootstrap, run.names["dlq"])
    except UnicodeDecodeError as exc:
        raise AssertionError(f"a read_committed consumer of the dead-letter topic cannot parse it: {exc!r} "
                             "(a dead letter carries a header key that is not UTF-8)") from None
    return outputs, dead


def assert_each_input_once(sent: Sent, outputs: list, dead: list) -> None:
    seen = collections.Counter(streams.source_position(r) for r in outputs + dead)
    dups = {pos: n for pos, n in seen.items() if n > 1}
    missing = sorted(set(sent.values) - set(seen))
    extra = sorted(set(seen) - set(sent.values))
    names = {pos: label for label, pos in sent.labels.items()}
    assert not dups, f"{len(dups)} inputs seen more than once, e.g. {list(dups.items())[:5]}"
    assert not missing, (f"{len(missing)} of {len(sent.values)} inputs have neither an output nor a dead letter, "
                         f"e.g. {missing[:5]}; labelled among them: {[names[p] for p in missing if p in names]}")
    assert not extra, f"{len(extra)} outputs name unknown inputs, e.g. {extra[:5]}"


def assert_outputs_answer_their_inputs(sent: Sent, outputs: list) -> None:
    """Each output is its own input's answer (same card and seq), valid against the output schema's
    basics (strict JSON: no NaN or inf turned into null)."""
    wrong = []
    for r in outputs:
        pos = streams.source_position(r)
        raw = sent.values.get(pos)
        out = orjson.loads(r.value)
        try:
            inp = orjson.loads(raw)
        except Exception:  # noqa: BLE001 - inputs that are no JSON have no card to compare
            continue
        if out.get("card_id") != inp.get("card_id") or out.get("seq") != inp.get("seq") \
                or not isinstance(out.get("score"), (int, float)):
            wrong.append((pos, r.value[:200]))
    assert not wrong, f"{len(wrong)} outputs do not answer their own input, e.g. {wrong[:3]}"


def assert_dead_letters_carry_their_input(sent: Sent, dead: list) -> None:
    bad = []
    for r in dead:
        pos = streams.source_position(r)
        original = sent.values.get(pos)
        h = H.as_dict(r.headers)
        value = r.value or b""
        if H.H_DLQ_REASON not in h:
            bad.append((pos, "no reason header"))
        elif original is None or value == original:
            continue
        elif H.H_DLQ_TRUNCATED not in h or not original.startswith(value):
            bad.append((pos, f"value is not the original bytes: {value[:80]!r}"))
        elif not value:
            # a cut dead letter keeps what fits of the value: its headers go first
            bad.append((pos, f"marked truncated, the value cut to 0 of {len(original)} bytes "
                             f"(detail: {h.get(H.H_DLQ_DETAIL, b'')[:150]!r})"))
    assert not bad, f"dead letters without their reason or original bytes: {bad[:5]}"


def reason_of(record) -> str:
    return H.as_dict(record.headers)[H.H_DLQ_REASON].decode()


def detail_of(record) -> str:
    return H.as_dict(record.headers).get(H.H_DLQ_DETAIL, b"").decode("utf-8", "replace")


def failovers(log: str) -> list[str]:
    return re.findall(r"FAILOVER .*", log)


def tail(log: str, n: int = 4000) -> str:
    """The end of a daemon log, without the lines a model flooded it with."""
    lines = [ln[:400] for ln in log.splitlines() if not ln.startswith(("flood ", "garbage on fd 1"))]
    return "\n".join(lines)[-n:]


def excerpt(log: str, *patterns: str, limit: int = 12) -> str:
    """Log lines matching any pattern (errors, failovers, tracebacks): what a failure report quotes."""
    rx = re.compile("|".join(patterns or (r"ERROR|CRITICAL|WARNING|Traceback|Error|FAILOVER",)))
    lines = [ln[:400] for ln in log.splitlines() if rx.search(ln)]
    return "\n".join(lines[:limit])


# ---- processes ------------------------------------------------------------------------------------
def session_processes(sid: int, include_leader: bool = False) -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[2].startswith("Z"):
            continue  # dead, waiting to be reaped (a container's pid 1 may never reap orphans)
        if len(parts) == 4:
            parts = [parts[0], parts[1], parts[3]]
        if len(parts) == 3 and parts[1] == str(sid) and (include_leader or parts[0] != str(sid)):
            found.append((int(parts[0]), parts[2][:120]))
    return found


def processes_matching(args: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", "-f", args], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def kill_pids(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- reporting ------------------------------------------------------------------------------------
class Checks:
    """Runs every check of a case and reports all that failed at once, with the daemon's log lines
    that explain them: a hostile case that fails is a bug report for the engine's owners."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    async def __call__(self, what: str, fn, *args) -> bool:
        try:
            value = fn(*args)
            if hasattr(value, "__await__"):
                await value
            return True
        except AssertionError as exc:
            self.failed.append(f"- {what}: {str(exc)[:1500]}")
            return False

    async def every_run(self, run: Run) -> tuple[list, list]:
        """The checks every run makes once all its inputs are produced: the pipeline finishes on its
        own, every input once under read_committed, each output answers its own input, each dead
        letter carries its input. Returns what was read back: (outputs, dead letters)."""
        await self("the pipeline finishes on its own (group commits to the end, daemon alive)",
                   run.wait_committed, None, 40)
        outputs, dead = await read_results(run)
        await self("every input once under read_committed", assert_each_input_once, run.sent, outputs, dead)
        await self("every output answers its own input", assert_outputs_answer_their_inputs, run.sent, outputs)
        await self("dead letters carry a reason and the original bytes", assert_dead_letters_carry_their_input,
                   run.sent, dead)
        return outputs, dead

    def raise_if_any(self, log: str) -> None:
        if self.failed:
            raise AssertionError("\n".join(self.failed) + "\n--- daemon log (errors, failovers) ---\n"
                                 + excerpt(log, limit=25))
