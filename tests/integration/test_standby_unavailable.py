"""A standby that cannot load, or dies while idle, never blocks the active (real broker, real daemon).

- the standby's constructor raises: the daemon serves every input exactly once with the active
  alone and says the standby is unavailable (/status, /readyz, the metric, the log); a failure of
  the active then pauses (no standby), it does not crash;
- a standby that loads only on its third try becomes ready, and a failover to it is exactly once;
- a pause for want of a standby ends when the retried standby loads (failover, exactly once);
- a standby worker killed while idle is reloaded (new pid, the metric back to 1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from daemon.bundle import build
from tests import kafkatools, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed
from tests.integration.test_failover import FAST_FAILOVER, assert_switched_once, release_of, with_faults

BROKEN = "standby constructor broken on purpose"


def standby_bundle(tmp_path: Path, name: str, marker: Path | None = None) -> Path:
    """fraud-scorer 1.0.0 whose constructor raises (always, or while ``marker`` exists)."""
    src = tmp_path / f"src-{name}"
    shutil.copytree(ROOT / "examples" / "bundles" / "fraud-v1", src)
    model = src / "code" / "model.py"
    cond = f"os.path.exists({str(marker)!r})" if marker else "True"
    text = model.read_text().replace(
        "    def __init__(self, context):\n",
        f"    def __init__(self, context):\n        import os\n        if {cond}:\n"
        f"            raise RuntimeError({BROKEN!r})\n", 1)
    assert BROKEN in text
    model.write_text(text)
    return build(src, tmp_path / f"dist-{name}").path


def status(d: DaemonProc) -> dict:
    code, body = d.get("/status")
    return json.loads(body) if code == 200 else {}


def failures(st: dict) -> int:
    return (st.get("standby") or {}).get("failures") or 0


def metric(d: DaemonProc, name: str) -> float | None:
    code, body = d.get("/metrics")
    m = re.search(rf"^{name} (\S+)$", body.decode(), re.M) if code == 200 else None
    return float(m.group(1)) if m else None


async def start(kafka_bootstrap, tmp_path, active: Path, standby: Path, prefix: str, mode: str = "warm"):
    names = await make_topics(kafka_bootstrap, prefix, partitions=2)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": {"standby_mode": mode, **FAST_FAILOVER},
                              "worker": {"predict_timeout_ms": 1500}})
    d = DaemonProc(cfg, "--active-bundle", str(active), "--standby-bundle", str(standby),
                   log=tmp_path / "d.log").start()
    return names, d


async def test_broken_standby_does_not_block_the_active(kafka_bootstrap, tmp_path, example_bundles):
    names, d = await start(kafka_bootstrap, tmp_path, example_bundles["v2"], standby_bundle(tmp_path, "broken"),
                           "sb-broken")
    try:
        records = streams.transactions(1000, seed=5, n_cards=20)
        await kafkatools.produce(kafka_bootstrap, names["input"], records)
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=60, interval=0.3, what="every input served by the active alone")
        inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
        assert {release_of(o) for o in outputs} == {"2.0.0"}, "outputs of the active alone"

        st = await kafkatools.wait_for(lambda: (s := status(d)) and failures(s) >= 2 and s,
                                       timeout=30, what="a second failed load of the standby")
        sb = st["standby"]
        assert sb["state"] == "unavailable" and BROKEN in sb["error"], sb
        assert st["standby_ready"] is False and st["ready"] is True, st
        assert sb["next_retry_at"] is not None or sb["loading"], sb
        assert metric(d, "failoverd_standby_ready") == 0
        assert metric(d, "failoverd_standby_load_failures_total") >= 2
        code, body = d.get("/readyz")
        assert code == 200 and b"standby unavailable" in body, body
        assert re.search(rf"standby failed to load.*{BROKEN}", d.log()), d.log()[-3000:]

        # the active fails (for good: every batch raises) with no standby to take over: it pauses
        # (as with none), it does not crash. (A record that crashes the model is a dead letter.)
        crash = with_faults(streams.transactions(200, seed=6, n_cards=20), "raise_all", at=100)
        await kafkatools.produce(kafka_bootstrap, names["input"], crash)
        await kafkatools.wait_for(lambda: d.check() and "no healthy standby" in d.log(), timeout=30,
                                  what="a pause for want of a standby")
        assert d.alive() and status(d)["paused"] is True
        outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
        dead = await kafkatools.read_committed(kafka_bootstrap, names["dlq"])
        seen = [streams.source_position(r) for r in outputs + dead]
        assert len(seen) == len(set(seen)), "duplicates after the pause"
    finally:
        d.kill9()


async def test_standby_loading_on_its_third_try_becomes_ready_and_takes_over(kafka_bootstrap, tmp_path,
                                                                             example_bundles):
    marker = tmp_path / "standby-still-broken"
    marker.write_text("remove me to let the standby load")
    names, d = await start(kafka_bootstrap, tmp_path, example_bundles["v2"],
                           standby_bundle(tmp_path, "flaky", marker), "sb-flaky")
    try:
        await kafkatools.wait_for(lambda: d.check() and failures(status(d)) >= 2,
                                  timeout=30, interval=0.05, what="two failed loads of the standby")
        marker.unlink()  # the third try (2 s later) loads
        st = await kafkatools.wait_for(lambda: d.check() and (s := status(d)).get("standby_ready") and s,
                                       timeout=30, what="the standby to load")
        assert st["standby"]["state"] == "ready" and st["standby"]["version"] == "1.0.0"
        assert len(re.findall(r"standby failed to load", d.log())) == 2, d.log()[-3000:]
        assert metric(d, "failoverd_standby_ready") == 1
        code, body = d.get("/readyz")
        assert (code, body) == (200, b"ready\n")

        # a failure of the active now fails over to it, exactly once
        total, at = 1500, 700
        records = with_faults(streams.transactions(total, seed=7, n_cards=30), "crash", at)
        await kafkatools.produce(kafka_bootstrap, names["input"], records[:at])
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, at), timeout=60,
                                  interval=0.3, what="records before the fault")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[at:])
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, total),
                                  timeout=90, interval=0.5, what="every input accounted for")
        assert re.search(r"FAILOVER .*reason=worker_crashed", d.log()), d.log()[-3000:]
        inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
        assert_switched_once(outputs)
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()


async def test_pause_for_want_of_a_standby_ends_when_the_retried_standby_loads(kafka_bootstrap, tmp_path,
                                                                               example_bundles):
    marker = tmp_path / "standby-still-broken"
    marker.write_text("remove me to let the standby load")
    names, d = await start(kafka_bootstrap, tmp_path, example_bundles["v2"],
                           standby_bundle(tmp_path, "late", marker), "sb-late")
    try:
        total, at = 1200, 600
        records = with_faults(streams.transactions(total, seed=9, n_cards=30), "raise_all", at=at)
        await kafkatools.produce(kafka_bootstrap, names["input"], records[:at])
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, at), timeout=60,
                                  interval=0.3, what="records before the fault, served by the active alone")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[at:])
        await kafkatools.wait_for(lambda: d.check() and "no healthy standby" in d.log(), timeout=60,
                                  what="a pause for want of a standby")
        assert status(d)["paused"] is True and failures(status(d)) >= 1
        marker.unlink()  # the next retry loads it, and the pause ends with a failover to it
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, total),
                                  timeout=90, interval=0.5, what="every input accounted for")
        assert re.search(r"FAILOVER .*reason=standby_available", d.log()), d.log()[-3000:]
        inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
        assert_switched_once(outputs)
        assert status(d)["paused"] is False
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()


async def test_standby_killed_while_idle_is_reloaded(kafka_bootstrap, tmp_path, example_bundles):
    names, d = await start(kafka_bootstrap, tmp_path, example_bundles["v2"], example_bundles["v1"], "sb-killed")
    try:
        st = await kafkatools.wait_for(lambda: d.check() and (s := status(d)).get("standby_ready") and s,
                                       timeout=60, what="the standby to load")
        first = st["standby"]["pid"]
        assert first and metric(d, "failoverd_standby_ready") == 1
        os.kill(first, signal.SIGKILL)
        await kafkatools.wait_for(lambda: d.check() and "dead standby dropped" in d.log(), timeout=15,
                                  what="the daemon to notice the dead standby")
        st = await kafkatools.wait_for(
            lambda: (s := status(d)).get("standby_ready") and s["standby"]["pid"] not in (None, first) and s,
            timeout=30, what="the standby reloaded with a new pid")
        assert st["standby"]["state"] == "ready" and st["standby"]["version"] == "1.0.0"
        assert metric(d, "failoverd_standby_ready") == 1
        # it still serves, exactly once
        records = streams.transactions(300, seed=8, n_cards=10)
        await kafkatools.produce(kafka_bootstrap, names["input"], records)
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=60, interval=0.3, what="every input served")
        await streams.verified(kafka_bootstrap, names)
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
