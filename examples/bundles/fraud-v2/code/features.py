"""Feature helpers of fraud-scorer 2.0.0 (a second module, imported by model.py)."""

import math


def update_moments(state, amount):
    """Welford's update of (count, mean, m2) with one amount; returns the new state dict."""
    count = state["count"] if state else 0
    mean = state["mean_amount"] if state else 0.0
    m2 = state["m2"] if state else 0.0
    count += 1
    delta = amount - mean
    mean += delta / count
    m2 += delta * (amount - mean)
    return {"count": count, "mean_amount": mean, "m2": m2}


def amount_z(state, amount, clip):
    """z-score of ``amount`` against the card's history *before* it (0 until two amounts are known)."""
    if not state or state["count"] < 2:
        return 0.0
    std = math.sqrt(state["m2"] / (state["count"] - 1))
    if std == 0.0:
        return 0.0
    return max(-clip, min(clip, (amount - state["mean_amount"]) / std))
