"""Avro in the Confluent wire format against the real broker and a real Schema Registry (Apicurio,
started through `failoverd schema-registry up`): exactly once across a failover, dead letters for
values that cannot be read, a registry outage that delays records and loses none, and promotion
refusing an incompatible output schema."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys

import pytest

from daemon.engine import headers as H
from tests import kafkatools, schemareg, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed
from tests.integration.test_failover import FAST_FAILOVER, assert_switched_once

EXAMPLE = ROOT / "examples" / "bundles" / "fraud-avro"
IN = json.loads((EXAMPLE / "schemas" / "input.avsc").read_text())
OUT = json.loads((EXAMPLE / "schemas" / "output.avsc").read_text())
WRITER = {**IN, "fields": [*IN["fields"], {"name": "fault", "type": ["null", "string"], "default": None}]}
"""What the producers write: the example's input schema plus a field the example's reader schema drops."""

FAULTY_MODEL = '''

class Faulty(FraudScorer):
    """2.0.0: the process dies on a record whose "fault" is "crash" (failover drill)."""

    def predict(self, batch):
        import os

        if any(r.value.get("fault") == "crash" for r in batch):
            os._exit(13)
        return super().predict(batch)
'''


@pytest.fixture(scope="module")
def avro_bundles(tmp_path_factory) -> dict:
    """fraud-avro 1.0.0 (the example) and 2.0.0 (reads the fault field, crashes on it)."""
    from daemon.bundle import build

    out = tmp_path_factory.mktemp("avro-bundles")
    v2 = out / "src-v2"
    shutil.copytree(EXAMPLE, v2)
    toml = (v2 / "bundle.toml").read_text()
    (v2 / "bundle.toml").write_text(toml.replace('version = "1.0.0"', 'version = "2.0.0"')
                                    .replace('"model:FraudScorer"', '"model:Faulty"'))
    (v2 / "schemas" / "input.avsc").write_text(json.dumps(WRITER))
    with open(v2 / "code" / "model.py", "a") as fh:
        fh.write(FAULTY_MODEL)
    return {"v1": build(EXAMPLE, out).path, "v2": build(v2, out).path}


def avro_values(n: int, fault_at: int | None = None) -> list[dict]:
    out = []
    for i, (_, raw) in enumerate(streams.transactions(n, seed=5, n_cards=20)):
        v = json.loads(raw)
        v.pop("seq")
        v["fault"] = "crash" if i == fault_at else None
        out.append(v)
    return out


def config(tmp_path, bootstrap: str, names: dict, url: str, **extra):
    sections = {"inputs": {"format": "avro"}, "output": {"format": "avro"}, "schema_registry": {"url": url}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return write_config(tmp_path / "d.toml", bootstrap=bootstrap, names=names, state_dir=tmp_path / "s",
                        group=kafkatools.unique("g"), app=kafkatools.unique("app"), extra=sections)


def decoded_outputs(outputs: list) -> list[tuple[int, int, int, dict]]:
    """(partition, offset, schema id, value) of each Avro output."""
    rows = []
    for r in outputs:
        part, off = streams.source_position(r)
        sid, value = schemareg.decode(r.value, OUT)
        rows.append((part, off, sid, value))
    return rows


def assert_counts_chain(rows) -> None:
    """Per card, outputs in source order count 1, 2, 3...: state carried exactly once."""
    by_card = collections.defaultdict(list)
    for part, off, _, v in rows:
        by_card[(part, v["card_id"])].append((off, v["count"]))
    for card, seq in by_card.items():
        counts = [c for _, c in sorted(seq)]
        assert counts == list(range(1, len(counts) + 1)), (card, counts[:20])


async def test_avro_in_avro_out_exactly_once_across_a_failover(kafka_bootstrap, schema_registry_url, tmp_path,
                                                                 avro_bundles):
    names = await make_topics(kafka_bootstrap, "avro-fo", partitions=2)
    sid = schemareg.register(schema_registry_url, f"{names['input']}-value", WRITER)
    encode = schemareg.encoder(WRITER, sid)
    total, at = 1000, 500
    values = avro_values(total, fault_at=at + 50)
    records = [(v["card_id"].encode(), encode(v)) for v in values]
    await kafkatools.produce(kafka_bootstrap, names["input"], records[:at])
    cfg = config(tmp_path, kafka_bootstrap, names, schema_registry_url,
                 failover={"standby_mode": "warm", **FAST_FAILOVER}, worker={"predict_timeout_ms": 1500})
    d = DaemonProc(cfg, "--active-bundle", str(avro_bundles["v2"]), "--standby-bundle", str(avro_bundles["v1"]),
                   log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, at), timeout=60,
                                  interval=0.3, what="records before the fault")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[at:])
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, total), timeout=60,
                                  interval=0.3, what="every input accounted for")
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    assert re.search(r"FAILOVER .*reason=worker_crashed", d.log()), d.log()[-3000:]
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert not dead, [H.as_dict(r.headers).get(H.H_DLQ_DETAIL) for r in dead[:3]]
    assert_switched_once(outputs)
    rows = decoded_outputs(outputs)
    out_ids = {sid for _, _, sid, _ in rows}
    assert len(out_ids) == 1  # both releases wrote with the one schema registered under <output>-value
    subject_id = schemareg.RegistryClient(schema_registry_url).lookup(f"{names['output']}-value",
                                                                      schemareg.schema_text(OUT))
    assert out_ids == {subject_id}
    assert_counts_chain(rows)


async def test_unknown_schema_id_and_corrupt_avro_are_dead_letters(kafka_bootstrap, schema_registry_url, tmp_path,
                                                                    avro_bundles):
    names = await make_topics(kafka_bootstrap, "avro-dlq", partitions=1)
    sid = schemareg.register(schema_registry_url, f"{names['input']}-value", WRITER)
    encode = schemareg.encoder(WRITER, sid)
    good = [encode(v) for v in avro_values(30)]
    bad = {
        30: ("unknown_schema_id", schemareg.frame(2_000_000_000, good[0][5:])),
        31: ("bad_avro", good[1][:-4]),  # the body cut short
        32: ("bad_avro", b'{"card_id": "card-1", "amount": 3.0}'),  # JSON on an Avro topic
        33: ("unknown_schema_id", schemareg.frame(2_000_000_000, good[2][5:])),  # the same unknown id again
    }
    records = [(b"k", v) for v in good] + [(b"k", data) for _, data in bad.values()] + [(b"k", good[3])]
    await kafkatools.produce(kafka_bootstrap, names["input"], records)
    cfg = config(tmp_path, kafka_bootstrap, names, schema_registry_url)
    d = DaemonProc(cfg, "--active-bundle", str(avro_bundles["v1"]), log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=60, interval=0.3, what="every input accounted for")
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert len(outputs) == 31
    reasons = {streams.source_position(r)[1]: H.as_dict(r.headers)[H.H_DLQ_REASON].decode() for r in dead}
    assert reasons == {off: reason for off, (reason, _) in bad.items()}
    by_offset = {streams.source_position(r)[1]: r for r in dead}
    assert by_offset[31].value == bad[31][1]  # the original bytes
    assert b"2000000000" in H.as_dict(by_offset[30].headers)[H.H_DLQ_DETAIL]


async def test_registry_stopped_mid_stream_then_restarted_loses_nothing(kafka_bootstrap, tmp_path, avro_bundles):
    """A registry of its own (persistent, so schemas keep their ids across the restart), stopped
    while records with a writer schema the worker has not seen yet wait: they wait, none is a dead
    letter, the daemon neither fails over nor times out, and they go out once it is back."""
    registry = schemareg.LocalRegistryProc.start_new(persist=True)
    try:
        names = await make_topics(kafka_bootstrap, "avro-down", partitions=1)
        client = registry.client()
        first = schemareg.register(registry.url, f"{names['input']}-value", IN)
        cfg = config(tmp_path, kafka_bootstrap, names, registry.url, worker={"predict_timeout_ms": 2000})
        d = DaemonProc(cfg, "--active-bundle", str(avro_bundles["v1"]), log=tmp_path / "d.log").start()
        try:
            values = avro_values(400)
            enc1 = schemareg.encoder(IN, first)
            before = [(v["card_id"].encode(), enc1({k: v[k] for k in ("card_id", "merchant_id", "amount",
                                                                       "features")})) for v in values[:200]]
            await kafkatools.produce(kafka_bootstrap, names["input"], before)
            await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, 200),
                                      timeout=60, interval=0.3, what="records before the outage")
            second = schemareg.register(registry.url, f"{names['input']}-value", WRITER)  # not seen by the worker
            assert second != first
            registry.stop()
            enc2 = schemareg.encoder(WRITER, second)
            await kafkatools.produce(kafka_bootstrap, names["input"],
                                     [(v["card_id"].encode(), enc2(v)) for v in values[200:]])
            await kafkatools.wait_for(lambda: d.check() and "schema registry unavailable" in d.log(), timeout=30,
                                      what="the daemon to say the registry is unavailable")
            code, body = d.get("/metrics")
            assert code == 200 and re.search(rb'failoverd_schema_registry_waiting\{channel="active"\} 1\.0', body)
            await kafkatools.wait_for(lambda: d.check() and waited(d) > 3, timeout=30,
                                      what="a wait longer than the 2 s predict timeout")
            assert not await _count_committed(kafka_bootstrap, names, 201)  # they wait, none dead-lettered
            registry.up()
            await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, 400),
                                      timeout=60, interval=0.3, what="every input accounted for")
            assert d.terminate() == 0, d.log()[-3000:]
        finally:
            if d.alive():
                d.kill9()
        log = d.log()
        assert "FAILOVER" not in log and "schema registry reachable again" in log, log[-3000:]
        inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
        assert not dead and len(outputs) == 400
        assert_counts_chain(decoded_outputs(outputs))
        assert client.schema_by_id(second) is not None
    finally:
        registry.remove()


def waited(d: DaemonProc) -> float:
    """failoverd_schema_registry_wait_seconds_total of the active channel, from the daemon's /metrics."""
    found = re.search(r'failoverd_schema_registry_wait_seconds_total\{channel="active"\} ([0-9.e+]+)',
                      d.get("/metrics")[1].decode())
    return float(found.group(1)) if found else 0.0


