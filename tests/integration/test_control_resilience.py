"""A live daemon keeps following the control topic after records it cannot read (issue #11 point 7).

Before: a non-JSON value or a release event lacking its fields stopped the watcher for good
("control topic watcher stopped"); a promotion published afterwards never took effect.
"""

from __future__ import annotations

import json

import orjson

from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_coordination import cli
from tests.integration.test_failover import release_of


def metric(daemon: DaemonProc, name: str) -> float | None:
    """A sample of the daemon's /metrics (admin API), or None."""
    code, body = daemon.get("/metrics")
    if code != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_a_promotion_after_garbage_on_the_control_topic_takes_effect(kafka_bootstrap, tmp_path,
                                                                           example_registry):
    names = await make_topics(kafka_bootstrap, "ctlres", partitions=1)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       registry=example_registry, group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    cli("release", "promote", "fraud-scorer@1.0.0", "--channel", "active", "--reason", "first", "--config", str(cfg))
    records = streams.transactions(200, seed=5)
    daemon = DaemonProc(cfg, log=tmp_path / "daemon.log").start()
    try:
        await kafkatools.produce(kafka_bootstrap, names["input"], records[:100])
        await kafkatools.wait_for(lambda: daemon.check() and metric(daemon, "failoverd_control_following") == 1,
                                  timeout=90, what="the daemon following the control topic")
        await kafkatools.read_committed(kafka_bootstrap, names["output"], expect=100, timeout=60)

        v1 = json.loads(cli("release", "status", "--json", "--config", str(cfg)).stdout)["active"]
        lacking = {"type": "release", "id": "lacking", "channel": "active", "name": v1["name"]}
        await kafkatools.produce(kafka_bootstrap, names["control"], [
            (b"event/garbage", b"\x00this is not JSON"),
            (b"release/active", orjson.dumps(lacking)),
        ])
        await kafkatools.wait_for(
            lambda: daemon.check() and metric(daemon, 'failoverd_control_events_skipped_total{reason="not_json"}') == 1
            and metric(daemon, 'failoverd_control_events_skipped_total{reason="missing_fields"}') == 1,
            timeout=30, what="both bad records skipped and counted")

        cli("release", "promote", "fraud-scorer@2.0.0", "--channel", "active", "--reason", "after garbage",
            "--config", str(cfg))
        await kafkatools.wait_for(
            lambda: daemon.check() and json.loads(daemon.get("/status")[1])["active"]["version"] == "2.0.0",
            timeout=60, what="the daemon switched to 2.0.0")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[100:])
        outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"], expect=200, timeout=60)
        assert [release_of(r) for r in outputs[100:]] == ["2.0.0"] * 100
        assert metric(daemon, "failoverd_control_following") == 1
        assert "control topic watcher stopped" not in daemon.log()
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        if daemon.alive():
            daemon.kill9()
