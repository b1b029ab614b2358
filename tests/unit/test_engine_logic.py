"""Pure parts of the engine: batch processing in waves, state store, partitioning, checkpoint policy."""

from __future__ import annotations

import random

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from daemon.engine.batch import DLQ, NO_STATE, OK, BatchProcessor
from daemon.engine.checkpoint import CheckpointPolicy
from daemon.engine.sink import Partitioner
from daemon.engine.state import StateStore, changelog_key, split_changelog_key
from daemon.model import Prediction, RecordError

SCHEMA_IN = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
SCHEMA_OUT = {"type": "object", "required": ["total"], "properties": {"total": {"type": "integer", "minimum": 0}}}


class Summer:
    """Running total per key; refuses n == 13; emits an invalid output for n == -1."""

    def __init__(self) -> None:
        self.calls = []

    def predict(self, batch):
        self.calls.append([r.key for r in batch])
        out = []
        for r in batch:
            if r.value["n"] == 13:
                out.append(RecordError("unlucky"))
                continue
            total = (r.state or 0) + r.value["n"]
            out.append(Prediction({"total": total}, total) if r.value["n"] != -1 else ({"total": "x"}, None))
        return out


def test_records_of_one_key_see_each_others_state_in_waves():
    model = Summer()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    items = [(b"a", b'{"n": 1}', 0), (b"b", b'{"n": 10}', 1), (b"a", b'{"n": 2}', 0), (b"a", b'{"n": 3}', 0)]
    results, states = bp.process(items, [orjson.dumps(100), None])
    assert [orjson.loads(r[1])["total"] for r in results] == [101, 10, 103, 106]
    assert {k: orjson.loads(v) for k, v in states.items()} == {0: 106, 1: 10}
    assert model.calls == [["a", "b"], ["a"], ["a"]]  # a key at most once per predict call


def test_each_kind_of_bad_record_is_a_dead_letter_and_the_rest_goes_on():
    bp = BatchProcessor(Summer(), SCHEMA_IN, SCHEMA_OUT)
    items = [(b"a", b"{nope", 0), (b"a", b'{"n": "x"}', 0), (b"a", b'{"n": 13}', 0), (b"a", b'{"n": -1}', 0),
             (None, b'{"n": 5}', NO_STATE)]
    results, states = bp.process(items, [None])
    assert [r[0] for r in results] == [DLQ, DLQ, DLQ, DLQ, OK]
    assert [r[1] for r in results[:4]] == ["bad_json", "schema", "model_error", "output_schema"]
    assert "n" in results[1][2] and results[2][2] == "unlucky"
    assert states == {}  # nothing valid touched key a's state


def test_whole_batch_exception_propagates():
    class Boom:
        def predict(self, batch):
            raise RuntimeError("down")

    with pytest.raises(RuntimeError):
        BatchProcessor(Boom(), SCHEMA_IN, SCHEMA_OUT).process([(b"k", b'{"n": 1}', 0)], [None])


def test_state_store_commits_only_after_commit_and_keeps_position(tmp_path):
    s = StateStore(tmp_path / "p.sqlite")
    s.put("m/s1", b"k", b"1")
    assert s.get("m/s1", b"k") == b"1"  # read-your-writes within the interval
    s.discard_pending()
    assert s.get("m/s1", b"k") is None  # an aborted interval leaves nothing
    s.put("m/s1", b"k", b"2")
    s.put("m/s2", b"k", b"other-namespace")
    s.commit(changelog_position=42)
    s.close()
    s = StateStore(tmp_path / "p.sqlite")
    assert s.position() == 42
    assert s.get("m/s1", b"k") == b"2" and s.get("m/s2", b"k") == b"other-namespace"
    s.put("m/s1", b"k", None)
    s.commit(None)
    assert s.get("m/s1", b"k") is None and s.position() == 42


def test_restore_applies_only_its_topic(tmp_path):
    s = StateStore(tmp_path / "p.sqlite")
    n = s.apply_changelog("in", [(changelog_key("in", "m/s1", b"a"), b"1"), (changelog_key("other", "m/s1", b"b"), b"2"),
                                 (changelog_key("in", "m/s1", b"c"), None)], position=7)
    assert n == 2 and s.items("m/s1") == {b"a": b"1"} and s.position() == 7
    assert split_changelog_key(changelog_key("t", "ns", b"k\x00x")) == ("t", "ns", b"k\x00x")


def test_partitioner_matches_kafkas_default():
    rng = random.Random(1)
    part = Partitioner(12)
    for _ in range(500):
        key = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        assert part(key) == DefaultPartitioner()(key, list(range(12)), list(range(12)))


def test_checkpoint_policy_by_count_and_time():
    p = CheckpointPolicy(interval_ms=100, interval_records=10)
    assert not p.due()
    p.add(10)
    assert p.due()
    p.reset()
    p.add(1)
    assert not p.due(now=p.last + 0.05) and p.due(now=p.last + 0.11)
