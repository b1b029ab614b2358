"""Pure parts of the engine: batch processing in waves, state store, partitioning, checkpoint policy."""

from __future__ import annotations

import random
import sqlite3

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from daemon.engine.batch import DLQ, NO_STATE, OK, BatchProcessor, IsolationLimitExceeded, IsolationLimits
from daemon.engine.checkpoint import CheckpointPolicy
from daemon.engine.sink import Partitioner
from daemon.engine.state import StateStore, changelog_key, split_changelog_key
from daemon.model import Prediction, RecordError

SCHEMA_IN = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
SCHEMA_OUT = {"type": "object", "required": ["total"], "properties": {"total": {"type": "integer", "minimum": 0}}}
NO_ISOLATION = IsolationLimits(max_records=0)  # a failure fails the whole batch (no splitting)


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
    """With isolation off, the model's own exception fails the batch; with it on (the default), a model
    that fails on every record of a batch still fails it (tests/unit/test_batch_isolation.py)."""
    class Boom:
        def predict(self, batch):
            raise RuntimeError("down")

    with pytest.raises(RuntimeError, match="down"):
        BatchProcessor(Boom(), SCHEMA_IN, SCHEMA_OUT, NO_ISOLATION).process([(b"k", b'{"n": 1}', 0)], [None])
    with pytest.raises(IsolationLimitExceeded, match="RuntimeError: down"):
        BatchProcessor(Boom(), SCHEMA_IN, SCHEMA_OUT).process([(b"k", b'{"n": 1}', 0), (b"j", b'{"n": 1}', 1)],
                                                              [None, None])


def test_state_store_commits_only_after_commit_and_keeps_position(tmp_path):
    s = StateStore(tmp_path / "p.sqlite")
    s.put("m/s1", b"k", b"1")
    assert s.get("m/s1", b"k") == b"1"  # read-your-writes within the interval
    s.discard_pending()
    assert s.get("m/s1", b"k") is None  # an aborted interval leaves nothing
    s.put("m/s1", b"k", b"2")
    s.put("m/s2", b"k", b"other-namespace")
    assert set(s.begin_commit()) == {("m/s1", b"k"), ("m/s2", b"k")}
    s.put("m/s1", b"k", b"3")  # the next interval, written while the checkpoint commits
    assert s.get("m/s1", b"k") == b"3" and s.get("m/s2", b"k") == b"other-namespace"
    s.commit(changelog_position=42)
    s.discard_pending()  # the next interval aborts: the committed one stays
    s.close()
    s = StateStore(tmp_path / "p.sqlite")
    assert s.position() == 42
    assert s.get("m/s1", b"k") == b"2" and s.get("m/s2", b"k") == b"other-namespace"
    s.put("m/s1", b"k", None)
    s.begin_commit()
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


# ---- BatchProcessor.process fast paths (single wave, plain results) vs the general paths ------

class Mixed:
    """Returns every kind of result the protocol allows, chosen by the record's n."""

    class Sub(Prediction):
        __slots__ = ()

    def __init__(self) -> None:
        self.calls = []

    def predict(self, batch):
        self.calls.append([(r.key, r.state) for r in batch])
        out = []
        for r in batch:
            n, total = r.value["n"], (r.state or 0) + r.value["n"]
            if n == 13:
                out.append(RecordError("unlucky"))
            elif n == 14:
                out.append(RecordError())  # no message: the class name is the detail
            elif n == -1:
                out.append(Prediction({"total": -5}, 99))  # invalid output: state not kept
            elif n % 3 == 0:
                out.append(({"total": total}, total))  # plain tuple
            elif n % 3 == 1:
                out.append(self.Sub({"total": total}, total))  # Prediction subclass
            else:
                out.append(Prediction({"total": total}, total))
        return out


