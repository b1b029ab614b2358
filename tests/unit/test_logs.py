"""Log output: formats and the repeat filter for chatty libraries."""

from __future__ import annotations

import io
import logging

import orjson

from daemon.logs import JsonFormatter, RepeatFilter


def _logger(name: str, stream: io.StringIO, window: float) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(window=window))
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def _lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_a_flood_from_aiokafka_is_one_line_per_window_and_says_how_many_were_held_back(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("daemon.logs.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    log = _logger("aiokafka.conn", out, window=10.0)
    for i in range(500):  # the same warning with changing arguments, as while a broker is down
        log.warning("Unable connect to node with id %s: %s", 1, f"refused #{i}")
    log.warning("Got error produce response: %s", "NotLeader")  # another kind passes
    clock[0] += 10.5
    log.warning("Unable connect to node with id %s: %s", 1, "refused again")
    lines = _lines(out)
    assert [line["msg"] for line in lines] == ["Unable connect to node with id 1: refused #0",
                                               "Got error produce response: NotLeader",
                                               "Unable connect to node with id 1: refused again"]
    assert "suppressed" not in lines[0] and lines[2]["suppressed"] == 499


def test_failoverds_own_lines_are_never_held_back():
    out = io.StringIO()
    log = _logger("failoverd.engine", out, window=60.0)
    for _ in range(50):
        log.warning("producing a batch failed; rewinding to the last checkpoint")
    assert len(_lines(out)) == 50
