"""How record values are decoded and outputs encoded: one small module per format.

``[inputs] format`` and ``[output] format`` (docs/configuration.md) choose one at start; the
batch code (:mod:`daemon.engine.batch`, in the model worker) runs it. Every format is an object
with:

- ``decode(value: bytes) -> value``; raises ``decode_error`` (an exception class) for a value
  that is not one, whose ``reason`` attribute (default ``bad_json``) and text become the dead
  letter's reason and detail;
- ``encode(value) -> bytes``; raises :class:`InvalidOutput` for a value the output schema refuses
  (dead letter ``output_schema``) and ``TypeError``/``ValueError`` for one that is not data at all;
- ``validator``: ``is_valid(value)`` and ``iter_errors(value)`` for the bundle's schema of that side;
- ``prepare(values)``: called once per batch before anything is decoded, outside the per-record
  loop; a format that needs the registry resolves what the batch needs there and *waits* while
  the registry is unavailable (:data:`WAITING`), so that a registry outage never turns a good
  record into a dead letter.

``json`` (:mod:`daemon.formats.json`) is today's behaviour and the fast path: orjson and the
compiled JSON Schema validator, nothing per record beyond them. ``avro``
(:mod:`daemon.formats.avro`): the Confluent wire format with a Schema Registry. Adding Protobuf
is one more module and one more entry in :func:`make`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

FORMATS = ("json", "avro")


class Undecodable(ValueError):
    """A value this format cannot read: ``reason`` is its dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class InvalidOutput(Exception):
    """An output the output schema refuses (dead letter ``output_schema``; not a TypeError/ValueError,
    which mean "not data at all" to the batch code)."""


class _Waiting:
    """Whether the batch in progress is waiting on the schema registry, shared with whoever must
    know (the worker's keep-alive thread; the in-process worker's predict timeout).

    ``since`` is the monotonic time the current wait began (0: not waiting); ``detail`` is why
    (empty while a lookup is merely in progress, the registry's error while it is unavailable)."""

    def __init__(self) -> None:
        self.since = 0.0
        self.detail = ""
        self.beat = 0.0
        """Monotonic time of the last sign of life of a waiting batch (the in-process worker's clock)."""
        self.lock = threading.Lock()

    def begin(self, detail: str = "") -> None:
        now = time.monotonic()
        with self.lock:
            if not self.since:
                self.since = now
            self.detail = detail
            self.beat = now

    def end(self) -> None:
        with self.lock:
            self.since = 0.0
            self.detail = ""
            self.beat = time.monotonic()


WAITING = _Waiting()


def wait_with_backoff(attempt: Callable[[], Any], unavailable: type[BaseException], *,
                      first: float = 0.2, cap: float = 5.0) -> Any:
    """``attempt()`` until it stops raising ``unavailable``, sleeping 0.2 s, 0.4 s, ... up to ``cap``
    between tries; :data:`WAITING` says so meanwhile. Never gives up: records wait, they do not
    dead-letter (the daemon sees keep-alives, so its predict timeout does not fire)."""
    WAITING.begin()
    delay = first
    try:
        while True:
            try:
                return attempt()
            except unavailable as exc:
                WAITING.begin(str(exc)[:300] or type(exc).__name__)
                time.sleep(delay)
                delay = min(cap, delay * 2)
    finally:
        WAITING.end()


def make(kind: str, side: str, schema: dict, schema_kind: str, spec: dict | None = None):
    """The format ``kind`` for ``side`` (``input`` or ``output``) with the bundle's schema of that
    side (``schema_kind``: ``json`` for a JSON Schema, ``avro`` for an ``.avsc``); ``spec``: the
    ``formats`` part of the worker configuration (registry, output topic, subject policy)."""
    if kind == "json":
        from daemon.formats.json import JsonFormat

        return JsonFormat(schema, schema_kind)
    if kind == "avro":
        from daemon.formats.avro import AvroFormat

        return AvroFormat(side, schema, schema_kind, spec or {})
    raise ValueError(f"unknown format {kind!r}; one of {', '.join(FORMATS)}")


def needs_registry(spec: dict) -> bool:
    """Whether workers with this spec talk to a schema registry (and may send keep-alives)."""
    return "avro" in (spec.get("input"), spec.get("output"))


def spec_of(settings) -> dict:
    """The worker's format spec from the daemon's settings: ``{}`` for JSON both ways (the default,
    nothing to pass), else the formats, the output topic's value subject, the subject policy and
    the registry's address, credentials and timeout."""
    inputs, output = settings.inputs, settings.output
    spec = {"input": getattr(inputs, "format", "json") or "json", "output": getattr(output, "format", "json") or "json"}
    if not needs_registry(spec):
        return {} if spec == {"input": "json", "output": "json"} else spec
    sr = getattr(settings, "schema_registry", None)
    spec["registry"] = {"url": getattr(sr, "url", "") or "", "username": getattr(sr, "username", "") or "",
                        "password": getattr(sr, "password", "") or "",
                        "timeout_s": getattr(sr, "timeout_ms", 5000) / 1000}
    spec["output_subject"] = f"{output.topic}-value"
    spec["subject_policy"] = getattr(sr, "subject_policy", "register") or "register"
    return spec
