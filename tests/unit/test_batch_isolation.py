"""Poison-record isolation in BatchProcessor: a bad record costs a dead letter, a bad release the batch.

The models here fail on records marked in their value ("poison": predict raises for any batch that
holds one; "short": predict returns one result too few; "set_output" / "object_state": a value
orjson cannot encode) and count their calls, so each test can say how much the isolation cost.
"""

from __future__ import annotations

import orjson
import pytest

from daemon.engine.batch import (DLQ, NO_STATE, OK, BatchProcessor, IsolationLimitExceeded, IsolationLimits,
                                 ResultCountError)
from daemon.model import Prediction

SCHEMA_IN = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
SCHEMA_OUT = {"type": "object", "required": ["total"], "properties": {"total": {"type": "integer"}}}


class Counter:
    """State per key: {"count": records seen, "sum": running total}; the output is the running total.

    It updates the state object it is given **in place** before it looks for poison, the worst case
    for a retry: a failed attempt has already changed the states of the records before the poison one.
    """

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, batch):
        self.calls.append(len(batch))
        out = []
        for r in batch:
            state = r.state if r.state is not None else {"count": 0, "sum": 0}
            state["count"] += 1  # in place: visible to the caller if it reuses the object
            state["sum"] += r.value["n"]
            if r.value.get("bad") == "set_output":
                out.append(Prediction({"total": {1, 2}}, state))
            elif r.value.get("bad") == "object_state":
                out.append(Prediction({"total": state["sum"]}, {"handle": object()}))
            elif r.value.get("bad") == "int":
                out.append(42)
            else:
                out.append(Prediction({"total": state["sum"]}, state))
        if any(r.value.get("poison") for r in batch):
            raise ValueError("poison in batch: " + ",".join(str(r.key) for r in batch if r.value.get("poison")))
        if any(r.value.get("short") for r in batch):
            return out[:-1]
        return out


def item(key: str | None, n: int, skey: int, **marks) -> tuple:
    return (key.encode() if key is not None else None, orjson.dumps({"n": n, **marks}), skey)


def distinct_batch(size: int, marked: dict[int, dict]) -> list[tuple]:
    """``size`` records of distinct keys k0..; record i carries ``marked[i]`` in its value."""
    return [item(f"k{i}", i, i, **marked.get(i, {})) for i in range(size)]


def state_of(states: dict, skey: int):
    return orjson.loads(states[skey]) if states.get(skey) is not None else None


def test_one_poison_record_in_100_is_one_dead_letter_and_99_outputs():
    model = Counter()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    results, states = bp.process(distinct_batch(100, {37: {"poison": True}}), [None] * 100)
    assert [i for i, r in enumerate(results) if r[0] != OK] == [37]
    assert results[37] == (DLQ, "model_exception", "ValueError: poison in batch: k37")
    assert [orjson.loads(r[1])["total"] for r in results if r[0] == OK] == [i for i in range(100) if i != 37]
    assert 37 not in states and len(states) == 99  # the poison record changed no state
    assert all(state_of(states, i) == {"count": 1, "sum": i} for i in states)  # no double increments
    # 100 -> 50 -> 25 -> 13 -> 6 -> 3 -> 1: six splits, each calls both halves once
    assert bp.splits == 6 and len(model.calls) == 1 + 2 * 6


def test_several_poison_records_are_each_isolated():
    poison = {3: {"poison": True}, 4: {"poison": True}, 50: {"poison": True}, 98: {"short": True},
              99: {"poison": True}}
    bp = BatchProcessor(Counter(), SCHEMA_IN, SCHEMA_OUT)
    results, states = bp.process(distinct_batch(100, poison), [None] * 100)
    assert {i: r[1] for i, r in enumerate(results) if r[0] == DLQ} == {i: "model_exception" for i in poison}
    assert results[98] == (DLQ, "model_exception", "ResultCountError: predict returned 0 results for 1 records")
    assert sorted(states) == [i for i in range(100) if i not in poison]


