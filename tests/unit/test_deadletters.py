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
