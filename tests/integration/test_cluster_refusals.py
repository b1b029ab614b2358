"""What a cluster refuses at the start of a partition's transactions becomes a configuration error
that names the broker setting and the fix (real broker)."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from daemon import config
from daemon.engine import connections
from daemon.engine.connections import EngineClients
from daemon.errors import ConfigError
from tests import kafkatools
from tests.daemonproc import make_topics, write_config


async def test_a_transaction_timeout_over_the_brokers_maximum_is_a_config_error(kafka_bootstrap, tmp_path,
                                                                                 monkeypatch):
    names = await make_topics(kafka_bootstrap, "txnmax", partitions=1, control=False)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    # the local broker allows Kafka's default maximum (900000 ms): ask for more than that
    monkeypatch.setattr(connections, "TRANSACTION_TIMEOUT_MS", 900_001)
    clients = EngineClients(config.load(cfg, env={}))
    with pytest.raises(ConfigError, match=r"transaction\.max\.timeout\.ms on the brokers to at least that"):
        await clients.transactional_producer(TopicPartition(names["input"], 0), 1 << 20)