def promote(cfg, registry_dir, bundle, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "release", "promote", "fraud-scorer-avro@" + bundle[0],
                           "--channel", "active", "--reason", "test", "--bundle", str(bundle[1]), "--config", str(cfg),
                           "--registry", str(registry_dir), "--no-publish", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_incompatible_output_schema_is_refused_at_promotion(schema_registry_url, tmp_path, avro_bundles):
    from daemon.bundle import build

    output = kafkatools.unique("avro-promote-out")
    names = {"input": kafkatools.unique("in"), "output": output, "dlq": "dlq", "changelog": "cl",
             "checkpoint": "cp"}
    cfg = config(tmp_path, "127.0.0.1:9092", names, schema_registry_url)
    # what the 1.0.0 worker registers at its first batch
    schemareg.register(schema_registry_url, f"{output}-value", OUT)
    incompatible = tmp_path / "src-v3"
    shutil.copytree(EXAMPLE, incompatible)
    (incompatible / "bundle.toml").write_text((EXAMPLE / "bundle.toml").read_text()
                                              .replace('version = "1.0.0"', 'version = "3.0.0"'))
    # a new field without a default: readers with the new schema cannot read the old records
    (incompatible / "schemas" / "output.avsc").write_text(json.dumps(
        {**OUT, "fields": [*OUT["fields"], {"name": "reviewer", "type": "string"}]}))
    v3 = build(incompatible, tmp_path / "out").path
    proc = promote(cfg, tmp_path / "reg", ("3.0.0", v3))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refusing to promote fraud-scorer-avro@3.0.0: its output schema is not BACKWARD compatible" in proc.stderr
    assert f"{output}-value" in proc.stderr and "--allow-incompatible-schema" in proc.stderr
    # the same change with a default is compatible and goes through
    (incompatible / "bundle.toml").write_text((EXAMPLE / "bundle.toml").read_text()
                                              .replace('version = "1.0.0"', 'version = "3.0.1"'))
    (incompatible / "schemas" / "output.avsc").write_text(json.dumps(
        {**OUT, "fields": [*OUT["fields"], {"name": "reviewer", "type": "string", "default": ""}]}))
    v31 = build(incompatible, tmp_path / "out").path
    proc = promote(cfg, tmp_path / "reg", ("3.0.1", v31))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BACKWARD compatible with subject" in proc.stdout + proc.stderr
