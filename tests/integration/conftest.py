from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def example_bundles(tmp_path_factory) -> dict[str, Path]:
    """The example fraud-scorer bundles, built once per session: {"v1": archive, "v2": archive}."""
    from daemon.bundle import build

    out = tmp_path_factory.mktemp("bundles")
    return {v: build(ROOT / "examples" / "bundles" / f"fraud-{v}", out).path for v in ("v1", "v2")}
