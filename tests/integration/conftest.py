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


@pytest.fixture
def example_registry(tmp_path, example_bundles) -> Path:
    """``tmp_path/registry``: a registry holding the example bundles (fraud-scorer 1.0.0 and 2.0.0),
    neither promoted yet: each test promotes what it starts from."""
    from daemon.registry import Registry

    root = tmp_path / "registry"
    registry = Registry(root)
    for v in ("v1", "v2"):
        registry.add(example_bundles[v])
    return root
