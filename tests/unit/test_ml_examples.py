"""The real-ML example releases (examples/bundles/fraud-ml-*): what they record and pin.

Running them needs their wheels (~110 MB from PyPI): ``make ml-demo`` does, end to end.
"""

from __future__ import annotations

import hashlib

import pytest

from daemon.bundle import build
from daemon.bundle.lock import parse_lock
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples" / "bundles"
SCRIPT = ROOT / "examples" / "ml" / "train.py"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml")
    return {name: build(EXAMPLES / name, out) for name in ("fraud-ml-sklearn", "fraud-ml-onnx")}


def pins(name: str) -> dict[str, str]:
    return {p.name.lower(): p.version for p in parse_lock(EXAMPLES / name / "requirements.lock", name)}


def test_both_record_the_training_script_and_data_digest_in_the_manifest(built):
    script = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()
    data = set()
    for b in built.values():
        meta = b.manifest["metadata"]
        assert meta["training_script"] == "examples/ml/train.py"
        # fails when train.py changed without being re-run (its outputs would not be what it makes)
        assert meta["training_script_sha256"] == script
        assert len(meta["training_data_sha256"]) == 64
        data.add(meta["training_data_sha256"])
    assert len(data) == 1  # one model, two runtimes
    assert {b.ref for b in built.values()} == {"fraud-ml@1.0.0", "fraud-ml@1.1.0"}


def test_the_committed_model_files_are_small():
    for path in (EXAMPLES / "fraud-ml-sklearn" / "data" / "model.joblib", EXAMPLES / "fraud-ml-onnx" / "data" / "model.onnx"):
        assert 0 < path.stat().st_size < 200_000, path
    assert not list(EXAMPLES.glob("fraud-ml-*/wheels")), "wheels are fetched by --with-wheels, never committed"


def test_two_dependency_sets_that_could_not_share_one_environment():
    sk, onnx = pins("fraud-ml-sklearn"), pins("fraud-ml-onnx")
    assert "scikit-learn" in sk and "scikit-learn" not in onnx and "onnxruntime" in onnx
    assert sk["numpy"] != onnx["numpy"]
