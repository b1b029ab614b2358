"""A model that returns numpy, against the real broker (issue #13 point 6).

The release is vectorized over the batch with numpy, as a scikit-learn or ONNX Runtime model is,
and returns np.float32 / np.int64 / np.bool_ / np.ndarray in its outputs and states. It is added
to a registry and promoted, so the daemon's worker loads ``bundles/<digest>.fdb`` from the store
and checks that digest before importing it. Every input must come out exactly once as JSON, with
the per-card count carried through the numpy state (1, 2, 3 ...). On the code as it was, every
record was a ``model_exception`` dead letter ("Type is not JSON serializable").
"""

from __future__ import annotations

import numpy  # noqa: F401 - the test extra installs it: a missing install fails here, never skips
import orjson

from daemon.bundle import build
from daemon.engine import headers as H
from daemon.registry import Registry
from tests import bundlesmith, kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed

TOTAL = 1200

MODEL = '''\
import numpy as np

from daemon.model import Prediction


class NumpyScorer:
    def __init__(self, context):
        self.weights = np.linspace(-1.0, 1.0, 8, dtype=np.float32)

    def predict(self, batch):
        features = np.array([r.value["features"] for r in batch], dtype=np.float32)
        scores = 1 / (1 + np.exp(-(features @ self.weights)))  # np.float32 per record
        out = []
        for r, row, score in zip(batch, features, scores):
            state = r.state or {"count": 0, "mean_amount": 0.0}
            count = np.int64(state["count"]) + 1
            mean = np.float64(state["mean_amount"]) + (r.value["amount"] - state["mean_amount"]) / count
            out.append(Prediction(
                {"card_id": r.value["card_id"], "count": count, "score": score, "flag": np.bool_(score > 0.5),
                 "features": row[:3]},
                {"count": count, "mean_amount": mean, "last": row[::4]}))
        return out
'''

OUTPUT_SCHEMA = {"type": "object", "required": ["card_id", "count", "score", "flag", "features"],
                 "properties": {"card_id": {"type": "string"}, "count": {"type": "integer", "minimum": 1},
                                "score": {"type": "number"}, "flag": {"type": "boolean"},
                                "features": {"type": "array", "items": {"type": "number"}, "minItems": 3}}}


def _numpy_bundle(tmp_path):
    files = bundlesmith.source_files(
        name="numpy-scorer", version="1.0.0", entrypoint="model:NumpyScorer", model=MODEL,
        input_schema={"type": "object", "required": ["card_id", "amount", "features"]}, output_schema=OUTPUT_SCHEMA,
        lock="# numpy comes from the daemon's environment in this test\n")
    return build(bundlesmith.write_source(tmp_path / "numpy-src", files), tmp_path / "dist")


async def test_a_model_returning_numpy_writes_every_output_exactly_once(kafka_bootstrap, tmp_path):
    names = await make_topics(kafka_bootstrap, "numpy", partitions=2)
    await kafkatools.produce(kafka_bootstrap, names["input"], streams.transactions(TOTAL, seed=13, n_cards=30))
    built = _numpy_bundle(tmp_path)
    registry = Registry(tmp_path / "registry")
    registry.add(built.path)
    registry.promote("numpy-scorer@1.0.0", "active", "numpy outputs test")
    cfg = write_config(tmp_path / "n.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       registry=tmp_path / "registry", group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    d = DaemonProc(cfg, log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, TOTAL), timeout=90,
                                  interval=0.5, what="every input accounted for")
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()

    _, outputs, dead = await streams.verified(kafka_bootstrap, names)  # exactly once, nothing lost
    assert dead == [], [r.headers for r in dead[:3]]
    assert len(outputs) == TOTAL
    for r in outputs:
        v = orjson.loads(r.value)
        assert type(v["count"]) is int and type(v["score"]) is float and type(v["flag"]) is bool, v
        assert len(v["features"]) == 3 and all(type(x) is float for x in v["features"]), v
        assert v["flag"] == (v["score"] > 0.5)
    streams.assert_counts_chain(outputs)  # the numpy state was stored as JSON and carried on
    assert {H.as_dict(r.headers)[H.H_RELEASE_DIGEST] for r in outputs} == {built.digest.encode()}
