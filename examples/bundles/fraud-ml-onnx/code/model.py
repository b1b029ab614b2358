"""fraud-ml 1.1.0: the same fitted pipeline as 1.0.0, converted to ONNX with skl2onnx
(examples/ml/train.py), served with ONNX Runtime -- no scikit-learn in this release.

Vectorized over the batch: one (n, 9) float32 matrix per ``predict`` -- the 8 features and
log1p(amount) -- one ``InferenceSession.run``, then one output per record. A negative amount is
refused with a RecordError (the record is dead-lettered). A record with ``"fault": "crash"``
kills this release's worker (SIGKILL): what ``failoverd demo --ml`` uses to show a failover.
"""

import os
import signal

import numpy as np
import onnxruntime as ort

from daemon.model import Prediction, RecordError


def risk_band(score):
    return "low" if score < 0.3 else "medium" if score < 0.7 else "high"


def matrix(batch):
    """(X, amounts): the model's input matrix for the whole batch, float32 as the graph expects."""
    amounts = np.fromiter((float(r.value["amount"]) for r in batch), np.float64, len(batch))
    features = np.array([r.value["features"] for r in batch], dtype=np.float64).reshape(len(batch), 8)
    X = np.column_stack([features, np.log1p(np.maximum(amounts, 0.0))])
    return X.astype(np.float32), amounts


class OnnxScorer:
    def __init__(self, context):
        self.model_version = f"{context.name}@{context.version}"
        self.runtime = f"onnxruntime {ort.__version__}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one worker, one core: the daemon runs batches in parallel already
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(context.data["model"]), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.proba = [o.name for o in self.session.get_outputs()].index("probabilities")

    def predict(self, batch):
        if any(r.value.get("fault") == "crash" for r in batch):
            os.kill(os.getpid(), signal.SIGKILL)
        X, amounts = matrix(batch)
        proba = self.session.run(None, {self.input_name: X})[self.proba]
        scores = proba[:, 1].astype(np.float64).round(6).tolist()
        results = []
        for record, amount, score in zip(batch, amounts.tolist(), scores):
            if amount < 0:
                results.append(RecordError(f"amount must be >= 0, got {amount}"))
                continue
            results.append(Prediction({"card_id": record.value["card_id"], "score": score,
                                       "risk_band": risk_band(score), "model_version": self.model_version,
                                       "runtime": self.runtime}, None))
        return results
