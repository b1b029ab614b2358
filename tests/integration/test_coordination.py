"""Release changes and manual failovers reach every instance through the control topic; the
admin API and readiness of a live daemon."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import orjson

from daemon.registry import Registry
from tests import kafkatools, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import Feeder, _count_committed, _input_positions
from tests.integration.test_failover import release_of


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def active_versions(daemons) -> set:
    out = set()
    for d in daemons:
        code, body = d.get("/status")
        if code != 200:
            return {None}
        out.add(json.loads(body)["active"]["version"])
    return out


async def test_promotion_and_manual_failover_reach_every_instance(kafka_bootstrap, tmp_path, example_registry):
    names = await make_topics(kafka_bootstrap, "coord", partitions=2)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    cfgs = [write_config(tmp_path / f"{n}.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / f"s{n}",
                         registry=example_registry, group=group, app=app) for n in ("a", "b")]
    cfg = str(cfgs[0])
    cli("release", "promote", "fraud-scorer@1.0.0", "--channel", "active", "--reason", "first", "--config", cfg)
    cli("release", "promote", "fraud-scorer@2.0.0", "--channel", "standby", "--reason", "canary", "--config", cfg)

    records = streams.transactions(12000, seed=21, n_cards=40)
    daemons = [DaemonProc(c, log=tmp_path / f"{c.stem}.log").start() for c in cfgs]
    feeder = Feeder(kafka_bootstrap, names["input"], records, per_batch=200, pause=0.1)
    feed = asyncio.create_task(feeder.run())
    try:
        await kafkatools.wait_for(lambda: all(d.check() for d in daemons) and
                                  all(d.get("/readyz")[0] == 200 for d in daemons), timeout=90,
                                  what="both instances ready")
        assert active_versions(daemons) == {"1.0.0"}

        cli("release", "promote", "fraud-scorer@2.0.0", "--channel", "active", "--reason", "go v2", "--config", cfg)
        await kafkatools.wait_for(lambda: active_versions(daemons) == {"2.0.0"}, timeout=30,
                                  what="every instance on 2.0.0")
        cli("release", "promote", "fraud-scorer@1.0.0", "--channel", "standby", "--reason", "safety net",
            "--config", cfg)
        await kafkatools.wait_for(
            lambda: all(json.loads(d.get("/status")[1]).get("standby_ready") for d in daemons), timeout=30,
            what="1.0.0 loaded as standby everywhere")

        cli("failover", "--reason", "drill", "--config", cfg)
        await kafkatools.wait_for(lambda: active_versions(daemons) == {"1.0.0"}, timeout=30,
                                  what="every instance failed over to 1.0.0")
        status = json.loads(daemons[0].get("/status")[1])
        assert any(f.get("reason") == "manual" for f in status["failovers"]), status["failovers"]
        await feed
        await kafkatools.wait_for(lambda: all(d.check() for d in daemons) and
                                  _count_committed(kafka_bootstrap, names, len(records)), timeout=120,
                                  interval=0.5, what="every input accounted for")
        for d in daemons:
            assert d.terminate() == 0
    finally:
        feed.cancel()
        for d in daemons:
            if d.alive():
                d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    # per partition, in source order: 1.0.0, then 2.0.0, then 1.0.0 again — one switch each time
    for part in (0, 1):
        seq = [release_of(r) for r in sorted((r for r in outputs if streams.source_position(r)[0] == part),
                                             key=lambda r: streams.source_position(r)[1])]
        runs = [v for i, v in enumerate(seq) if i == 0 or seq[i - 1] != v]
        assert runs == ["1.0.0", "2.0.0", "1.0.0"], (part, runs)
    # the failover was recorded in the release log as the active release
    history = Registry(example_registry).history()
    assert history[-1].kind == "failover" and history[-1].version == "1.0.0"


async def test_admin_api_of_a_live_daemon(kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "admin", partitions=1)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and d.get("/healthz")[0] == 200, timeout=60, what="healthz")
        await kafkatools.wait_for(lambda: d.get("/readyz")[0] == 200, timeout=60, what="readyz")
        await kafkatools.produce(kafka_bootstrap, names["input"], streams.transactions(50, seed=3))
        await kafkatools.wait_for(lambda: _count_committed(kafka_bootstrap, names, 50), timeout=60, what="outputs")
        code, body = d.get("/status")
        status = json.loads(body)
        assert code == 200 and status["active"]["version"] == "1.0.0"
        assert status["partitions"][0]["committed"] == 50
        code, body = d.get("/metrics")
        text = body.decode()
        assert code == 200
        assert "failoverd_records_out_total" in text and "failoverd_checkpoints_total" in text
        assert 'failoverd_release_info{channel="active"' in text
        # no token configured: mutating endpoints refuse
        import urllib.error
        import urllib.request

        req = urllib.request.Request(d.admin_url + "/failover", data=orjson.dumps({"reason": "x"}), method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("POST /failover without a configured token was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 403
        assert d.terminate() == 0
    finally:
        if d.alive():
            d.kill9()


async def test_rollback_with_rescore_writes_corrections_for_the_rolled_back_window(kafka_bootstrap, tmp_path,
                                                                                   example_registry):
    from daemon.engine import headers as H

    names = await make_topics(kafka_bootstrap, "rescore", partitions=2)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       registry=example_registry, group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    cli("release", "promote", "fraud-scorer@1.0.0", "--channel", "active", "--reason", "first", "--config", str(cfg))
    d = DaemonProc(cfg, log=tmp_path / "d.log").start()
    try:
        await kafkatools.produce(kafka_bootstrap, names["input"], streams.transactions(400, seed=1))
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, 400), timeout=60,
                                  what="first 400 under 1.0.0")
        cli("release", "promote", "fraud-scorer@2.0.0", "--channel", "active", "--reason", "v2", "--config", str(cfg))
        await kafkatools.wait_for(lambda: active_versions([d]) == {"2.0.0"}, timeout=30, what="switch to 2.0.0")
        await kafkatools.produce(kafka_bootstrap, names["input"], streams.transactions(300, seed=2))
        await kafkatools.wait_for(lambda: _count_committed(kafka_bootstrap, names, 700), timeout=60,
                                  what="300 under 2.0.0")
        cli("release", "rollback", "--reason", "v2 scores look off", "--rescore", "--config", str(cfg))
        await kafkatools.wait_for(lambda: active_versions([d]) == {"1.0.0"}, timeout=30, what="rollback to 1.0.0")
        await kafkatools.produce(kafka_bootstrap, names["input"], streams.transactions(100, seed=3))
        await kafkatools.wait_for(lambda: _count_committed(kafka_bootstrap, names, 800 + 300), timeout=60,
                                  what="corrections and the last 100")
        assert d.terminate() == 0
    finally:
        if d.alive():
            d.kill9()
    outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
    dead = await kafkatools.read_committed(kafka_bootstrap, names["dlq"])
    corrections = [r for r in outputs if H.H_CORRECTION in H.as_dict(r.headers)]
    regular = [r for r in outputs if H.H_CORRECTION not in H.as_dict(r.headers)]
    inputs = await _input_positions(kafka_bootstrap, names["input"])
    streams.assert_exactly_once(inputs, regular, dead)
    by_v2 = {streams.source_position(r) for r in regular if release_of(r) == "2.0.0"}
    assert len(by_v2) >= 250
    # exactly the window 2.0.0 handled, once each, re-scored by the restored 1.0.0
    assert sorted(streams.source_position(r) for r in corrections) == sorted(by_v2)
    assert {release_of(r) for r in corrections} == {"1.0.0"}
    assert H.as_dict(corrections[0].headers)[H.H_CORRECTION].startswith(b"rollback-of:fraud-scorer@2.0.0")
