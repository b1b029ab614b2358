"""Poison records against the real broker: a record that makes ``predict`` raise costs a dead letter,
not a failover (issue #11; daemon/engine/batch.py isolates it by splitting the batch).

The example fraud-scorer 2.0.0 raises for any batch that holds a record with ``"fault": "raise"``;
the failover thresholds are the quick ones of test_failover.py and 1.0.0 waits as standby, so the
code as it was (a raising batch fails whole, is replayed, fails again) fails over within seconds.
"""

from __future__ import annotations

import json
import re

import orjson

from daemon.engine import headers as H
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed
from tests.integration.test_failover import FAST_FAILOVER, release_of

TOTAL = 3000
POISON_AT = (400, 1501, 2702)


async def test_poison_records_are_dead_letters_and_the_release_keeps_running(kafka_bootstrap, tmp_path,
                                                                             example_bundles):
    names = await make_topics(kafka_bootstrap, "poison", partitions=2)
    records = streams.transactions(TOTAL, seed=23, n_cards=40)
    for at in POISON_AT:
        key, raw = records[at]
        records[at] = (key, orjson.dumps({**orjson.loads(raw), "fault": "raise"}))
    await kafkatools.produce(kafka_bootstrap, names["input"], records)
    cfg = write_config(tmp_path / "p.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": {"standby_mode": "warm", **FAST_FAILOVER}})
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v2"]), "--standby-bundle", str(example_bundles["v1"]),
                   log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, TOTAL), timeout=90,
                                  interval=0.5, what="every input accounted for")
        code, body = d.get("/status")
        assert code == 200, body
        status = json.loads(body)
        assert status["failovers"] == [] and status["active"]["version"] == "2.0.0", status
        code, metrics = d.get("/metrics")
        dead_lettered = sum(float(v) for v in re.findall(
            rb'failoverd_records_dead_lettered_total\{[^}]*reason="model_exception"[^}]*\} (\S+)', metrics))
        assert dead_lettered == len(POISON_AT), metrics[:2000]
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()

    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)  # exactly once, nothing lost
    poison = {pos for pos, raw in inputs.items() if b'"fault":"raise"' in raw}
    assert len(poison) == len(POISON_AT)
    assert {streams.source_position(r) for r in dead} == poison
    for r in dead:
        h = H.as_dict(r.headers)
        assert h[H.H_DLQ_REASON] == b"model_exception"
        assert h[H.H_DLQ_DETAIL].startswith(b"RuntimeError: injected fault 'raise' on card "), h[H.H_DLQ_DETAIL]
        assert r.value == inputs[streams.source_position(r)]  # the original bytes
    assert {release_of(r) for r in outputs} == {"2.0.0"}  # no failover: the active release answered all
    streams.assert_counts_chain(outputs)  # per card 1, 2, 3...: the poison records changed no state
    log = d.log()
    assert "FAILOVER" not in log and "batch failed" not in log, log[-3000:]
