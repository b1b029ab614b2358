"""Partitions added to an input topic under a running daemon (real broker, real daemon).

Input partition p keeps its state in changelog partition p, so the changelog must be at least as
wide as every input topic. Added to both, the new partitions are consumed without a restart
(within ``kafka.metadata_max_age_ms``), every input exactly once. Added to the input only, the
daemon stops with a configuration error that names the changelog and the fix, at once instead of
after a 40 s timeout deep inside a rebalance.
"""

from __future__ import annotations

import subprocess
import sys

from aiokafka.admin import NewPartitions

from tests import kafkatools, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _run_until_done

FAST_METADATA = {"metadata_max_age_ms": 1000}


async def _widen(bootstrap: str, topics: dict[str, int]) -> None:
    async with kafkatools.admin_client(bootstrap) as admin:
        await admin.create_partitions({t: NewPartitions(total_count=n) for t, n in topics.items()})


async def _width(bootstrap: str, topic: str, n: int) -> bool:
    async with kafkatools.admin_client(bootstrap) as admin:
        (described,) = await admin.describe_topics([topic])
    parts = described["partitions"]
    return len(parts) == n and all(p["leader"] >= 0 for p in parts)


async def test_partitions_added_to_an_input_and_its_changelog_are_consumed_without_a_restart(
        kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "widen", partitions=2)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"), extra={"kafka": FAST_METADATA})
    records = streams.transactions(1200, seed=34, n_cards=40)
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "d.log").start()
    try:
        await kafkatools.produce(kafka_bootstrap, names["input"], records[:600])
        await _run_until_done(kafka_bootstrap, names, 600, [d])
        await _widen(kafka_bootstrap, {names["changelog"]: 4})
        await _widen(kafka_bootstrap, {names["input"]: 4})
        await kafkatools.wait_for(lambda: _width(kafka_bootstrap, names["input"], 4), timeout=30, interval=0.2,
                                  what="the input topic's 4 partitions in the metadata")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[600:])
        await _run_until_done(kafka_bootstrap, names, 1200, [d], timeout=60)
        assert d.terminate() == 0
    finally:
        if d.alive():
            d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert {p for p, _ in inputs} == {0, 1, 2, 3}, "the records did not reach the added partitions"
    assert {streams.source_position(r)[0] for r in outputs} == {0, 1, 2, 3}
    assert not dead and "partitions assigned" in d.log()


async def test_an_input_wider_than_its_changelog_stops_with_a_config_error_naming_the_fix(
        kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "narrow", partitions=2)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"), extra={"kafka": FAST_METADATA})
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and "partitions assigned" in d.log(), timeout=60,
                                  what="the daemon to take its partitions")
        await _widen(kafka_bootstrap, {names["input"]: 3})
        await kafkatools.wait_for(lambda: not d.alive(), timeout=30, what="the daemon to stop")
    finally:
        if d.alive():
            d.kill9()
    log = d.log()
    assert d.proc.returncode != 0 and "Traceback" not in log, log[-3000:]
    assert f"state.changelog_topic {names['changelog']!r} has 2 partitions but input partition 2" in log, log[-3000:]
    # started again as it is, it refuses at once with the same error
    again = subprocess.run([sys.executable, "-m", "daemon", "run", "--config", str(cfg), "--active-bundle",
                            str(example_bundles["v1"])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2, (again.returncode, again.stderr[-2000:])
    assert "Traceback" not in again.stderr and "failoverd topics apply" in again.stderr, again.stderr[-2000:]
