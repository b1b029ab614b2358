"""fraud-ml 1.0.0: the fitted scikit-learn pipeline of examples/ml/train.py.

Vectorized over the batch: one (n, 9) matrix per ``predict`` -- the 8 features and
log1p(amount) -- one ``predict_proba`` call, then one output per record. A negative amount is
refused with a RecordError (the record is dead-lettered). (Only the ONNX release, 1.1.0, has
the demo's ``"fault": "crash"`` hook: this one is the standby that takes over from it.)
"""

import joblib
import numpy as np
import sklearn

from daemon.model import Prediction, RecordError


def risk_band(score):
    return "low" if score < 0.3 else "medium" if score < 0.7 else "high"


def matrix(batch):
    """(X, amounts): the model's input matrix for the whole batch, float64."""
    amounts = np.fromiter((float(r.value["amount"]) for r in batch), np.float64, len(batch))
    features = np.array([r.value["features"] for r in batch], dtype=np.float64).reshape(len(batch), 8)
    return np.column_stack([features, np.log1p(np.maximum(amounts, 0.0))]), amounts


class SklearnScorer:
    def __init__(self, context):
        self.model_version = f"{context.name}@{context.version}"
        self.runtime = f"scikit-learn {sklearn.__version__}"
        self.pipeline = joblib.load(context.data["model"])

    def predict(self, batch):
        X, amounts = matrix(batch)
        scores = self.pipeline.predict_proba(X)[:, 1].round(6).tolist()
        results = []
        for record, amount, score in zip(batch, amounts.tolist(), scores):
            if amount < 0:
                results.append(RecordError(f"amount must be >= 0, got {amount}"))
                continue
            results.append(Prediction({"card_id": record.value["card_id"], "score": score,
                                       "risk_band": risk_band(score), "model_version": self.model_version,
                                       "runtime": self.runtime}, None))
        return results
