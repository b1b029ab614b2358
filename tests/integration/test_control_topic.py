"""The control topic on the real broker: registries agree through it, watchers see new releases."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from daemon.bundle import build
from daemon.control import ControlReader, publish, release_event
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
    with pytest.raises(ControlTopicError, match="does not exist or could not be read"):
        async with ControlReader(kafka_bootstrap, unique_name("absent-"), timeout=3):
            pass
