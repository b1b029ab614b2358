"""[output] producer settings against the real broker: the record batches the broker stores are
compressed with the configured codec (read from its log segments, tests/logsegments.py), by
every producer daemon.clients builds from the settings and by a running daemon, whose outputs
stay exactly once."""

from __future__ import annotations

import asyncio

import pytest

from daemon import clients, config
from daemon.kafka_local import LocalBroker
from tests import kafkatools, logsegments, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config


def broker_data(bootstrap: str):
    return LocalBroker(ROOT, port=int(bootstrap.rsplit(":", 1)[1])).data


def settings(bootstrap: str, **output) -> config.Settings:
    return config.parse({"kafka": {"bootstrap_servers": bootstrap}, "inputs": {"topics": ["i"]},
                         "output": {"topic": "o", **output}, "dead_letter": {"topic": "d"}}, env={})


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip", "none"])
async def test_producers_from_the_settings_write_batches_with_the_configured_codec(kafka_bootstrap, codec):
    topic = kafkatools.unique(f"codec-{codec}")
    await kafkatools.create_topics(kafka_bootstrap, {topic: 1})
    s = settings(kafka_bootstrap, compression=codec, linger_ms=50)
    values = [b'{"score": 0.%03d, "card_id": "card-%d", "release": "fraud-scorer@1.0.0"}' % (i, i % 7)
              for i in range(200)]
    producer = clients.transactional_producer(s, kafkatools.unique("codec-tx"))
    await producer.start()
    try:
        async with producer.transaction():
            await asyncio.gather(*[await producer.send(topic, v) for v in values])
    finally:
        await producer.stop()
    got = await kafkatools.read_committed(kafka_bootstrap, topic, expect=len(values))
    assert [r.value for r in got] == values
    stored = logsegments.data_batches(broker_data(kafka_bootstrap), topic, 1)
    assert sum(b.records for b in stored) == len(values)
    assert {b.codec for b in stored} == {codec}
    raw = sum(len(v) for v in values)
    on_disk = sum(b.size for b in stored)
    if codec != "none":
        assert on_disk < raw / 2, f"{codec}: {on_disk} bytes on disk for {raw} bytes of values"


async def test_the_daemon_writes_compressed_outputs_exactly_once(kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "gz", partitions=2)
    records = streams.transactions(600, seed=5)
    await kafkatools.produce(kafka_bootstrap, names["input"], records)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"output": {"compression": "gzip", "linger_ms": 20, "batch_size": 65536}})
    daemon = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "daemon.log").start()

    async def done() -> bool:
        out = await kafkatools.read_committed(kafka_bootstrap, names["output"], idle=0.3)
        return daemon.check() and len(out) >= len(records)

    try:
        await kafkatools.wait_for(done, timeout=90, interval=0.5, what="every output committed")
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        if daemon.alive():
            daemon.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert len(outputs) == len(records) and not dead
    streams.assert_counts_chain(outputs)
    data = broker_data(kafka_bootstrap)
    for role in ("output", "changelog"):  # every producer of the daemon, not the outputs alone
        stored = logsegments.data_batches(data, names[role], 2)
        assert stored and {b.codec for b in stored} == {"gzip"}, (role, stored[:5])
        assert all(b.transactional for b in stored), role
