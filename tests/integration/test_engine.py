"""The data path against the real broker: exactly-once outputs, provenance, dead letters, state."""

from __future__ import annotations

import orjson

from daemon.engine import headers as H
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config


async def _input_positions(bootstrap: str, topic: str) -> dict:
    got = await kafkatools.read_committed(bootstrap, topic)
    return {(r.partition, r.offset): r.value for r in got}


async def test_every_input_once_with_provenance_and_dead_letters(kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "eng", partitions=2)
    good = streams.transactions(1500, seed=1)
    poison = [
        (b"card-p1", b"{not json"),
        (b"card-p2", orjson.dumps({"card_id": "card-p2", "amount": "ten", "features": [0] * 8})),
        (b"card-p3", b'{"card_id": "card-p3", "amount": 1, "features": [' + b",".join([b"0"] * 8) + b'], "pad": "'
         + b"x" * 5000 + b'"}'),
        (b"card-p4", orjson.dumps({"card_id": "card-p4", "amount": -5.0, "features": [0.1] * 8})),
    ]
    records = good[:700] + poison + good[700:]
    await kafkatools.produce(kafka_bootstrap, names["input"], records)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    daemon = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "daemon.log").start()
    try:
        await kafkatools.wait_for(lambda: daemon.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=90,
                                  what="all outputs and dead letters committed")
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        if daemon.alive():
            daemon.kill9()
    inputs = await _input_positions(kafka_bootstrap, names["input"])
    outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
    dead = await kafkatools.read_committed(kafka_bootstrap, names["dlq"])
    streams.assert_exactly_once(inputs, outputs, dead)
    assert len(outputs) == len(good)
    streams.assert_counts_chain(outputs)

    reasons = {H.as_dict(r.headers)[H.H_DLQ_REASON].decode(): r for r in dead}
    assert set(reasons) == {"bad_json", "schema", "oversized", "model_error"}, reasons.keys()
    assert reasons["bad_json"].value == b"{not json" and reasons["bad_json"].key == b"card-p1"
    assert b"amount" in H.as_dict(reasons["schema"].headers)[H.H_DLQ_DETAIL]
    assert b"amount must be >= 0" in H.as_dict(reasons["model_error"].headers)[H.H_DLQ_DETAIL]

    h = H.as_dict(outputs[0].headers)
    assert h[H.H_RELEASE_NAME] == b"fraud-scorer" and h[H.H_RELEASE_VERSION] == b"1.0.0"
    assert len(h[H.H_RELEASE_DIGEST]) == 64
    assert h[H.H_SOURCE_TOPIC] == names["input"].encode()


async def _count_committed(bootstrap, names, expected) -> bool:
    out = await kafkatools.read_committed(bootstrap, names["output"], idle=0.3)
    dead = await kafkatools.read_committed(bootstrap, names["dlq"], idle=0.3)
    return len(out) + len(dead) >= expected
