"""numpy in outputs and states (issue #13 point 6): what scikit-learn, XGBoost and ONNX Runtime return.

A model may return numpy scalars (np.float32, np.int64, np.bool_ ...) and arrays (any shape, 0-d,
non-contiguous) in its outputs and states; they are written as JSON numbers, booleans and lists,
the output schema is checked against that JSON, and the next record of the key sees the state as
the JSON it became (the same as after a restart). Anything still not JSON data (complex numbers)
is that record's dead letter, as before.
"""

from __future__ import annotations

import math

import orjson
import pytest

from daemon.engine.batch import DLQ, NO_STATE, OK, BatchProcessor, encode_numpy
from daemon.model import Prediction

import numpy as np  # noqa: E402 - the test extra installs it: a missing install fails here, never skips

SCHEMA_IN = {"type": "object", "required": ["x"], "properties": {"x": {"type": "number"}}}
SCHEMA_OUT = {
    "type": "object",
    "required": ["score", "label", "flag", "proba", "n"],
    "properties": {"score": {"type": "number"}, "label": {"type": "integer"}, "flag": {"type": "boolean"},
                   "proba": {"type": "array", "items": {"type": "number"}}, "n": {"type": "integer"}},
}


class Vectorized:
    """predict over the whole batch at once, as a scikit-learn pipeline would be called."""

    def __init__(self) -> None:
        self.states_seen: list = []

    def predict(self, batch):
        x = np.array([r.value["x"] for r in batch], dtype=np.float64)
        score = (x * 2).astype(np.float32)  # np.float32 per record
        label = (x > 1).astype(np.int64)  # np.int64
        proba = np.stack([1 / (1 + np.exp(-x)), 1 - 1 / (1 + np.exp(-x))], axis=1)  # 2-d, rows are views
        out = []
        for i, r in enumerate(batch):
            self.states_seen.append(r.state)
            n = np.int64(r.state["n"] if r.state else 0) + 1
            state = {"n": n, "last": proba[i], "mean": np.float32(x[i]), "hist": np.zeros((2, 2))[:, 0]}
            out.append(Prediction({"score": score[i], "label": label[i], "flag": np.bool_(x[i] > 0),
                                   "proba": proba[i], "n": n, "zero_d": np.array(x[i])}, state))
        return out


def _items(values, skeys):
    return [(f"k{s}".encode(), orjson.dumps({"x": v}), s) for v, s in zip(values, skeys)]


def test_numpy_outputs_and_states_are_written_as_json_numbers_and_lists():
    model = Vectorized()
    p = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    # key 0 twice: its second record (a second wave) must see the first one's state as JSON
    results, states = p.process(_items([0.5, 2.0, 3.0], [0, 1, 0]), [None, None])
    assert [r[0] for r in results] == [OK, OK, OK], results
    first = orjson.loads(results[0][1])
    assert first == {"score": 1.0, "label": 0, "flag": True, "proba": pytest.approx([0.6225, 0.3775], abs=1e-4),
                     "n": 1, "zero_d": 0.5}
    assert isinstance(first["label"], int) and isinstance(first["flag"], bool) and isinstance(first["score"], float)
    assert orjson.loads(results[2][1])["n"] == 2
    state0 = orjson.loads(states[0])
    assert state0 == {"n": 2, "last": pytest.approx([0.9526, 0.0474], abs=1e-4), "mean": 3.0, "hist": [0.0, 0.0]}
    assert orjson.loads(states[1])["n"] == 1
    # The second record of key 0 was given the state as JSON data (plain int, list), not numpy objects.
    given = model.states_seen[-1]
    assert type(given["n"]) is int and type(given["last"]) is list and type(given["mean"]) is float
    # And the next batch, carrying that state over, counts on.
    results, states = p.process(_items([1.0], [0]), [None], carry=[(0, 0)])
    assert orjson.loads(results[0][1])["n"] == 3 and orjson.loads(states[0])["n"] == 3


def test_the_output_schema_is_checked_against_the_json_numpy_becomes():
    class WrongType:
        def predict(self, batch):
            return [Prediction({"score": np.float32(1), "label": np.float64(1.5), "flag": np.bool_(True),
                                "proba": np.zeros(2), "n": np.int64(1)}, None) for _ in batch]

    results, _ = BatchProcessor(WrongType(), SCHEMA_IN, SCHEMA_OUT).process(_items([1.0], [NO_STATE]), [])
    assert results[0][0] == DLQ and results[0][1] == "output_schema" and "1.5" in results[0][2], results


def test_nan_is_null_as_orjson_writes_it_and_what_is_still_not_json_is_the_records_dead_letter():
    class Odd:
        def predict(self, batch):
            return [Prediction({"v": np.float32("nan") if r.value["x"] == 1 else np.complex64(1j)}, None)
                    for r in batch]

    results, _ = BatchProcessor(Odd(), SCHEMA_IN, {"type": "object"}).process(_items([1, 2], [NO_STATE, NO_STATE]),
                                                                              [])
    assert results[0] == (OK, b'{"v":null}')
    assert results[1][:2] == (DLQ, "model_exception") and "complex" in results[1][2], results


def test_encode_numpy_covers_scalars_and_every_array_layout():
    cases = {
        "float32": (np.float32(0.25), 0.25), "float16": (np.float16(0.5), 0.5), "int64": (np.int64(-3), -3),
        "uint8": (np.uint8(7), 7), "bool": (np.bool_(False), False), "0-d": (np.array(4.5), 4.5),
        "2-d": (np.arange(4).reshape(2, 2), [[0, 1], [2, 3]]), "strided": (np.arange(6)[::2], [0, 2, 4]),
        "transposed": (np.arange(4).reshape(2, 2).T, [[0, 2], [1, 3]]), "str": (np.array(["a", "b"]), ["a", "b"]),
        "nested": ({"a": [np.int32(1), {"b": np.float64(2)}]}, {"a": [1, {"b": 2.0}]}),
    }
    for name, (value, expected) in cases.items():
        encoded, plain = encode_numpy(value)
        assert plain == expected and orjson.loads(encoded) == expected, name
    assert math.isnan(float(np.float64("nan"))) and encode_numpy([np.float64("inf")])[1] == [None]
    with pytest.raises(TypeError, match="complex"):
        encode_numpy(np.complex128(1))