def test_a_model_that_fails_on_everything_fails_the_batch_after_few_calls():
    class Broken:
        calls = 0

        def predict(self, batch):
            Broken.calls += 1
            raise RuntimeError("model is broken")

    bp = BatchProcessor(Broken(), SCHEMA_IN, SCHEMA_OUT)
    with pytest.raises(IsolationLimitExceeded) as info:
        bp.process(distinct_batch(1000, {}), [None] * 1000)
    message = str(info.value)
    assert "11 of 1000 records failed" in message and "failover.isolate_max_records = 10" in message
    assert "first failure: RuntimeError: model is broken" in message
    assert Broken.calls <= 40  # not 1000: splitting stops at the eleventh record that fails alone
    with pytest.raises(RuntimeError, match="did not finish"):  # a failed batch leaves nothing to carry
        bp.process(distinct_batch(1, {}), [None], [(0, 0)])


def test_the_limits_are_a_count_and_a_share_of_the_batch():
    ten = {i: {"poison": True} for i in range(0, 1000, 100)}
    results, _ = BatchProcessor(Counter(), SCHEMA_IN, SCHEMA_OUT).process(distinct_batch(1000, ten), [None] * 1000)
    assert sum(r[0] == DLQ for r in results) == 10  # exactly at isolate_max_records: isolated
    with pytest.raises(IsolationLimitExceeded):
        BatchProcessor(Counter(), SCHEMA_IN, SCHEMA_OUT).process(distinct_batch(1000, {**ten, 1: {"poison": True}}),
                                                                 [None] * 1000)
    # 20 records, 10%: two may fail; a third fails the batch. One is always allowed, even alone.
    two = {5: {"poison": True}, 6: {"poison": True}}
    results, _ = BatchProcessor(Counter(), SCHEMA_IN, SCHEMA_OUT).process(distinct_batch(20, two), [None] * 20)
    assert sum(r[0] == DLQ for r in results) == 2
    with pytest.raises(IsolationLimitExceeded):
        BatchProcessor(Counter(), SCHEMA_IN, SCHEMA_OUT).process(distinct_batch(20, {**two, 7: {"poison": True}}),
                                                                 [None] * 20)
    results, _ = BatchProcessor(Counter(), SCHEMA_IN, SCHEMA_OUT).process(distinct_batch(1, {0: {"poison": True}}),
                                                                          [None])
    assert results == [(DLQ, "model_exception", "ValueError: poison in batch: k0")]
    assert IsolationLimits(10, 0.1).allowed(3) == 1 and IsolationLimits(0, 0.1).allowed(1000) == 0


def test_isolation_off_fails_the_batch_with_the_models_own_error():
    model = Counter()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT, IsolationLimits(max_records=0))
    with pytest.raises(ValueError, match="poison in batch: k1"):
        bp.process(distinct_batch(10, {1: {"poison": True}}), [None] * 10)
    assert model.calls == [10]  # no splitting
    with pytest.raises(ResultCountError):
        bp.process(distinct_batch(10, {1: {"short": True}}), [None] * 10)


def test_unencodable_output_or_state_is_that_records_dead_letter_without_a_retry():
    model = Counter()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    items = distinct_batch(30, {2: {"bad": "set_output"}, 5: {"bad": "object_state"}, 7: {"bad": "int"}})
    results, states = bp.process(items, [orjson.dumps({"count": 1, "sum": 100})] * 30)
    assert model.calls == [30]  # each result is encoded on its own: no record needs a second call
    assert results[2][:2] == results[5][:2] == results[7][:2] == (DLQ, "model_exception")
    assert results[2][2].startswith("output is not JSON data: ") and "set" in results[2][2]
    assert results[5][2].startswith("new state is not JSON data: ") and "object" in results[5][2]
    assert results[7][2].startswith("predict returned int")
    assert sorted(states) == [i for i in range(30) if i not in (2, 5, 7)]
    assert all(orjson.loads(results[i][1]) == {"total": 100 + i} for i in states)
    # the dead-lettered keys keep their state, though the model had mutated the object in place
    nxt, states2 = bp.process([item("k2", 1, 0), item("k5", 1, 1)], [None, None], [(0, 2), (1, 5)])
    assert [orjson.loads(r[1])["total"] for r in nxt] == [101, 101]
    assert state_of(states2, 0) == state_of(states2, 1) == {"count": 2, "sum": 101}


def test_repeated_keys_keep_an_exact_state_chain_when_a_wave_0_or_wave_1_record_fails():
    """Key a has a record in waves 0, 1, 2, key b in waves 0 and 1; the poison is a's wave-0 record
    in one batch and b's wave-1 record in another. Every other record sees exactly the state the
    records before it left, as if the poison record had never been there."""
    model = Counter()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    start = [orjson.dumps({"count": 1, "sum": 1000}), None]
    items = [item("a", 1, 0, poison=True), item("b", 10, 1), item(None, 7, NO_STATE), item("a", 2, 0),
             item("b", 20, 1), item("a", 3, 0)]
    results, states = bp.process(items, start)
    assert results[0] == (DLQ, "model_exception", "ValueError: poison in batch: a")
    assert [orjson.loads(r[1])["total"] for r in results[1:]] == [10, 7, 1002, 30, 1005]
    assert state_of(states, 0) == {"count": 3, "sum": 1005} and state_of(states, 1) == {"count": 2, "sum": 30}

    items = [item("a", 1, 0), item("b", 10, 1), item("a", 2, 0), item("b", 20, 1, poison=True), item("a", 3, 0),
             item("b", 30, 1)]
    results, states = bp.process(items, start)
    assert results[3] == (DLQ, "model_exception", "ValueError: poison in batch: b")
    assert [orjson.loads(results[i][1])["total"] for i in (0, 1, 2, 4, 5)] == [1001, 10, 1003, 1006, 40]
    assert state_of(states, 0) == {"count": 4, "sum": 1006} and state_of(states, 1) == {"count": 2, "sum": 40}


def test_in_place_mutation_by_a_failed_attempt_leaves_no_trace_across_batches():
    """The first attempt mutates every state of the wave, then raises; the retries get fresh copies,
    decoded from the bytes each state started from -- also for a state carried from the previous batch."""
    model = Counter()
    bp = BatchProcessor(model, SCHEMA_IN, SCHEMA_OUT)
    first, states1 = bp.process([item("a", 5, 0), item("b", 7, 1)], [None, orjson.dumps({"count": 9, "sum": 90})])
    assert state_of(states1, 0) == {"count": 1, "sum": 5} and state_of(states1, 1) == {"count": 10, "sum": 97}
    # next batch: a and b carried (their states are objects the first batch left), c fresh, d poison
    items = [item("b", 1, 0), item("c", 1, 1), item("a", 1, 2), item("d", 1, 3, poison=True)]
    results, states2 = bp.process(items, [None, orjson.dumps({"count": 1, "sum": 1}), None, None],
                                  [(0, 1), (2, 0)])
    assert [orjson.loads(r[1])["total"] for r in results[:3]] == [98, 2, 6]
    assert state_of(states2, 0) == {"count": 11, "sum": 98} and state_of(states2, 1) == {"count": 2, "sum": 2}
    assert state_of(states2, 2) == {"count": 2, "sum": 6} and 3 not in states2
    # and the batch after that sees the same (carried objects were replaced by the retries' results)
    results, _ = bp.process([item("a", 1, 0), item("b", 1, 1)], [None, None], [(0, 2), (1, 0)])
    assert [orjson.loads(r[1])["total"] for r in results] == [7, 99]


def test_the_values_given_to_a_retry_are_fresh_too():
    class Scribbler:
        """Overwrites every value it sees, then raises for the poison record."""

        def predict(self, batch):
            seen = [r.value["n"] for r in batch]
            for r in batch:
                r.value["n"] = -1
            if any(r.key == "p" for r in batch):
                raise ValueError("poison")
            return [({"total": n}, None) for n in seen]

    results, states = BatchProcessor(Scribbler(), SCHEMA_IN, SCHEMA_OUT).process(
        [item("x", 1, 0), item("p", 2, 1), item("y", 3, 2), item("z", 4, 3)], [None] * 4)
    assert [r[1] for r in results] == [b'{"total":1}', "model_exception", b'{"total":3}', b'{"total":4}']
