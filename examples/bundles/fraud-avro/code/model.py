"""fraud-scorer-avro 1.0.0: fraud-v1's model on Avro records (logistic regression on the 8
features, merchant risk and log(1 + amount)). The daemon decodes each Avro value into a dict
(schemas/input.avsc) and encodes each output dict with schemas/output.avsc: the model code is
the same as for JSON.

State per card (state_schema_version 1): {"count": n, "mean_amount": m}, the number of
transactions seen and their mean amount. Pure Python, deterministic, one pass over the batch.
A negative amount is refused with a RecordError (the record is dead-lettered).
"""

import csv
import json
import math

from daemon.model import Prediction, RecordError

N_FEATURES = 8


def sigmoid(z):
    z = max(-60.0, min(60.0, z))
    return 1.0 / (1.0 + math.exp(-z))


def risk_band(score):
    return "low" if score < 0.3 else "medium" if score < 0.7 else "high"


class FraudScorer:
    def __init__(self, context):
        self.model_version = f"{context.name}@{context.version}"
        with open(context.data["weights"], encoding="utf-8") as fh:
            w = json.load(fh)
        self.weights = [float(x) for x in w["weights"]]
        if len(self.weights) != N_FEATURES:
            raise ValueError(f"{context.data['weights']}: expected {N_FEATURES} weights, got {len(self.weights)}")
        self.bias = float(w["bias"])
        self.merchant_risk_weight = float(w["merchant_risk_weight"])
        self.amount_log_weight = float(w["amount_log_weight"])
        self.default_merchant_risk = float(w["default_merchant_risk"])
        with open(context.data["merchant_risk"], newline="", encoding="utf-8") as fh:
            self.merchant_risk = {row["merchant_id"]: float(row["risk"]) for row in csv.DictReader(fh)}

    def predict(self, batch):
        results = []
        for record in batch:
            value = record.value
            amount = float(value["amount"])
            if amount < 0:
                results.append(RecordError(f"amount must be >= 0, got {amount}"))
                continue
            state = record.state  # None for a card not seen before
            count = state["count"] if state else 0
            mean = state["mean_amount"] if state else 0.0
            count += 1
            mean += (amount - mean) / count
            merchant = self.merchant_risk.get(value.get("merchant_id"), self.default_merchant_risk)
            z = self.bias + sum(w * x for w, x in zip(self.weights, value["features"]))
            z += self.merchant_risk_weight * merchant + self.amount_log_weight * math.log1p(amount)
            score = round(sigmoid(z), 6)
            new_state = {"count": count, "mean_amount": mean}
            output = {
                "card_id": value["card_id"],
                "score": score,
                "risk_band": risk_band(score),
                "count": count,
                "mean_amount": round(mean, 4),
                "model_version": self.model_version,
            }
            results.append(Prediction(output, new_state))
        return results

    def health_check(self):
        return len(self.weights) == N_FEATURES
