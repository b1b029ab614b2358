"""Fixtures of the chaos suite: the example bundles, a seed per run, and a broker of its own.

The tests here kill -9 and restart their broker, so they get one no other test uses (the
shared broker's port + 20, its own data under .local/), started for the session and stopped at
its end: the rest of the suite runs beside them in parallel (``make test``) on the shared one."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.chaoslib import SEED_ENV, BrokerControl
from tests.conftest import ROOT, _one_at_a_time

CHAOS_PORT_OFFSET = 20

# (test id, seed) of every chaos test of this session: printed in the terminal summary
SEEDS: list[tuple[str, int]] = []


@pytest.fixture(scope="session")
def chaos_bundles(tmp_path_factory) -> dict[str, Path]:
    """The example fraud-scorer bundles, built once per session: {"v1": healthy, "v2": obeys "fault"}."""
    from daemon.bundle import build

    out = tmp_path_factory.mktemp("chaos-bundles")
    return {v: build(ROOT / "examples" / "bundles" / f"fraud-{v}", out).path for v in ("v1", "v2")}


@pytest.fixture
def chaos_seed(request) -> int:
    """The run's seed: ``FAILOVERD_CHAOS_SEED`` when set (to reproduce a failure), else a fresh one.
    Printed at the start of the test (captured output of a failure) and in the terminal summary."""
    env = os.environ.get(SEED_ENV)
    seed = int(env) if env else random.SystemRandom().randrange(1, 2**31)
    SEEDS.append((request.node.nodeid, seed))
    print(f"\nchaos seed: {seed}  (reproduce with {SEED_ENV}={seed})", flush=True)
    return seed


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """The chaos suite's own broker (overrides tests/conftest.py's shared one for tests/chaos)."""
    shared = int(os.environ.get("FAILOVERD_TEST_KAFKA_PORT") or os.environ.get("FAILOVERD_KAFKA_PORT") or "9092")
    port = str(shared + CHAOS_PORT_OFFSET)

    def cli(verb: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon", "kafka", verb, "--port", port],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    with _one_at_a_time(f"kafka-up-{port}"):
        up = cli("up")
    if up.returncode != 0:
        pytest.fail(f"the chaos suite's Kafka broker did not start:\n{up.stdout}\n{up.stderr}")
    yield f"127.0.0.1:{port}"
    cli("down")


@pytest.fixture
def broker(kafka_bootstrap):
    """Kill/restart control of the test broker; restarts it at teardown if a test left it down."""
    control = BrokerControl(kafka_bootstrap)
    try:
        yield control
    finally:
        control.ensure_up()


def pytest_terminal_summary(terminalreporter):
    if SEEDS:
        terminalreporter.section("chaos seeds")
        for nodeid, seed in SEEDS:
            terminalreporter.write_line(f"{nodeid}: {SEED_ENV}={seed}")
