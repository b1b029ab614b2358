"""fraud-scorer 2.0.0: v1's logistic model plus the amount's z-score vs the card's history.

State per card (state_schema_version 2): {"count": n, "mean_amount": m, "m2": M2} (Welford).

Failover drills: a record whose value has "fault" makes the model fail for real:
  "crash"      the worker process is killed (SIGKILL)
  "hang"       predict sleeps for an hour (detected by the predict timeout)
  "raise"      predict raises RuntimeError for any batch holding this record: a poison record,
               isolated by splitting the batch and dead-lettered (reason model_exception)
  "raise_all"  from this record on, predict raises RuntimeError for every batch (a broken
               release: the batches fail as a whole and the exception rate fails it over)
  "bad_output" the output violates the output schema
  "slow"       predict sleeps 0.5 s for that record, then answers normally
Never run "crash" or "hang" in-process: they take the caller down with them.
"""

import csv
import json
import math
import os
import signal
import time

from daemon.model import Prediction, RecordError
from features import amount_z, update_moments

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
        self.amount_z_weight = float(w["amount_z_weight"])
        self.default_merchant_risk = float(w["default_merchant_risk"])
        self.z_clip = float(w["z_clip"])
        with open(context.data["merchant_risk"], newline="", encoding="utf-8") as fh:
            self.merchant_risk = {row["merchant_id"]: float(row["risk"]) for row in csv.DictReader(fh)}
        self.broken_by = None  # the card of the "raise_all" record that broke this instance, if any

    def predict(self, batch):
        if self.broken_by is not None:
            raise RuntimeError(f"injected fault 'raise_all' (since card {self.broken_by!r})")
        results = []
        for record in batch:
            value = record.value
            fault = value.get("fault")
            if fault == "raise_all":
                self.broken_by = value.get("card_id")
                raise RuntimeError(f"injected fault 'raise_all' on card {self.broken_by!r}")
            if fault == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault == "hang":
                time.sleep(3600)
            elif fault == "raise":
                raise RuntimeError(f"injected fault 'raise' on card {value.get('card_id')!r}")
            elif fault == "slow":
                time.sleep(0.5)
            amount = float(value["amount"])
            if amount < 0:
                results.append(RecordError(f"amount must be >= 0, got {amount}"))
                continue
            state = record.state  # None for a card not seen before
            z_amount = amount_z(state, amount, self.z_clip)
            new_state = update_moments(state, amount)
            merchant = self.merchant_risk.get(value.get("merchant_id"), self.default_merchant_risk)
            z = self.bias + sum(w * x for w, x in zip(self.weights, value["features"]))
            z += (self.merchant_risk_weight * merchant + self.amount_log_weight * math.log1p(amount)
                  + self.amount_z_weight * z_amount)
            score = round(sigmoid(z), 6)
            if fault == "bad_output":
                output = {"card_id": value["card_id"], "score": "not-a-number", "model_version": self.model_version}
            else:
                output = {
                    "card_id": value["card_id"],
                    "score": score,
                    "risk_band": risk_band(score),
                    "count": new_state["count"],
                    "mean_amount": round(new_state["mean_amount"], 4),
                    "amount_z": round(z_amount, 4),
                    "model_version": self.model_version,
                }
            results.append(Prediction(output, new_state))
        return results

    def warm_up(self):
        """Score one synthetic record so the first real batch pays no first-call cost."""
        from daemon.model import Record

        self.predict([Record(None, {"card_id": "warm-up", "amount": 1.0, "features": [0.0] * N_FEATURES})])

    def health_check(self):
        return len(self.weights) == N_FEATURES
