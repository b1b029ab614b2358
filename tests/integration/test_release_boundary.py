"""The release boundary against the real broker and daemon (issue 13, points 3 and 4): the daemon
trusts nothing a release sends or does.

- a model sees no ``FAILOVERD_*`` variable (nor any other of the daemon's environment outside the
  allowlist), only what ``worker.env_passthrough`` names;
- a model that writes a pickle frame, garbage, an oversized frame header or a malformed reply on the
  protocol channel is failed over with reason ``protocol``; the daemon survives and never executes it;
- a model that allocates past ``worker.memory_mb`` is failed over with reason ``worker_oom``;
- what a model starts dies with its worker: at a failover, at shutdown, and when the daemon is
  killed with SIGKILL.

Each hostile release (2.0.0) answers the first records and misbehaves on a record marked ``fault``;
a good release (1.0.0) waits as warm standby. Every input is checked exactly once under read_committed.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid
from pathlib import Path

import orjson
import pytest

from tests import bundlesmith, kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.hostile.harness import PROTOCOL_OUT
from tests.integration.test_engine import _count_committed
from tests.integration.test_failover import FAST_FAILOVER, assert_switched_once

TOTAL = 400
FAULT_AT = 250

SCHEMA_IN = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
             "required": ["card_id", "amount"], "additionalProperties": True}
SCHEMA_OUT = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "required": ["card_id", "count"], "additionalProperties": True}

MODEL = '''\
import os
import struct
import subprocess
import sys

from daemon.model import Prediction

MARKER = {marker!r}


{protocol_out}

class Model:
    def __init__(self, context):
        self.first = True
{init}

    def predict(self, batch):
        results = []
        for r in batch:
            count = (r.state or {{}}).get("count", 0) + 1
            results.append(Prediction({{"card_id": r.value["card_id"], "count": count}}, {{"count": count}}))
        if self.first:
            self.first = False
{first}
        if any(r.value.get("fault") for r in batch):
{fault}
        return results
'''


def _block(code: str, indent: int) -> str:
    return textwrap.indent(textwrap.dedent(code).strip() or "pass", " " * indent)


def build(tmp: Path, version: str, *, marker: str = "", init: str = "pass", first: str = "pass",
          fault: str = "pass") -> Path:
    from daemon.bundle import build as build_bundle

    model = MODEL.format(marker=marker, init=_block(init, 8), first=_block(first, 12), fault=_block(fault, 12),
                         protocol_out=PROTOCOL_OUT)
    files = bundlesmith.source_files(name="boundary", version=version, entrypoint="model:Model", model=model,
                                     input_schema=SCHEMA_IN, output_schema=SCHEMA_OUT)
    return build_bundle(bundlesmith.write_source(tmp / f"src-{version}-{uuid.uuid4().hex[:6]}", files),
                        tmp / "dist").path


def inputs(fault: bool = True) -> list[tuple[bytes, bytes]]:
    records = streams.transactions(TOTAL, seed=13, n_cards=20)
    if fault:
        key, raw = records[FAULT_AT]
        records[FAULT_AT] = (key, orjson.dumps({**orjson.loads(raw), "fault": True}))
    return records


async def start(bootstrap: str, tmp: Path, prefix: str, active: Path, standby: Path | None = None, *,
                worker: dict | None = None, env: dict | None = None) -> tuple[DaemonProc, dict]:
    names = await make_topics(bootstrap, prefix, partitions=2, control=False)
    cfg = write_config(tmp / "f.toml", bootstrap=bootstrap, names=names, state_dir=tmp / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": {"standby_mode": "warm", **FAST_FAILOVER}, "worker": worker or {}})
    args = ["--active-bundle", str(active)] + (["--standby-bundle", str(standby)] if standby else [])
    return DaemonProc(cfg, *args, log=tmp / "daemon.log", env=env).start(), names


async def run_to_the_end(bootstrap: str, d: DaemonProc, names: dict, records: list, standby: bool = True) -> None:
    """Produce once the standby is loaded (a failure before that pauses instead of failing over); the
    records before the fault first, so that the hostile release has outputs of its own."""
    if standby:
        await kafkatools.wait_for(lambda: d.check() and _status(d).get("standby_ready") is True, timeout=60,
                                  interval=0.2, what="the standby to be ready")
    await kafkatools.produce(bootstrap, names["input"], records[:FAULT_AT])  # the release answers these
    await kafkatools.wait_for(lambda: d.check() and _count_committed(bootstrap, names, FAULT_AT), timeout=60,
                              interval=0.5, what="the records before the fault committed")
    await kafkatools.produce(bootstrap, names["input"], records[FAULT_AT:])
    await kafkatools.wait_for(lambda: d.check() and _count_committed(bootstrap, names, len(records)), timeout=60,
                              interval=0.5, what="every input committed as an output or a dead letter")


def _status(d: DaemonProc) -> dict:
    code, body = d.get("/status")
    return json.loads(body) if code == 200 else {}


def failover_reasons(d: DaemonProc) -> list[str]:
    code, body = d.get("/status")
    assert code == 200, body
    return [e.get("reason") for e in json.loads(body)["failovers"] if e.get("kind") == "failover"]


def sleepers(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-x", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def kill_sleepers(marker: str) -> None:
    for pid in sleepers(marker):
        subprocess.run(["kill", "-9", str(pid)], check=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("boundary-good"), "1.0.0")


# ---- environment -------------------------------------------------------------------------------
async def test_the_model_sees_no_daemon_secret_only_the_allowlist_and_what_is_passed_through(kafka_bootstrap,
                                                                                            tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-secret\n")
    # (a FAILOVERD_KAFKA__SASL_* secret would need a SASL cluster: config check refuses it on PLAINTEXT)
    env = {"FAILOVERD_ADMIN__TOKEN_FILE": str(token_file), "FAILOVERD_ADMIN_TOKEN": "admin-secret",
           "FAILOVERD_DEPLOY_SECRET": "deploy-secret", "AWS_SECRET_ACCESS_KEY": "cloud-secret",
           "MODEL_SETTING": "for-the-model"}
    spy = build(tmp_path, "2.0.0", fault="", first="""
        seen = sorted(os.environ)
        for p in results:
            p.output["env"] = seen
            p.output["setting"] = os.environ.get("MODEL_SETTING")
        """)
    d, names = await start(kafka_bootstrap, tmp_path, "env", spy, worker={"env_passthrough": ["MODEL_SETTING"]},
                           env=env)
    try:
        await run_to_the_end(kafka_bootstrap, d, names, inputs(fault=False), standby=False)
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    _, outputs, _ = await streams.verified(kafka_bootstrap, names)
    reports = [orjson.loads(r.value) for r in outputs if b'"env"' in r.value]
    assert reports, "the model reported no environment"
    for report in reports:
        names_seen = set(report["env"])
        assert not {n for n in names_seen if n.startswith("FAILOVERD_")}, names_seen
        assert "AWS_SECRET_ACCESS_KEY" not in names_seen and "NOTIFY_SOCKET" not in names_seen, names_seen
        assert {"PATH", "PYTHONPATH", "MODEL_SETTING"} <= names_seen, names_seen
        assert report["setting"] == "for-the-model"
    for r in outputs:
        assert b"secret" not in r.value


# ---- the protocol channel --------------------------------------------------------------------------
PROTOCOL_ATTACKS = {
    # a pickle frame that creates a directory when unpickled (what the daemon did before msgpack)
    "pickle_frame": """
        import pickle
        class Evil:
            def __reduce__(self):
                return (os.mkdir, (MARKER,))
        body = pickle.dumps(("result", [(0, b"{}")] * len(batch), {}, Evil()))
        protocol_out().write(struct.pack(">I", len(body)) + body)
        """,
    # a frame whose body is no msgpack value (0xc1 is never used by msgpack)
    "garbage": "protocol_out().write(struct.pack('>I', 64) + b'\\xc1' * 64)",
    # a header announcing 2 GiB: refused before anything of the body is read
    "oversized_header": "protocol_out().write(struct.pack('>I', 1 << 31) + b'x' * 1000)",
    # well-formed msgpack, but not an answer to this batch (no result at all)
    "malformed_reply": """
        import msgpack
        body = msgpack.packb(("result", [], {}))
        protocol_out().write(struct.pack(">I", len(body)) + body)
        """,
}


@pytest.mark.parametrize("attack", sorted(PROTOCOL_ATTACKS))
async def test_a_model_writing_on_the_protocol_channel_is_failed_over_with_reason_protocol(
        kafka_bootstrap, tmp_path, good, attack):
    marker = tmp_path / "executed-in-the-daemon"
    hostile = build(tmp_path, "2.0.0", marker=str(marker), fault=PROTOCOL_ATTACKS[attack])
    d, names = await start(kafka_bootstrap, tmp_path, f"proto-{attack[:8]}", hostile, good)
    try:
        await run_to_the_end(kafka_bootstrap, d, names, inputs())
        assert failover_reasons(d) == ["protocol"], d.log()[-3000:]
        assert "broke the protocol" in d.log()
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    assert not marker.exists(), "the daemon executed what the worker sent"
    _, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert dead == []
    assert_switched_once(outputs)
    streams.assert_counts_chain(outputs)


# ---- limits ------------------------------------------------------------------------------------
async def test_a_model_allocating_past_its_memory_limit_is_failed_over_with_reason_worker_oom(
        kafka_bootstrap, tmp_path, good):
    hostile = build(tmp_path, "2.0.0", fault="hog = bytearray(1 << 30)  # 1 GiB, past memory_mb")
    d, names = await start(kafka_bootstrap, tmp_path, "oom", hostile, good, worker={"memory_mb": 256})
    try:
        await run_to_the_end(kafka_bootstrap, d, names, inputs())
        assert failover_reasons(d) == ["worker_oom"], d.log()[-3000:]
        assert "worker.memory_mb = 256" in d.log()
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    _, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert dead == []
    assert_switched_once(outputs)
    streams.assert_counts_chain(outputs)


# ---- process groups ----------------------------------------------------------------------------
async def test_a_models_children_die_with_its_worker_at_failover_and_at_shutdown(kafka_bootstrap, tmp_path):
    m_active, m_standby = (str(8_000_000 + uuid.uuid4().int % 1_000_000) for _ in range(2))
    hostile = build(tmp_path, "2.0.0", marker=m_active, first="subprocess.Popen(['sleep', MARKER])",
                    fault="os._exit(3)")
    standby = build(tmp_path, "1.0.0", marker=m_standby, init="subprocess.Popen(['sleep', MARKER])")
    d, names = await start(kafka_bootstrap, tmp_path, "children", hostile, standby)
    try:
        await kafkatools.wait_for(lambda: d.check() and sleepers(m_standby), timeout=60,
                                  what="the standby's child to start")
        await run_to_the_end(kafka_bootstrap, d, names, inputs())
        assert failover_reasons(d) == ["worker_crashed"], d.log()[-3000:]
        await kafkatools.wait_for(lambda: not sleepers(m_active), timeout=10,
                                  what="the failed release's child to die with its worker")
        assert sleepers(m_standby), "the new active's child should still run"
        assert d.terminate() == 0, d.log()[-3000:]
        await kafkatools.wait_for(lambda: not sleepers(m_standby), timeout=10,
                                  what="the active's child to die at shutdown")
    finally:
        if d.alive():
            d.kill9()
        kill_sleepers(m_active)
        kill_sleepers(m_standby)
    await streams.verified(kafka_bootstrap, names)


async def test_a_daemon_killed_with_sigkill_leaves_no_worker_and_no_child_behind(kafka_bootstrap, tmp_path):
    marker = str(8_000_000 + uuid.uuid4().int % 1_000_000)
    model = build(tmp_path, "1.0.0", marker=marker, init="subprocess.Popen(['sleep', MARKER])")
    d, names = await start(kafka_bootstrap, tmp_path, "sigkill", model, model)
    try:
        await kafkatools.wait_for(lambda: d.check() and len(sleepers(marker)) == 2, timeout=60,
                                  what="both workers' children to start")
        workers = d.worker_pids()
        assert len(workers) == 2, workers
        d.kill9()  # the daemon's own session only: the workers lead sessions of their own
        await kafkatools.wait_for(lambda: not sleepers(marker) and not _alive(workers), timeout=10,
                                  what="the orphaned workers to kill their groups")
    finally:
        if d.alive():
            d.kill9()
        kill_sleepers(marker)


def _alive(pids: list[int]) -> list[int]:
    import os

    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive
