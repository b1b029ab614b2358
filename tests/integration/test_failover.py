"""Failover against the real broker: real faults in the model process, exactly-once output."""

from __future__ import annotations

import collections
import os
import re
import signal
import time

import orjson
import pytest

from daemon.engine import headers as H
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed, _input_positions

FAST_FAILOVER = {"cooldown_ms": 0, "min_samples": 5, "error_window": 20, "error_rate_threshold": 0.5,
                 "latency_p99_slo_ms": 5000, "output_invalid_rate_threshold": 0.5}


def with_faults(records: list, fault: str, at: int, count: int = 1) -> list:
    out = list(records)
    for i in range(at, at + count):
        key, raw = out[i]
        v = orjson.loads(raw)
        v["fault"] = fault
        out[i] = (key, orjson.dumps(v))
    return out


def release_of(record) -> str:
    return H.as_dict(record.headers)[H.H_RELEASE_VERSION].decode()


def assert_switched_once(outputs: list, before: str = "2.0.0", after: str = "1.0.0") -> None:
    """Per partition, in source order: outputs of the failed release, then only the standby's; both seen."""
    by_part = collections.defaultdict(list)
    for r in outputs:
        part, off = streams.source_position(r)
        by_part[part].append((off, release_of(r)))
    for part, seq in by_part.items():
        versions = [v for _, v in sorted(seq)]
        switch = versions.index(after) if after in versions else len(versions)
        assert set(versions[:switch]) <= {before} and set(versions[switch:]) <= {after}, \
            f"partition {part}: releases are not one switch from {before} to {after}: {versions[:50]}"
    seen = {release_of(r) for r in outputs}
    assert seen == {before, after}, f"outputs came from releases {seen}, expected a switch {before} -> {after}"


def expected_counts(inputs: dict) -> dict[tuple[int, int], int]:
    """For each input position, how many records of its card (in its partition) came up to it."""
    seen: collections.Counter = collections.Counter()
    out = {}
    for (part, off), raw in sorted(inputs.items()):
        try:
            card = orjson.loads(raw)["card_id"]
        except Exception:  # noqa: BLE001
            continue
        seen[(part, card)] += 1
        out[(part, off)] = seen[(part, card)]
    return out


async def run_fault(kafka_bootstrap, tmp_path, bundles, *, fault: str, count: int = 1, mode: str = "warm",
                    standby: bool = True, extra_failover: dict | None = None, worker: dict | None = None,
                    total: int = 3000, at: int = 1500, expect_done: bool = True,
                    pause_text: str = "CONSUMPTION PAUSED"):
    names = await make_topics(kafka_bootstrap, f"fo-{fault}", partitions=2)
    records = with_faults(streams.transactions(total, seed=11, n_cards=30), fault, at, count)
    await kafkatools.produce(kafka_bootstrap, names["input"], records[:at])
    failover = {"standby_mode": mode, **FAST_FAILOVER, **(extra_failover or {})}
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": failover, "worker": {"predict_timeout_ms": 1500, **(worker or {})}})
    args = ["--active-bundle", str(bundles["v2"])]
    if standby:
        args += ["--standby-bundle", str(bundles["v1"])]
    d = DaemonProc(cfg, *args, log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, at), timeout=90,
                                  interval=0.3, what="records before the fault")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[at:])
        if expect_done:
            await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, total),
                                      timeout=120, interval=0.5, what="every input accounted for")
            assert d.terminate() == 0, d.log()[-3000:]
        else:
            await kafkatools.wait_for(lambda: d.check() and pause_text in d.log(), timeout=60,
                                      what=f"the daemon to log {pause_text!r}")
    finally:
        if d.alive() and expect_done:
            d.kill9()
    return names, d


@pytest.mark.parametrize("fault,reason,count,extra", [
    ("crash", "worker_crashed", 1, None),
    ("hang", "predict_timeout", 1, None),
    ("raise_all", "exception_rate", 1, None),  # a plain "raise" record is a poison record: test_poison.py
    ("slow", "latency_slo", 1, {"latency_p99_slo_ms": 300}),  # one record sleeps 0.5 s
    ("bad_output", "output_invalid", 400, None),
])
async def test_fault_in_active_release_fails_over_exactly_once(kafka_bootstrap, tmp_path, example_bundles,
                                                               fault, reason, count, extra):
    names, d = await run_fault(kafka_bootstrap, tmp_path, example_bundles, fault=fault, count=count,
                               extra_failover=extra)
    log = d.log()
    assert re.search(rf"FAILOVER .*reason={reason}", log), log[-3000:]
    assert "failover complete" in log
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert_switched_once(outputs)
    # replay is bounded by the checkpoint interval: at most interval_records per partition plus a fetch
    replayed = [int(x) for x in re.findall(r"replayed=(\d+)", log)]
    assert replayed and max(replayed) <= 2 * (500 + 500), replayed


