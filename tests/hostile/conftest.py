"""Fixtures of the hostile suite: the good release every hostile one fails over to, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile import harness


@pytest.fixture(scope="session")
def good_bundle(tmp_path_factory) -> Path:
    """The well-behaved release (version 1.0.0): the standby of every hostile active release."""
    return harness.build_bundle(tmp_path_factory.mktemp("hostile-good"), name="counter",
                                version=harness.GOOD_VERSION, source=harness.model_source())
