"""Parsing dead letters as the engine writes them, and selecting them."""

from __future__ import annotations

import pytest

from daemon.deadletters import DeadLetter, Selection, parse
from daemon.engine import headers as H
from daemon.errors import ConfigError


def _engine_headers(original, reason: str, truncated: bool = False):
    """The headers the engine writes on a dead letter (the same function builds them there)."""
    provenance = (H.release_headers({"name": "fraud", "version": "1.0.0", "digest": "d" * 64})
                  + H.source_headers(b"payments", b"3", 1234))
    return H.dead_letter_headers(original, reason, "amount: 'ten' is not a number", provenance, truncated)


def test_the_headers_failoverd_added_are_split_from_the_originals():
    original = [("trace-id", b"abc"), ("fd.source.topic", b"an upstream header of the same name")]
    d = parse(0, 7, 1_700_000_000_000, b"k", b"v", _engine_headers(original, "schema"))
    assert d.original_headers == original
    assert (d.reason, d.source_topic, d.source_partition, d.source_offset) == ("schema", "payments", 3, 1234)
    assert d.release == "fraud@1.0.0" and not d.truncated and d.detail.startswith("amount")
    assert parse(0, 8, 0, b"k", b"v", _engine_headers([], "oversized", truncated=True)).truncated


def test_selection_by_reason_source_and_time():
    d = parse(0, 1, 5_000, b"k", b"v", _engine_headers([], "model_error"))
    assert Selection().matches(d)
    assert Selection(reasons=frozenset({"model_error"}), source_topic="payments", since_ms=5_000,
                     until_ms=5_001).matches(d)
    assert not Selection(reasons=frozenset({"schema"})).matches(d)
    assert not Selection(source_topic="other").matches(d)
    assert not Selection(since_ms=5_001).matches(d)
    assert not Selection(until_ms=5_000).matches(d)


def test_an_unknown_reason_names_the_known_ones():
    with pytest.raises(ConfigError, match="bad_json, schema, oversized, model_error, output_schema"):
        Selection(reasons=frozenset({"nope"}))


def test_a_record_without_failoverd_headers_is_still_readable():
    d = parse(2, 9, 0, None, b"x", [("h", b"1")])
    assert isinstance(d, DeadLetter) and d.reason == "unknown" and d.original_headers == [("h", b"1")]
    assert d.source_topic is None and d.source_partition is None


def test_a_replay_marker_is_not_a_dead_letter_and_names_the_one_it_marks():
    from daemon.deadletters import H_REPLAY_OF, marker, marker_of

    d = parse(1, 42, 0, b"k", b"v", _engine_headers([], "schema"))
    key, value, headers = marker(d, "payments:3", forced=False)
    assert marker_of(headers) == (1, 42) and headers == [(H_REPLAY_OF, b"1/42")]
    assert marker_of(_engine_headers([], "schema")) is None
    # an input that carried the marker header among its own is still a dead letter
    assert marker_of(_engine_headers([(H_REPLAY_OF, b"0/1")], "schema")) is None


def test_replay_plan_skips_replayed_ones_unless_forced_and_limit_moves_on():
    import dataclasses

    from daemon.deadletters import plan

    letters = [parse(0, i, i, b"k", b"v", _engine_headers([], "schema")) for i in range(5)]
    letters[0] = dataclasses.replace(letters[0], replays=({"to": "payments:3"},))
    letters[1] = dataclasses.replace(letters[1], truncated=True)
    todo, report = plan(letters, to_topic=None, force=False)
    assert [d.offset for d in todo] == [2, 3, 4] and [d.offset for d in report.already] == [0]
    assert report.skipped == {"truncated when dead-lettered (the original value is gone)": 1}
    todo, _ = plan(letters, to_topic=None, force=True)
    assert [d.offset for d in todo] == [0, 2, 3, 4]
    todo, _ = plan(letters, to_topic=None, force=False, limit=2)
    assert [d.offset for d in todo] == [2]  # the truncated one counts against the limit, the replayed one does not