@pytest.mark.parametrize("mode", ["hot", "cold"])
async def test_worker_kill_fails_over_in_each_standby_mode(kafka_bootstrap, tmp_path, example_bundles, mode):
    names, d = await run_fault(kafka_bootstrap, tmp_path, example_bundles, fault="crash", mode=mode)
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert_switched_once(outputs)
    if mode == "hot":
        # the hot standby kept its own state current in shadow: its counts continue the stream
        expect = expected_counts(inputs)
        for r in outputs:
            if release_of(r) == "1.0.0":
                assert orjson.loads(r.value)["count"] == expect[streams.source_position(r)]
        assert "failoverd_standby_agreement_ratio" not in d.log()  # metric, not log noise


async def test_missing_standby_pauses_and_emits_nothing_from_the_bad_release(kafka_bootstrap, tmp_path,
                                                                             example_bundles):
    """The release breaks for good (from the fault record on, every batch raises) and there is no
    standby: the daemon pauses. (A record that kills the model process is that record's fault,
    not the release's: tests/hostile record_kills_every_release, test_a_record_that_kills...)"""
    names, d = await run_fault(kafka_bootstrap, tmp_path, example_bundles, fault="raise_all", standby=False,
                               expect_done=False)
    try:
        inputs = await _input_positions(kafka_bootstrap, names["input"])
        outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
        dead = await kafkatools.read_committed(kafka_bootstrap, names["dlq"])
        crash_at = min(pos for pos, raw in inputs.items() if b'"fault":"raise_all"' in raw)
        seen = {streams.source_position(r) for r in outputs + dead}
        assert len(seen) == len(outputs) + len(dead)  # no duplicates
        # nothing at or after the poison record in its partition was emitted
        assert not any(p == crash_at[0] and o >= crash_at[1] for p, o in seen)
        assert d.alive(), "a missing standby pauses the daemon; it does not exit"
        assert "no healthy standby" in d.log()
    finally:
        d.kill9()


async def test_flapping_stops_at_the_cap(kafka_bootstrap, tmp_path, example_bundles):
    """Both channels run the faulty release with fail-back on: failovers stop at the cap and it pauses."""
    bundles = {"v1": example_bundles["v2"], "v2": example_bundles["v2"]}
    names, d = await run_fault(kafka_bootstrap, tmp_path, bundles, fault="raise_all", expect_done=False,
                               extra_failover={"max_failovers": 3, "window_ms": 600000, "failback": True,
                                               "failback_delay_ms": 0},
                               pause_text="failover cap reached")
    try:
        log = d.log()
        assert len(re.findall(r"FAILOVER ", log)) == 3, log[-4000:]
        assert "failover cap reached" in log
        outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
        dead = await kafkatools.read_committed(kafka_bootstrap, names["dlq"])
        seen = [streams.source_position(r) for r in outputs + dead]
        assert len(seen) == len(set(seen))
    finally:
        d.kill9()


async def test_a_worker_killed_while_idle_fails_over_at_once(kafka_bootstrap, tmp_path, example_bundles):
    """The active worker's exit is watched: killed while the loop waits for records (a long
    checkpoint interval keeps the wait long), the failover starts at once, not at the next batch
    or the end of the wait (which used to be up to the whole interval, 20 s here)."""
    names = await make_topics(kafka_bootstrap, "fo-idle", partitions=2)
    records = streams.transactions(400, seed=5, n_cards=20)
    await kafkatools.produce(kafka_bootstrap, names["input"], records[:200])
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": {"standby_mode": "warm", **FAST_FAILOVER},
                              "checkpoint": {"interval_ms": 20000, "interval_records": 100000}})
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v2"]), "--standby-bundle",
                   str(example_bundles["v1"]), log=tmp_path / "d.log").start()
    try:
        def status() -> dict:
            code, body = d.get("/status")
            return orjson.loads(body) if code == 200 else {}

        await kafkatools.wait_for(lambda: d.check() and (status().get("active") or {}).get("pid")
                                  and status().get("standby_ready"),
                                  timeout=90, interval=0.2, what="the active worker and a ready standby")
        pid = status()["active"]["pid"]
        await kafkatools.produce(kafka_bootstrap, names["input"], records[200:])
        await kafkatools.wait_for(lambda: sum(p["position"] for p in status().get("partitions", [])) >= 400,
                                  timeout=60, interval=0.1, what="every record read (the loop idle)")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        await kafkatools.wait_for(lambda: "FAILOVER" in d.log(), timeout=15, interval=0.01,
                                  what="the failover to start")
        noticed = time.monotonic() - killed
        assert noticed < 3.0, f"the failover started {noticed:.2f} s after the kill (the wait was 20 s)"
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, 400), timeout=60,
                                  interval=0.3, what="every input accounted for")
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert re.search(r"FAILOVER .*reason=worker_crashed", d.log()), d.log()[-3000:]
