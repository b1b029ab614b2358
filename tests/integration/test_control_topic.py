"""The control topic on the real broker: registries agree through it, watchers see new releases."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import types
from pathlib import Path

import orjson
import pytest

from daemon import metrics as m
from daemon.bundle import build
from daemon.control import SKIP_REASONS, ControlReader, publish, release_event
from daemon.coordination import Backoff, ControlWatcher, ReleaseRecorder
from daemon.errors import ControlTopicError
from daemon.registry import Registry
from tests import kafkatools
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples" / "bundles"


@pytest.fixture
async def control_topic(kafka_bootstrap, unique_name):
    topic = unique_name("control-")
    await kafkatools.create_topics(kafka_bootstrap, {topic: 1},
                                   {topic: {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.01",
                                            "segment.ms": "100"}})
    return topic


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return {v: build(EXAMPLES / f"fraud-v{v[0]}", out).path for v in ("1.0.0", "2.0.0")}


async def test_a_second_registry_sees_a_promotion_made_by_the_first(kafka_bootstrap, control_topic, archives,
                                                                     tmp_path):
    first = Registry(tmp_path / "first")
    for a in archives.values():
        first.add(a)
    r1 = first.promote("fraud-scorer@1.0.0", "active", "first release")
    await publish(kafka_bootstrap, control_topic, release_event(r1))
    r2 = first.promote("fraud-scorer@2.0.0", "standby", "shadow v2")
    await publish(kafka_bootstrap, control_topic, r2)  # a Release is accepted as is

    second = Registry(tmp_path / "second")  # another host: another directory, no bundles yet
    assert second.status() == {"active": None, "standby": None}
    synced = await second.sync_from_topic(kafka_bootstrap, control_topic)
    assert synced == [r1, r2]
    assert second.status() == first.status() == {"active": r1, "standby": r2}
    assert await second.sync_from_topic(kafka_bootstrap, control_topic) == []  # nothing twice
    assert second.history() == first.history()

    async with ControlReader(kafka_bootstrap, control_topic) as reader:
        current = reader.releases()
    assert current["active"]["id"] == r1.id and current["standby"]["digest"] == r2.digest

    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "daemon", "release", "sync", "--registry", str(tmp_path / "third"),
                         "--bootstrap", kafka_bootstrap, "--control-topic", control_topic],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "2 release(s) added" in proc.stdout, proc.stderr
    assert Registry(tmp_path / "third").status() == first.status()


async def test_a_watcher_receives_a_promotion_made_after_it_started(kafka_bootstrap, control_topic, archives,
                                                                    tmp_path):
    registry = tmp_path / "registry"
    before = Registry(registry)
    before.add(archives["1.0.0"])
    await publish(kafka_bootstrap, control_topic, before.promote("fraud-scorer@1.0.0", "active", "baseline"))

    reader = ControlReader(kafka_bootstrap, control_topic)
    await reader.start()
    seen = []

    async def follow():
        async for event in reader:
            seen.append(event)

    task = asyncio.create_task(follow())
    try:
        assert reader.releases()["active"]["version"] == "1.0.0" and len(reader.events) == 1
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "daemon", "release", "promote", "fraud-scorer@2.0.0", "--channel", "active",
             "--reason", "v2 passed shadowing", "--bundle", str(archives["2.0.0"]), "--registry", str(registry),
             "--bootstrap", kafka_bootstrap, "--control-topic", control_topic],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"published to control topic {control_topic}" in proc.stdout
        promoted = Registry(registry).status()["active"]
        assert promoted.version == "2.0.0"
        await kafkatools.wait_for(lambda: any(e.id == promoted.id for e in seen), timeout=30,
                                  what="the watcher to receive the promotion")
        assert [e.id for e in seen] == [promoted.id]  # published under two keys, reported once
        assert seen[0].value["why"] == "v2 passed shadowing" and seen[0].type == "release"
        assert reader.releases()["active"]["digest"] == promoted.digest
        failover = await publish(kafka_bootstrap, control_topic,
                                 {"type": "failover", "from": promoted.digest, "reason": "worker_crashed"})
        await kafkatools.wait_for(lambda: any(e.id == failover["id"] for e in seen), timeout=30,
                                  what="the failover event")
        assert reader.state[f"event/{failover['id']}"]["reason"] == "worker_crashed"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.stop()


async def test_unreachable_broker_and_missing_topic_are_explicit_errors(kafka_bootstrap, unique_name):
    with pytest.raises(ControlTopicError, match="could not publish"):
        await publish("127.0.0.1:1", "control", {"type": "failover"}, timeout=5)
    with pytest.raises(ControlTopicError, match="broker unreachable at 127.0.0.1:1 .*fix: check the bootstrap"):
        async with ControlReader("127.0.0.1:1", "control", timeout=5):
            pass
    started = time.monotonic()
    with pytest.raises(ControlTopicError, match="the topic does not exist; fix: create it .*failoverd topics apply"):
        async with ControlReader(kafka_bootstrap, unique_name("absent-")):  # the default 30 s timeout
            pass
    assert time.monotonic() - started < 10  # said after a short grace, not at the timeout


def test_release_sync_against_a_closed_port_is_one_line_and_fast(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "daemon", "release", "sync", "--registry", str(tmp_path / "r"),
                           "--bootstrap", "127.0.0.1:1", "--control-topic", "ctl"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("failoverd: error:")]
    assert len(error) == 1 and "broker unreachable at 127.0.0.1:1" in error[0], proc.stderr
    assert "within" not in error[0], proc.stderr  # it did not wait for a timeout, and does not say so
    assert time.monotonic() - started < 20


async def _produce_raw(bootstrap: str, topic: str, records) -> None:
    await kafkatools.produce(bootstrap, topic, records)


def _release_doc(registry: Registry, ref: str, channel: str, why: str) -> dict:
    return release_event(registry.promote(ref, channel, why))


async def test_records_the_reader_cannot_use_are_skipped_and_counted_and_it_goes_on(kafka_bootstrap, control_topic,
                                                                                    archives, tmp_path):
    registry = Registry(tmp_path / "registry")
    for a in archives.values():
        registry.add(a)
    v1 = _release_doc(registry, "fraud-scorer@1.0.0", "active", "baseline")
    lacking = {k: v for k, v in v1.items() if k not in ("digest", "channel")} | {"id": "lacking"}
    before = {r: _skipped(r) for r in SKIP_REASONS}
    await _produce_raw(kafka_bootstrap, control_topic, [
        (b"event/x", b"{not json"), (b"release/active", orjson.dumps(lacking)), (b"event/y", b"[1, 2]"),
        (b"event/z", orjson.dumps({"type": "self-destruct", "id": "z"})),
        (b"release/standby", orjson.dumps(dict(v1, channel="standby", epoch="yesterday", id="bad-epoch"))),
    ])
    await publish(kafka_bootstrap, control_topic, v1)
    async with ControlReader(kafka_bootstrap, control_topic) as reader:
        assert reader.skipped == {"not_json": 1, "missing_fields": 1, "not_object": 1, "unknown_type": 1,
                                  "bad_field": 1}
        assert [e.id for e in reader.events] == [v1["id"]]
        assert reader.releases() == {"active": v1, "standby": None}
    assert {r: _skipped(r) - before[r] for r in SKIP_REASONS} == {r: 1 for r in SKIP_REASONS}
    # the release log sync shares the validation: the bad records are not in it, the good one is
    synced = await Registry(tmp_path / "other").sync_from_topic(kafka_bootstrap, control_topic)
    assert [r.id for r in synced] == [v1["id"]]


def _skipped(reason: str) -> float:
    return m.REGISTRY.get_sample_value("failoverd_control_events_skipped_total", {"reason": reason}) or 0.0


class _Engine:
    """What the watcher hands changes to (the engine's request_change)."""

    pending_change: dict | None = None

    def request_change(self, change: dict, *, replace: bool = True) -> bool:
        self.pending_change = change
        return True


class _Controller:
    def __init__(self) -> None:
        self.requests: list[str] = []

    def request(self, reason: str) -> None:
        self.requests.append(reason)


def _settings(bootstrap: str, topic: str, registry: Path):
    return types.SimpleNamespace(kafka=types.SimpleNamespace(client_kwargs=lambda: {"bootstrap_servers": bootstrap}),
                                 registry=types.SimpleNamespace(control_topic=topic, path=str(registry)))


async def test_the_watcher_survives_garbage_and_its_topic_being_deleted_and_re_created(kafka_bootstrap,
                                                                                        control_topic, archives,
                                                                                        tmp_path):
    registry = Registry(tmp_path / "registry")
    for a in archives.values():
        registry.add(a)
    v1 = _release_doc(registry, "fraud-scorer@1.0.0", "active", "baseline")
    await publish(kafka_bootstrap, control_topic, v1)
    engine, controller = _Engine(), _Controller()
    watcher = ControlWatcher(_settings(kafka_bootstrap, control_topic, tmp_path / "registry"), engine, controller,
                             timeout=3, probe_interval=0.5, backoff=Backoff(0.2, 1.0))
    task = asyncio.create_task(watcher.follow())
    following = lambda: m.REGISTRY.get_sample_value("failoverd_control_following")  # noqa: E731
    try:
        await kafkatools.wait_for(lambda: following() == 1, timeout=20, what="the watcher following")
        assert watcher.desired["active"] == v1["digest"] and engine.pending_change is None  # the start is history

        # garbage, then a promotion: the promotion is applied
        lacking = {k: v for k, v in v1.items() if k != "digest"} | {"id": "lacking"}
        await _produce_raw(kafka_bootstrap, control_topic, [(b"event/g", b"\x00garbage"),
                                                            (b"release/active", orjson.dumps(lacking))])
        v2 = _release_doc(registry, "fraud-scorer@2.0.0", "active", "v2 after garbage")
        await publish(kafka_bootstrap, control_topic, v2)
        await kafkatools.wait_for(lambda: (engine.pending_change or {}).get("active") == v2["digest"], timeout=20,
                                  what="the promotion after the garbage")
        assert engine.pending_change["ref"] == "fraud-scorer@2.0.0" and following() == 1

        # the topic is deleted: the watcher says so and keeps trying; re-created: it follows again
        # and applies what was published while it could not follow
        await _delete_topic(kafka_bootstrap, control_topic)
        await kafkatools.wait_for(lambda: following() == 0, timeout=30, what="the gauge to drop to 0")
        await kafkatools.create_topics(kafka_bootstrap, {control_topic: 1},
                                       {control_topic: {"cleanup.policy": "compact"}})
        request = await publish(kafka_bootstrap, control_topic, {"type": "failover_request", "reason": "drill"})
        v1_again = _release_doc(registry, "fraud-scorer@1.0.0", "active", "back to v1")
        await publish(kafka_bootstrap, control_topic, v1_again)
        await kafkatools.wait_for(lambda: following() == 1 and (engine.pending_change or {}).get("active")
                                  == v1["digest"], timeout=60, what="the watcher back on the re-created topic")
        assert controller.requests == ["drill"] and not task.done()
        assert request["id"] in watcher.seen and watcher.restarts >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert following() == 0


async def _delete_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    await kafkatools.wait_for(lambda: _absent(bootstrap, topic), timeout=30, what=f"topic {topic} deleted")


async def _absent(bootstrap: str, topic: str) -> bool:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return topic not in await consumer.topics()
    finally:
        await consumer.stop()


# ---- a failover that could not be recorded is retried (issue #11 point 7) -----------------

def _recorder(bootstrap: str, topic: str, registry: Path) -> ReleaseRecorder:
    recorder = ReleaseRecorder(_settings(bootstrap, topic, registry))
    recorder.PUBLISH_TIMEOUT_S, recorder.RETRY_FIRST_S, recorder.RETRY_CAP_S = 1.0, 0.2, 0.5
    return recorder


def _failover_event(archive_digest: str) -> dict:
    return {"kind": "failover", "from": {"name": "fraud-scorer", "version": "2.0.0", "digest": "f" * 64},
            "to": {"name": "fraud-scorer", "version": "1.0.0", "digest": archive_digest},
            "reason": "worker_crashed", "detail": "exit -9", "time": time.time(), "instance": "test"}


def _sample(name: str) -> float:
    return m.REGISTRY.get_sample_value(name) or 0.0


async def test_a_failover_is_recorded_once_the_control_topic_is_back(kafka_bootstrap, unique_name, archives,
                                                                    tmp_path):
    from daemon.bundle.loader import open_bundle

    topic = unique_name("control-late-")  # does not exist yet: publishing fails until it is created
    digest = open_bundle(archives["1.0.0"]).digest
    recorder = _recorder(kafka_bootstrap, topic, tmp_path / "registry")
    failures = _sample("failoverd_control_publish_failures_total")
    task = asyncio.create_task(recorder.record_failover(_failover_event(digest), archives["1.0.0"]))
    try:
        await kafkatools.wait_for(lambda: _sample("failoverd_control_publish_failures_total") >= failures + 2,
                                  timeout=30, what="two failed attempts")
        assert not task.done() and _sample("failoverd_failovers_unrecorded") == 1
        history = Registry(tmp_path / "registry").history()  # the release log step is done, and only once
        assert [(r.kind, r.digest) for r in history] == [("failover", digest)]
        await kafkatools.create_topics(kafka_bootstrap, {topic: 1}, {topic: {"cleanup.policy": "compact"}})
        await asyncio.wait_for(task, timeout=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert _sample("failoverd_failovers_unrecorded") == 0
    records = await kafkatools.read_committed(kafka_bootstrap, topic, expect=3)
    assert sorted(r.key.decode().split("/")[0] for r in records) == ["event", "event", "release"]
    async with ControlReader(kafka_bootstrap, topic) as reader:
        assert [e.type for e in reader.events] == ["release", "failover"]
        assert reader.releases()["active"]["kind"] == "failover" and reader.releases()["active"]["digest"] == digest
    assert len(Registry(tmp_path / "registry").history()) == 1


async def test_a_failover_not_yet_recorded_stops_with_the_daemon(archives, tmp_path):
    from daemon.bundle.loader import open_bundle

    digest = open_bundle(archives["1.0.0"]).digest
    recorder = _recorder("127.0.0.1:1", "ctl", tmp_path / "registry")
    failures = _sample("failoverd_control_publish_failures_total")
    task = asyncio.create_task(recorder.record_failover(_failover_event(digest), archives["1.0.0"]))
    await kafkatools.wait_for(lambda: _sample("failoverd_control_publish_failures_total") >= failures + 1,
                              timeout=30, what="a failed attempt")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and _sample("failoverd_failovers_unrecorded") == 0
