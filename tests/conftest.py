"""Shared fixtures.

Integration tests (marked ``integration``) use a real single-node Kafka broker, started once
per session through ``failoverd kafka up`` (reused when already up). Unit tests of pure
logic request no broker and run without one.

``make test`` runs the suite in two parts: every test not marked ``serial`` in parallel
(pytest-xdist, two workers sharing the one broker: every test has topics, groups and
transactional ids of its own), then the ``serial`` ones alone: those that kill the shared
broker (test_local_broker.py). The chaos suite kills a broker of its own (tests/chaos/conftest.py);
its tests, and those of the SASL_SSL broker, each stay on one worker (``xdist_group``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import kafkatools

ROOT = Path(__file__).resolve().parent.parent

SERIAL_FILES = ("test_local_broker.py",)
"""Test files that disturb what parallel tests share (see the module docstring)."""


@contextlib.contextmanager
def _one_at_a_time(name: str) -> Iterator[None]:
    """Parallel test workers start a shared broker one at a time (the second finds it up)."""
    lock = ROOT / ".local" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def kafka_bootstrap(request) -> Iterator[str]:
    """Bootstrap address of the local broker; starts it through the same command users run."""
    port = os.environ.get("FAILOVERD_TEST_KAFKA_PORT") or os.environ.get("FAILOVERD_KAFKA_PORT") or "9092"
    with _one_at_a_time(f"kafka-up-{port}"):
        proc = subprocess.run([sys.executable, "-m", "daemon", "kafka", "up", "--port", port],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"local Kafka broker did not start:\n{proc.stdout}\n{proc.stderr}")
    bootstrap = f"127.0.0.1:{port}"
    yield bootstrap
    if request.session.testsfailed:
        return  # kept for a look at what the failed tests wrote
    try:  # the topics this session made: a broker that keeps them all slows down run after run
        asyncio.run(kafkatools.delete_session_topics(bootstrap))
    except Exception as exc:  # noqa: BLE001 - the broker may be down (a test stopped it): keep them
        print(f"\nkept this session's test topics ({exc!r})")


@pytest.fixture(scope="session")
def kafka_secure():
    """The local broker whose only listener is SASL_SSL (``failoverd kafka up --secure``, its own
    ports, so the plain broker keeps running): a LocalBroker with ``ca_file``, ``client_kwargs(mechanism)``
    and the user in daemon.kafka_local.SECURE_USER / SECURE_PASSWORD. Stopped at the end of the
    session when this session started it."""
    from daemon.kafka_local import LocalBroker, default_secure_port

    port = int(os.environ.get("FAILOVERD_TEST_KAFKA_SECURE_PORT") or default_secure_port())
    broker = LocalBroker(ROOT, port=port, secure=True)
    started = not broker.status()["running"]
    proc = subprocess.run([sys.executable, "-m", "daemon", "kafka", "up", "--secure", "--port", str(port)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"secure local Kafka broker did not start:\n{proc.stdout}\n{proc.stderr}")
    yield broker
    if started:
        subprocess.run([sys.executable, "-m", "daemon", "kafka", "down", "--secure", "--port", str(port)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def schema_registry_url():
    """A real Schema Registry (Apicurio, in memory) of this test session, on a port of its own, started
    and stopped through the command users run (``failoverd schema-registry up|down``); its global
    compatibility level is set to BACKWARD (Apicurio's default is NONE, Confluent's BACKWARD)."""
    from tests.schemareg import LocalRegistryProc

    registry = LocalRegistryProc.start_new()
    try:
        registry.client().set_compatibility("BACKWARD")
        yield registry.url
    finally:
        registry.remove()


@pytest.fixture
def unique_name(request):
    """A factory of topic/group names unique to this test."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]

    def make(prefix: str = "") -> str:
        return kafkatools.unique(f"{prefix}{base}")

    return make


@pytest.fixture(autouse=True)
def xdist_group_kept(request) -> None:
    """On an xdist worker with --dist loadgroup, a test marked xdist_group carries its group in its
    node id (``...@group``); without it the scheduler spreads the group's tests over the workers,
    and two tests that kill the one broker of their own run at once. pytest 9.2 broke that
    silently (pytest-xdist#1386): such a test fails here, saying so."""
    node = request.node
    if getattr(request.config.option, "loadgroup", False) and node.get_closest_marker("xdist_group") \
            and "@" not in node.nodeid:
        pytest.fail("pytest-xdist --dist loadgroup did not keep this test in its xdist_group with this pytest "
                    "(pytest-xdist#1386): see the pin of pytest in pyproject.toml", pytrace=False)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if os.path.basename(path) in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
        # make test: `--dist loadgroup` spreads tests one by one over the workers, except the
        # modules marked xdist_group (tests/chaos, test_secure_kafka.py: a session broker of their
        # own, which the worker that started it stops at the end of its session): a module-level
        # mark there (xdist_group_kept fails them when pytest-xdist does not group them).
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        if f"{os.sep}chaos{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.chaos)
        if f"{os.sep}hostile{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.hostile)
