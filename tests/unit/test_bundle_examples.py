"""The example bundles (examples/bundles/fraud-v1, fraud-v2) build, verify and predict.

Faults that kill or hang the process ("crash", "hang") run in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from jsonschema.validators import validator_for

from daemon.bundle import build, open_bundle, verify_path
from daemon.model import Prediction, Record, RecordError, normalize
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples" / "bundles"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    out = {}
    for name in ("fraud-v1", "fraud-v2"):
        built = build(EXAMPLES / name, tmp / "dist")
        assert verify_path(built.path).digest == built.digest
        out[name] = open_bundle(built.path, tmp / "unpack")
    return out


def _samples(bundle) -> list[dict]:
    return [json.loads(line) for line in (bundle.root / "samples.jsonl").read_text().splitlines() if line.strip()]


def _run(model, samples: list[dict], states: dict | None = None) -> list:
    states = {} if states is None else states
    results = []
    for s in samples:  # one record per batch: state carried between batches by "the engine" (this dict)
        r = normalize(model.predict([Record(s["key"], s["value"], states.get(s["key"]))])[0])
        if isinstance(r, Prediction):
            states[s["key"]] = r.state
        results.append(r)
    return results


def _v(schema):
    return validator_for(schema)(schema)


@pytest.mark.parametrize("name,version,ssv", [("fraud-v1", "1.0.0", 1), ("fraud-v2", "2.0.0", 2)])
def test_example_builds_verifies_and_scores_the_samples(bundles, name, version, ssv):
    b = bundles[name]
    assert (b.name, b.version, b.state_schema_version) == ("fraud-scorer", version, ssv)
    assert set(b.data) == {"weights", "merchant_risk"}
    b.check_environment()
    model = b.instantiate()
    assert model.health_check() is True
    samples = _samples(b)
    inputs = _v(b.input_schema)
    assert all(inputs.is_valid(s["value"]) for s in samples)
    results = _run(model, samples)
    outputs = _v(b.output_schema)
    amounts: dict[str, list[float]] = {}
    for s, r in zip(samples, results):
        if s["value"]["amount"] < 0:
            assert isinstance(r, RecordError) and "amount must be >= 0" in str(r)
            continue
        assert isinstance(r, Prediction)
        assert outputs.is_valid(r.output), list(outputs.iter_errors(r.output))
        amounts.setdefault(s["key"], []).append(s["value"]["amount"])
        seen = amounts[s["key"]]
        assert r.output["count"] == r.state["count"] == len(seen)  # state evolves per card
        assert r.output["mean_amount"] == pytest.approx(sum(seen) / len(seen), abs=1e-4)
        assert 0 <= r.output["score"] <= 1 and r.output["model_version"] == f"fraud-scorer@{version}"
    scores = {r.output["risk_band"] for r in results if isinstance(r, Prediction)}
    assert {"low", "high"} <= scores  # the samples exercise the range
    assert [getattr(r, "output", str(r)) for r in _run(b.instantiate(), samples)] == \
           [getattr(r, "output", str(r)) for r in results]  # deterministic


def test_v2_uses_the_amount_zscore_and_differs_from_v1(bundles):
    v1, v2 = bundles["fraud-v1"].instantiate(), bundles["fraud-v2"].instantiate()
    samples = [s for s in _samples(bundles["fraud-v1"]) if s["value"]["amount"] >= 0]
    r1, r2 = _run(v1, samples), _run(v2, samples)
    assert [r.output["score"] for r in r1] != [r.output["score"] for r in r2]
    assert set(r2[-1].state) == {"count", "mean_amount", "m2"} and set(r1[-1].state) == {"count", "mean_amount"}
    assert r2[-1].output["amount_z"] != 0  # the third amount of card-1 has a history to compare with


RECORD = {"card_id": "c1", "merchant_id": "m-fuel", "amount": 12.0, "features": [0.1] * 8}


def test_v1_ignores_the_fault_field(bundles):
    model = bundles["fraud-v1"].instantiate()
    for fault in ("crash", "hang", "raise", "raise_all", "bad_output", "slow"):
        r = normalize(model.predict([Record("c1", {**RECORD, "fault": fault})])[0])
        assert _v(bundles["fraud-v1"].output_schema).is_valid(r.output)


def test_v2_fault_raise_fails_every_batch_holding_the_record(bundles):
    model = bundles["fraud-v2"].instantiate()
    with pytest.raises(RuntimeError, match="injected fault 'raise'"):
        model.predict([Record("c0", RECORD), Record("c1", {**RECORD, "fault": "raise"})])
    assert normalize(model.predict([Record("c0", RECORD)])[0]).output["card_id"] == "c1"  # the rest works


def test_v2_fault_raise_all_breaks_the_model_from_then_on(bundles):
    model = bundles["fraud-v2"].instantiate()
    assert _v(bundles["fraud-v2"].input_schema).is_valid({**RECORD, "fault": "raise_all"})
    with pytest.raises(RuntimeError, match="injected fault 'raise_all'"):
        model.predict([Record("c1", {**RECORD, "fault": "raise_all"})])
    with pytest.raises(RuntimeError, match="injected fault 'raise_all'"):
        model.predict([Record("c0", RECORD)])  # any batch, without the record


def test_v2_fault_bad_output_violates_the_output_schema(bundles):
    model = bundles["fraud-v2"].instantiate()
    good, bad = model.predict([Record("c0", RECORD), Record("c1", {**RECORD, "fault": "bad_output"})])
    schema = _v(bundles["fraud-v2"].output_schema)
    assert schema.is_valid(good.output) and not schema.is_valid(bad.output)
    assert _v(bundles["fraud-v2"].input_schema).is_valid({**RECORD, "fault": "bad_output"})


def test_v2_fault_slow_takes_half_a_second_then_answers(bundles):
    model = bundles["fraud-v2"].instantiate()
    t0 = time.monotonic()
    (r,) = model.predict([Record("c1", {**RECORD, "fault": "slow"})])
    assert time.monotonic() - t0 >= 0.5
    assert _v(bundles["fraud-v2"].output_schema).is_valid(r.output)


def _child(bundle, fault: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from daemon.bundle import open_bundle
        from daemon.model import Record
        model = open_bundle(Path({str(bundle.root)!r})).instantiate()
        print("predicting", flush=True)
        model.predict([Record("c1", {{**{RECORD!r}, "fault": {fault!r}}})])
        print("returned", flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_v2_fault_crash_kills_the_process(bundles):
    proc = _child(bundles["fraud-v2"], "crash")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -9, (out, err)
    assert out == "predicting\n"


def test_v2_fault_hang_does_not_return(bundles):
    proc = _child(bundles["fraud-v2"], "hang")
    try:
        assert proc.stdout.readline() == "predicting\n"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -9


def test_bundle_try_cli_runs_the_samples(bundles, tmp_path):
    b = bundles["fraud-v1"]
    proc = subprocess.run([sys.executable, "-m", "daemon", "bundle", "try", str(b.root), "--input",
                           str(b.root / "samples.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(_samples(b))
    assert sum("record_error" in line for line in lines) == 1
    assert [line["output"]["count"] for line in lines if line["key"] == "card-1"] == [1, 2, 3]
