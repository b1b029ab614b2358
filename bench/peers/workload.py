"""The peers workload, shared by every implementation (failoverd's bundle ships a copy of this file).

Input: the ~300-byte JSON card transactions of bench/common.py, key = card id.
Model: fraud-scorer 1.0.0's logistic score over the 8 features, the merchant's risk and
log1p(amount); per-card rolling state {"count": n, "mean_amount": m}.
Output (every system produces exactly this, compared per card and seq):
    {"card_id": str, "seq": int, "score": round(p, 6), "count": n, "mean_amount": round(m, 4)}
The float operations are the same in every implementation, in the same order, so outputs are
bit-for-bit comparable after JSON decoding.

The ``ml`` workload (issue 17, target 1) is the same but for the score: it comes from a fitted model,
the scikit-learn or ONNX example release's own model class on its own fitted model file
(examples/bundles/fraud-ml-*), called through the release's ``predict`` -- a batch at a time in
failoverd (the daemon's waves), one record at a time in the peers' per-record APIs. ONNX Runtime's
float32 kernels (and BLAS, for scikit-learn) are not batch-invariant: a score may come out one unit
of its 6th decimal apart between a batch and a single row, so the ``ml`` check allows
``ML_SCORE_TOLERANCE`` on the score (and only there).
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
    return step_scored(state, value, score(value))


def step_scored(state, value: dict, p: float) -> tuple[dict, dict]:
    """``step`` with the score already computed (by a fitted model: the ``ml`` workload)."""
    amount = float(value["amount"])
    count = state["count"] if state else 0
    mean = state["mean_amount"] if state else 0.0
    count += 1
    mean += (amount - mean) / count
    out = {"card_id": value["card_id"], "seq": value["seq"], "score": p, "count": count,
           "mean_amount": round(mean, 4)}
    return out, {"count": count, "mean_amount": mean}


def process_dict(states: dict, value: dict) -> bytes:
    """The plain loop's version: state in a dict, output encoded with orjson."""
    import orjson

    key = value["card_id"]
    out, states[key] = step(states.get(key), value)
    return orjson.dumps(out)


# ---- the ml workload --------------------------------------------------------------------------

ML_SCORE_TOLERANCE = 1e-6
RELEASE_CLASSES = ("SklearnScorer", "OnnxScorer")  # fraud-ml 1.0.0 (scikit-learn), 1.1.0 (ONNX Runtime)


def release_class():
    """The example release's model class, shipped next to this file as release_model.py (its
    code/model.py, renamed by bench/peers/run.py when it builds the peers-ml bundle)."""
    import release_model

    for name in RELEASE_CLASSES:
        if hasattr(release_model, name):
            return getattr(release_model, name)
    raise ImportError(f"release_model.py defines none of {RELEASE_CLASSES}")


def release_model(root):
    """The release's model object on the fitted model file of an unpacked peers-ml bundle ``root``
    (the same file failoverd's worker loads): what the peers call."""
    import sys
    import tomllib
    from pathlib import Path

    from daemon.model import ModelContext

    root = Path(root)
    if str(root / "code") not in sys.path:
        sys.path.insert(0, str(root / "code"))
    manifest = tomllib.loads((root / "bundle.toml").read_text())
    context = ModelContext(name=manifest["bundle"]["name"], version=manifest["bundle"]["version"], digest="",
                           root=root, data={k: root / v for k, v in manifest.get("data", {}).items()},
                           manifest=manifest)
    return release_class()(context)


def ml_scores(model, values: list) -> list:
    """The release's scores of a batch of input values, in order (one ``predict`` call)."""
    from daemon.model import Record

    return [p.output["score"] for p in model.predict([Record(v["card_id"], v) for v in values])]


def main() -> None:
    """``python workload.py scores --bundle ROOT --records N --cards C --seed S --out FILE``: the
    reference scores of bench/peers/run.py's ``ml`` input (the same records, generated the same way),
    float64 in input order, computed by the release on its own environment's python in batches of
    1000 (as the daemon batches)."""
    import argparse
    from array import array

    from bench.common import transactions_iter

    import orjson

    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("scores",))
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--cards", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = release_model(args.bundle)
    out = array("d")
    for chunk in transactions_iter(args.records, n_cards=args.cards, seed=args.seed):
        values = [orjson.loads(v) for _, v in chunk]
        for i in range(0, len(values), 1000):
            out.extend(ml_scores(model, values[i:i + 1000]))
    with open(args.out, "wb") as fh:
        out.tofile(fh)


if __name__ == "__main__":
    import os
    import sys

    for _extra in os.environ.get("FAILOVERD_BENCH_APPEND_PATH", "").split(os.pathsep):
        if _extra and _extra not in sys.path:
            sys.path.append(_extra)
    main()