def test_single_wave_batch_is_one_predict_call_in_item_order():
    model = Mixed()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    items = [(b"a", b'{"n": 3}', 0), (None, b'{"n": 4}', NO_STATE), (b"b", b'{"n": 5}', 1),
             (None, b'{"n": 7}', NO_STATE), (b"c\xff", b'{"n": 13}', 2), (b"d", b'{"n": 14}', 3),
             (b"e", b'{"n": -1}', 4)]
    results, states = bp.process(items, [orjson.dumps(10), None, None, None, orjson.dumps(1)])
    assert model.calls == [[("a", 10), (None, None), ("b", None), (None, None), ("c\ufffd", None),
                            ("d", None), ("e", 1)]]
    assert results[:4] == [(OK, b'{"total":13}'), (OK, b'{"total":4}'), (OK, b'{"total":5}'), (OK, b'{"total":7}')]
    assert results[4] == (DLQ, "model_error", "unlucky")
    assert results[5] == (DLQ, "model_error", "RecordError")
    assert results[6][:2] == (DLQ, "output_schema") and results[6][2].startswith("total: ")
    assert states == {0: b"13", 1: b"5"}  # keyless records and refused records touch no state


def test_multi_wave_batch_keeps_no_state_in_wave_zero_and_skips_invalid_records():
    model = Mixed()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    items = [(b"a", b'{"n": 1}', 0), (b"a", b"[", 0), (b"a", b'{"n": 2}', 0), (None, b'{"n": 5}', NO_STATE),
             (b"b", b'{"n": 13}', 1), (b"b", b'{"n": 3}', 1), (b"a", b'{"m": 1}', 0), (b"a", b'{"n": 4}', 0),
             (None, b'{"n": 6}', NO_STATE)]
    results, states = bp.process(items, [None, orjson.dumps(100)])
    # a: 1, 2, 4 in waves 0, 1, 2; b: 13 (refused: state unchanged) then 3; keyless all in wave 0
    assert model.calls == [[("a", None), (None, None), ("b", 100), (None, None)], [("a", 1), ("b", 100)], [("a", 3)]]
    assert [r[0] for r in results] == [OK, DLQ, OK, OK, DLQ, OK, DLQ, OK, OK]
    assert results[1][1] == "bad_json" and results[6] == (DLQ, "schema", "(root): \"n\" is a required property")
    assert [orjson.loads(results[i][1])["total"] for i in (0, 2, 3, 5, 7, 8)] == [1, 3, 5, 103, 7, 6]
    assert states == {0: b"7", 1: b"103"}


def test_state_set_to_none_and_only_touched_keys_are_returned():
    class Forget:
        def predict(self, batch):
            return [({"total": 0}, None) for _ in batch]

    bp = BatchProcessor(Forget(), SCHEMA_IN, SCHEMA_OUT)
    results, states = bp.process([(b"a", b'{"n": 1}', 1), (b"a", b'{"n": 1}', 1)], [orjson.dumps(1), orjson.dumps(2)])
    assert results == [(OK, b'{"total":0}')] * 2 and states == {1: None}


def test_wrong_result_count_and_bad_result_type_raise_without_isolation():
    class Short:
        def predict(self, batch):
            return []

    class Bad:
        def predict(self, batch):
            return [{"total": 1} for _ in batch]

    for items in ([(b"a", b'{"n": 1}', 0)], [(b"a", b'{"n": 1}', 0), (b"a", b'{"n": 2}', 0)]):
        with pytest.raises(RuntimeError, match="predict returned 0 results for 1 records"):
            BatchProcessor(Short(), SCHEMA_IN, SCHEMA_OUT, NO_ISOLATION).process(items, [None])
        with pytest.raises(TypeError, match="predict returned dict"):
            BatchProcessor(Bad(), SCHEMA_IN, SCHEMA_OUT, NO_ISOLATION).process(items, [None])


def test_batch_with_no_valid_record_does_not_call_the_model():
    model = Mixed()
    results, states = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT).process([(b"a", b"nope", 0)], [None])
    assert results[0][:2] == (DLQ, "bad_json") and states == {} and model.calls == []


