"""daemon.clients: the kwargs every Kafka client gets, and that nothing else builds one or reaches
into aiokafka's private state (tests/integration/test_clients.py runs the private helpers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon import clients, config

ROOT = Path(__file__).resolve().parents[2]


def _kafka(**kafka: object) -> config.KafkaSettings:
    return config.parse({"kafka": kafka, "inputs": {"topics": ["in"]}, "output": {"topic": "out"},
                         "dead_letter": {"topic": "dlq"}}, env={}).kafka


class _Recorder:
    """Stands in for an aiokafka client class: records what daemon.clients passes it."""

    def __init__(self, *topics: str, **kwargs: object) -> None:
        self.topics, self.kwargs = topics, kwargs


@pytest.fixture
def recorded(monkeypatch):
    for name in ("AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"):
        monkeypatch.setattr(clients, name, _Recorder)


def test_the_connection_comes_from_settings_a_kwargs_dict_or_a_bootstrap_string():
    kafka = _kafka(bootstrap_servers=["b1:9092", "b2:9092"], client_id="me")
    assert clients.common_kwargs(kafka) == kafka.client_kwargs()
    assert clients.common_kwargs(kafka.client_kwargs()) == kafka.client_kwargs()
    assert clients.common_kwargs("h:1") == {"bootstrap_servers": "h:1"}
    assert clients.address(kafka) == "b1:9092,b2:9092"
    assert clients.address("h:1") == "h:1"


def test_consumers_read_committed_without_a_group_or_auto_commit_unless_told(recorded):
    kafka = _kafka(client_id="me")
    reader = clients.consumer(kafka)
    assert reader.kwargs == {**kafka.client_kwargs(), "group_id": None, "enable_auto_commit": False,
                             "isolation_level": "read_committed", "auto_offset_reset": "earliest"}
    member = clients.consumer(kafka, "in", group_id="g", isolation_level="read_uncommitted")
    assert member.topics == ("in",)
    assert member.kwargs["group_id"] == "g" and member.kwargs["isolation_level"] == "read_uncommitted"
    assert member.kwargs["client_id"] == "me"


def test_producers_are_idempotent_with_acks_all_and_transactional_ones_carry_their_id(recorded):
    kafka = _kafka()
    plain = clients.producer(kafka, linger_ms=5)
    assert plain.kwargs == {**kafka.client_kwargs(), "acks": "all", "enable_idempotence": True, "linger_ms": 5}
    txn = clients.transactional_producer(kafka, "failoverd.x", transaction_timeout_ms=60000)
    assert txn.kwargs["transactional_id"] == "failoverd.x"
    assert txn.kwargs["acks"] == "all" and txn.kwargs["enable_idempotence"] is True
    assert txn.kwargs["transaction_timeout_ms"] == 60000
    assert clients.admin("h:1", request_timeout_ms=3000).kwargs == {"bootstrap_servers": "h:1",
                                                                   "request_timeout_ms": 3000}


# Issue #14: the engine's clients move to daemon.clients with the engine's restructuring; until
# then daemon/engine/ is the one package this rule does not cover yet.
NOT_YET = ("daemon/engine/",)
BUILDS_A_CLIENT = re.compile(r"\bAIOKafka(Consumer|Producer|AdminClient)\(")
PRIVATE_AIOKAFKA = re.compile(r"\._client\b|\._wait_on_metadata\b|\.force_metadata_update\b|\._send_request\b")


def test_only_daemon_clients_builds_kafka_clients_or_touches_aiokafka_privates():
    offenders = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "daemon/clients.py" or rel.startswith(NOT_YET):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BUILDS_A_CLIENT.search(line) or PRIVATE_AIOKAFKA.search(line):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "build Kafka clients with daemon.clients, and keep aiokafka's private API there:\n" \
                          + "\n".join(offenders)
