"""The peers workload, shared by every implementation (failoverd's bundle ships a copy of this file).

Input: the ~300-byte JSON card transactions of bench/common.py, key = card id.
Model: fraud-scorer 1.0.0's logistic score over the 8 features, the merchant's risk and
log1p(amount); per-card rolling state {"count": n, "mean_amount": m}.
Output (every system produces exactly this, compared per card and seq):
    {"card_id": str, "seq": int, "score": round(p, 6), "count": n, "mean_amount": round(m, 4)}
The float operations are the same in every implementation, in the same order, so outputs are
bit-for-bit comparable after JSON decoding.
"""

import math

WEIGHTS = (0.9, -0.4, 1.2, 0.3, -0.8, 0.5, 1.1, -0.2)
BIAS = -3.0
MERCHANT_RISK_WEIGHT = 2.5
AMOUNT_LOG_WEIGHT = 0.3
DEFAULT_MERCHANT_RISK = 0.2
MERCHANT_RISK = {"m-grocery": 0.05, "m-fuel": 0.10, "m-pharmacy": 0.08, "m-electronics": 0.45, "m-jewelry": 0.60,
                 "m-travel": 0.35, "m-gaming": 0.70, "m-giftcards": 0.85, "m-crypto": 0.90, "m-restaurant": 0.12}


def score(value: dict) -> float:
    z = BIAS
    for w, x in zip(WEIGHTS, value["features"]):
        z += w * x
    z += MERCHANT_RISK_WEIGHT * MERCHANT_RISK.get(value.get("merchant_id"), DEFAULT_MERCHANT_RISK)
    z += AMOUNT_LOG_WEIGHT * math.log1p(float(value["amount"]))
    z = max(-60.0, min(60.0, z))
    return round(1.0 / (1.0 + math.exp(-z)), 6)


def step(state, value: dict) -> tuple[dict, dict]:
    """(output, new_state) for one record given the card's state (None = unseen)."""
    amount = float(value["amount"])
    count = state["count"] if state else 0
    mean = state["mean_amount"] if state else 0.0
    count += 1
    mean += (amount - mean) / count
    out = {"card_id": value["card_id"], "seq": value["seq"], "score": score(value), "count": count,
           "mean_amount": round(mean, 4)}
    return out, {"count": count, "mean_amount": mean}


def process_dict(states: dict, value: dict) -> bytes:
    """The plain loop's version: state in a dict, output encoded with orjson."""
    import orjson

    key = value["card_id"]
    out, states[key] = step(states.get(key), value)
    return orjson.dumps(out)
