"""Fixtures of the chaos suite: the example bundles, a seed per run, and a broker that is UP again
when the suite ends (tests here kill -9 it; in CI it is the one broker every later test uses)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos.chaoslib import SEED_ENV, BrokerControl
from tests.conftest import ROOT

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
