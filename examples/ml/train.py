"""Train the fraud-ml example model and write both of its releases' model files.

    uv venv .local/ml-train && uv pip install --python .local/ml-train/bin/python -r examples/ml/requirements-train.txt
    .local/ml-train/bin/python examples/ml/train.py

Synthetic card transactions (the shape ``failoverd demo`` streams: 8 features in [0, 1) and an
amount), labelled by a hidden logistic rule plus noise, with a fixed seed; a scikit-learn
pipeline (StandardScaler + LogisticRegression) fitted on ``[features..., log1p(amount)]``. Writes

* ``examples/bundles/fraud-ml-sklearn/data/model.joblib``  the fitted pipeline (scikit-learn release)
* ``examples/bundles/fraud-ml-onnx/data/model.onnx``       the same pipeline converted with skl2onnx

and rewrites the ``[metadata]`` table of both bundle.toml files with this script's sha256, the
training data's sha256 (of the float64 matrix and labels, as bytes), the seed and the fit's
accuracy, so each manifest says where its model came from. Same seed, same versions: same bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from pathlib import Path

import joblib
import numpy as np
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

SEED = 20240514
SAMPLES = 20000
N_FEATURES = 8
HERE = Path(__file__).resolve().parent
BUNDLES = HERE.parent / "bundles"
SKLEARN_DIR = BUNDLES / "fraud-ml-sklearn"
ONNX_DIR = BUNDLES / "fraud-ml-onnx"


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.random((n, N_FEATURES)).round(3)
    amount = rng.uniform(1, 900, n).round(2)
    hidden = np.array([1.6, -0.9, 0.4, 2.2, -1.3, 0.0, 0.7, -0.5])
    z = features @ hidden + 0.9 * np.log1p(amount) - 6.0 + rng.normal(0, 0.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    X = np.column_stack([features, np.log1p(amount)])
    return X, y


def metadata(data_digest: str, accuracy: float, runtime: str) -> str:
    script = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return (f'author = "risk-ml team <risk-ml@example.com>"\n'
            f'description = "Card fraud score: StandardScaler + LogisticRegression on 8 features and log1p(amount), '
            f'served with {runtime}."\n'
            f'training_script = "examples/ml/train.py"\n'
            f'training_script_sha256 = "{script}"\n'
            f'training_data = "synthetic: {SAMPLES} transactions, numpy default_rng seed {SEED}"\n'
            f'training_data_sha256 = "{data_digest}"\n'
            f'trained_with = "scikit-learn {sklearn.__version__}, numpy {np.__version__}, '
            f'skl2onnx {skl2onnx.__version__}"\n'
            f'train_accuracy = {accuracy:.4f}\n')


def write_metadata(bundle_dir: Path, table: str) -> None:
    toml = bundle_dir / "bundle.toml"
    text = toml.read_text(encoding="utf-8")
    head = re.split(r"(?m)^\[metadata\]\s*$", text)[0]  # [metadata] is the last table
    toml.write_text(head + "[metadata]\n" + table, encoding="utf-8")


def main() -> int:
    X, y = synthetic(SAMPLES, SEED)
    data_digest = hashlib.sha256(np.ascontiguousarray(X, "<f8").tobytes() + y.astype("<i8").tobytes()).hexdigest()
    pipeline = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=1000))])
    pipeline.fit(X, y)
    accuracy = float(pipeline.score(X, y))

    buf = io.BytesIO()
    joblib.dump(pipeline, buf)
    (SKLEARN_DIR / "data").mkdir(parents=True, exist_ok=True)
    (SKLEARN_DIR / "data" / "model.joblib").write_bytes(buf.getvalue())

    onx = convert_sklearn(pipeline, "fraud-ml", initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
                          options={id(pipeline): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    (ONNX_DIR / "data").mkdir(parents=True, exist_ok=True)
    (ONNX_DIR / "data" / "model.onnx").write_bytes(onx.SerializeToString())

    write_metadata(SKLEARN_DIR, metadata(data_digest, accuracy, "scikit-learn"))
    write_metadata(ONNX_DIR, metadata(data_digest, accuracy, "ONNX Runtime (converted with skl2onnx)"))
    print(f"trained on {SAMPLES} samples (seed {SEED}, data sha256 {data_digest[:16]}...): accuracy {accuracy:.4f}")
    print(f"wrote {SKLEARN_DIR / 'data' / 'model.joblib'} ({len(buf.getvalue())} bytes)")
    print(f"wrote {ONNX_DIR / 'data' / 'model.onnx'} ({len(onx.SerializeToString())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