def test_a_batch_can_carry_the_state_the_previous_batch_left():
    """The daemon sends batch N+1 before storing N's states; N+1 names which of N's keys it carries."""
    bp = BatchProcessor(Summer(), SCHEMA_IN, SCHEMA_OUT)
    first = [(b"a", b'{"n": 1}', 0), (b"b", b'{"n": 10}', 1), (b"a", b'{"n": 2}', 0)]
    bp.process(first, [orjson.dumps(100), None])  # a -> 103, b -> 10
    # N+1: skey 0 = b (carried from N's skey 1), skey 1 = c (fresh, stored state 5), skey 2 = a (carried)
    second = [(b"b", b'{"n": 1}', 0), (b"c", b'{"n": 1}', 1), (b"a", b'{"n": 1}', 2)]
    results, states = bp.process(second, [None, orjson.dumps(5), None], [(0, 1), (2, 0)])
    assert [orjson.loads(r[1])["total"] for r in results] == [11, 6, 104]
    assert {k: orjson.loads(v) for k, v in states.items()} == {0: 11, 1: 6, 2: 104}


def test_carrying_after_a_failed_batch_is_refused():
    class FailsOnce(Summer):
        def predict(self, batch):
            if not self.calls:
                self.calls.append("boom")
                raise RuntimeError("boom")
            return super().predict(batch)

    bp = BatchProcessor(FailsOnce(), SCHEMA_IN, SCHEMA_OUT, NO_ISOLATION)
    with pytest.raises(RuntimeError, match="boom"):
        bp.process([(b"a", b'{"n": 1}', 0)], [None])
    with pytest.raises(RuntimeError, match="did not finish"):
        bp.process([(b"a", b'{"n": 1}', 0)], [None], [(0, 0)])


def _commit(store, ns, items, position):
    for k, v in items.items():
        store.put(ns, k, v)
    store.begin_commit()
    store.commit(position)


def test_state_flushes_in_the_background_and_stays_readable_meanwhile(tmp_path, monkeypatch):
    import threading

    from daemon.engine.state import StateStore as Store

    release, entered = threading.Event(), threading.Event()
    real_write = Store._write

    def slow_write(db, changes, position):
        if threading.current_thread() is not threading.main_thread():
            entered.set()
            assert release.wait(10)
        real_write(db, changes, position)

    monkeypatch.setattr(Store, "_write", staticmethod(slow_write))
    s = Store(tmp_path / "p.sqlite")
    _commit(s, "m/1", {b"a": b"1", b"b": b"2"}, 10)  # the first commit flushes at once
    assert entered.wait(10), "the flush did not start in the background"
    assert s._flush_job is not None and not s._flush_job.done()
    assert s.get("m/1", b"a") == b"1" and s.position() == 10  # readable while it is written
    _commit(s, "m/1", {b"a": b"3"}, 12)  # the next interval, committed meanwhile
    assert s.get("m/1", b"a") == b"3" and s.position() == 12
    fresh = Store(tmp_path / "p.sqlite")
    assert fresh.position() == 0 and fresh.get("m/1", b"b") is None  # nothing reached SQLite yet
    fresh.close()
    release.set()
    s.close()  # waits for the background flush, then writes the rest
    s = Store(tmp_path / "p.sqlite")
    assert s.position() == 12 and s.get("m/1", b"a") == b"3" and s.get("m/1", b"b") == b"2"
    s.close()


def test_a_failed_background_flush_keeps_the_values_and_is_raised(tmp_path, monkeypatch):
    import threading

    from daemon.engine.state import StateStore as Store

    real_write = Store._write
    fail = [True]

    def failing_write(db, changes, position):
        if fail[0] and threading.current_thread() is not threading.main_thread():
            raise sqlite3.OperationalError("disk I/O error")
        real_write(db, changes, position)

    monkeypatch.setattr(Store, "_write", staticmethod(failing_write))
    s = Store(tmp_path / "p.sqlite")
    _commit(s, "m/1", {b"a": b"1"}, 5)
    s._flush_job.exception(timeout=10)  # let it fail
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _commit(s, "m/1", {b"b": b"2"}, 6)
    assert s.get("m/1", b"a") == b"1" and s.position() == 6  # back in the overlay, nothing lost
    fail[0] = False
    s.close()
    s = Store(tmp_path / "p.sqlite")
    assert s.position() == 6 and s.get("m/1", b"a") == b"1" and s.get("m/1", b"b") == b"2"
    s.close()
