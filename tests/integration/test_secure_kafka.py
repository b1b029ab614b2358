"""Authentication that works, against the local broker whose only listener is SASL_SSL
(``failoverd kafka up --secure``, the ``kafka_secure`` fixture): TLS with the broker's throwaway
CA, PLAIN, SCRAM-SHA-256/512 and OAUTHBEARER (unsecured JWS) from [kafka] settings, a daemon
processing records exactly once over SCRAM and over OAUTHBEARER, and a wrong password that is
one clear line, not a hang."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import NewTopic

from daemon import clients, config
from daemon.errors import ConfigError
from daemon.kafka_local import SECURE_PASSWORD, SECURE_USER, unsecured_token
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, write_config

pytestmark = pytest.mark.xdist_group("secure-broker")  # its own broker: one worker (tests/conftest.py)


def kafka_section(broker, tmp_path: Path, mechanism: str, **extra) -> dict:
    """A [kafka] section for the secure broker, the password in a file as in production."""
    section = {"bootstrap_servers": broker.bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": mechanism,
               "ssl_cafile": str(broker.ca_file)}
    if mechanism != "OAUTHBEARER":
        password = tmp_path / "kafka-password"
        password.write_text(SECURE_PASSWORD + "\n")
        section.update(sasl_plain_username=SECURE_USER, sasl_plain_password_file=str(password))
    section.update(extra)
    return section


def settings_kafka(section: dict) -> config.KafkaSettings:
    return config.parse({"kafka": section, "inputs": {"topics": ["i"]}, "output": {"topic": "o"},
                         "dead_letter": {"topic": "d"}}, env={}).kafka


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"])
async def test_every_mechanism_connects_over_tls_from_the_settings(kafka_secure, tmp_path, mechanism):
    extra = {}
    if mechanism == "OAUTHBEARER":
        token = tmp_path / "token"
        token.write_text(unsecured_token(lifetime_s=600))
        extra = {"sasl_oauth_token_file": str(token)}
    kafka = settings_kafka(kafka_section(kafka_secure, tmp_path, mechanism, **extra))
    topic = kafkatools.unique("secure")
    admin = clients.admin(kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = clients.producer(kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over TLS", key=b"k")
    finally:
        await producer.stop()
    got = await read_all(kafka, topic)
    assert [(r.key, r.value) for r in got] == [(b"k", b"over TLS")]


async def test_the_token_file_is_read_again_when_it_changes(kafka_secure, tmp_path):
    """A sidecar rotating the token file: the next connection sends the new token. The first token is
    for a subject the broker accepts; after the rewrite an expired token is sent and refused, which
    shows it was read again (an unchanged cache would still connect)."""
    token = tmp_path / "token"
    token.write_text(unsecured_token(lifetime_s=600))
    kafka = settings_kafka(kafka_section(kafka_secure, tmp_path, "OAUTHBEARER", sasl_oauth_token_file=str(token)))
    admin = clients.admin(kafka, request_timeout_ms=5000)
    await admin.start()
    await admin.close()
    token.write_text(unsecured_token(lifetime_s=-600))  # expired ten minutes ago
    admin = clients.admin(kafka, request_timeout_ms=5000)
    try:
        with pytest.raises(ConfigError, match="refused the OAUTHBEARER token"):
            await asyncio.wait_for(admin.start(), 30)
    finally:
        await admin.close()


async def test_tls_without_the_brokers_ca_is_refused(kafka_secure, tmp_path):
    """No ssl_cafile: the system trust store does not know the throwaway CA, the handshake fails."""
    section = kafka_section(kafka_secure, tmp_path, "SCRAM-SHA-512")
    del section["ssl_cafile"]
    admin = clients.admin(settings_kafka(section), request_timeout_ms=5000)
    try:
        with pytest.raises(ConfigError, match="certificate is not trusted .*; set kafka.ssl_cafile"):
            await asyncio.wait_for(admin.start(), 30)
    finally:
        await admin.close()


# ---- the daemon over SASL_SSL ---------------------------------------------------------------------

async def read_all(kafka, topic: str) -> list:
    """Every committed record of ``topic`` (read_committed, from the start to the end offsets)."""
    consumer = clients.consumer(kafka)
    await consumer.start()
    try:
        parts = await clients.partitions_of(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list = []
        deadline = time.monotonic() + 30
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(recs)
        return out
    finally:
        await consumer.stop()


async def make_topics(kafka, prefix: str) -> dict:
    names = {role: kafkatools.unique(f"{prefix}-{role}")
             for role in ("input", "output", "dlq", "changelog", "checkpoint", "control")}
    compact = {"cleanup.policy": "compact"}
    admin = clients.admin(kafka)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2 if role in ("input", "output", "changelog") else 1, 1,
                                            topic_configs=compact if role in ("changelog", "checkpoint", "control")
                                            else {}) for role, name in names.items()])
    finally:
        await admin.close()
    return names


async def run_daemon_exactly_once(broker, tmp_path, example_bundles, section: dict, n: int = 400) -> None:
    kafka = settings_kafka(section)
    names = await make_topics(kafka, "sec")
    records = streams.transactions(n, seed=3)
    producer = clients.producer(kafka)
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(names["input"], v, key=k) for k, v in records])
    finally:
        await producer.stop()
    cfg = write_config(tmp_path / "f.toml", bootstrap=broker.bootstrap, names=names, state_dir=tmp_path / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"), extra={"kafka": section})
    daemon = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "daemon.log").start()

    async def done() -> bool:
        return daemon.check() and len(await read_all(kafka, names["output"])) >= n

    try:
        await kafkatools.wait_for(done, timeout=90, interval=0.5, what="every output committed over SASL_SSL")
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        if daemon.alive():
            daemon.kill9()
    inputs = {(r.partition, r.offset): r.value for r in await read_all(kafka, names["input"])}
    outputs, dead = await read_all(kafka, names["output"]), await read_all(kafka, names["dlq"])
    streams.assert_exactly_once(inputs, outputs, dead)
    assert len(outputs) == n and not dead
    streams.assert_counts_chain(outputs)
    assert SECURE_PASSWORD not in daemon.log()


async def test_daemon_exactly_once_over_sasl_ssl_with_scram(kafka_secure, tmp_path, example_bundles):
    await run_daemon_exactly_once(kafka_secure, tmp_path, example_bundles,
                                  kafka_section(kafka_secure, tmp_path, "SCRAM-SHA-512"))


async def test_daemon_exactly_once_over_sasl_ssl_with_oauthbearer(kafka_secure, tmp_path, example_bundles):
    command = f"{sys.executable} -m daemon kafka token --subject {SECURE_USER} --lifetime 3600"
    await run_daemon_exactly_once(kafka_secure, tmp_path, example_bundles,
                                  kafka_section(kafka_secure, tmp_path, "OAUTHBEARER",
                                                sasl_oauth_token_command=command))


async def test_a_wrong_password_is_one_clear_line_not_a_hang(kafka_secure, tmp_path, example_bundles):
    section = kafka_section(kafka_secure, tmp_path, "SCRAM-SHA-512")
    Path(section["sasl_plain_password_file"]).write_text("not-the-password\n")
    names = {role: kafkatools.unique(role) for role in ("input", "output", "dlq", "changelog", "checkpoint")}
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_secure.bootstrap, names=names,
                       state_dir=tmp_path / "state", group="g", app="app", extra={"kafka": section})
    daemon = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "daemon.log").start()
    try:
        code = await asyncio.to_thread(daemon.proc.wait, 60)
    finally:
        if daemon.alive():
            daemon.kill9()
    log = daemon.log()
    assert code == 2, log[-3000:]  # ConfigError: not retried
    assert "Kafka not reachable; retrying" not in log
    last = log.strip().splitlines()[-1]
    assert f"refused the credentials of user '{SECURE_USER}' with SCRAM-SHA-512" in last, log[-3000:]
    assert "fix kafka.sasl_plain_username and the password" in last
    assert "not-the-password" not in log


def test_client_kwargs_name_a_missing_password_file(tmp_path):
    section = {"bootstrap_servers": "127.0.0.1:1", "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
               "sasl_plain_username": "u", "sasl_plain_password_file": str(tmp_path / "nope")}
    with pytest.raises(ConfigError, match=r"kafka.sasl_plain_password_file = \".*nope\" does not exist"):
        settings_kafka(section).client_kwargs()
