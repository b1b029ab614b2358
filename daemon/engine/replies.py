"""What a model worker may answer, checked against what it was asked (the daemon's side of the boundary).

A worker runs release code, so each reply is checked before anything of it is used: the kind is one
the request allows, a batch has exactly one well-formed result per item -- ``(OK, bytes)`` or
``(DLQ, reason, detail)`` with a reason the worker may give and a str detail -- and its new states
map state keys of the request (``0 <= skey < len(states)``) to bytes or None. Anything else raises
:class:`BadReply`, which the worker turns into a release failure with reason ``protocol``.

Frames arrive decoded by :mod:`daemon.engine.framing` (arrays as tuples), so a result is checked
with a few type tests per record; the check costs about as much as decoding the frame.
"""

from __future__ import annotations

from typing import Any

from daemon.engine.batch import DLQ, OK

WORKER_DLQ_REASONS = frozenset(("bad_json", "schema", "model_error", "output_schema", "model_exception",
                                "output_oversized", "bad_avro", "unknown_schema_id"))
"""The dead-letter reasons BatchProcessor gives (the others are the engine's own)."""

ERROR_KINDS = frozenset(("exception", "oom", "protocol"))
"""``("error", kind, detail)`` for a batch or health request: predict raised for the whole batch,
the worker ran out of memory (it exits after saying so), or it did not understand the request."""


class BadReply(ValueError):
    """A reply that is not what the request allows."""


def _fail(what: str) -> BadReply:
    return BadReply(what[:500])


def _shape(reply: Any, kinds: tuple[str, ...]) -> str:
    if type(reply) is not tuple or not reply or type(reply[0]) is not str or reply[0] not in kinds:
        head = reply[0] if type(reply) is tuple and reply else reply
        raise _fail(f"expected a reply of kind {' or '.join(kinds)}, got {_show(head)}")
    kind: str = reply[0]
    return kind


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def check_error(reply: Any) -> tuple[str, str]:
    """``("error", kind, detail)`` -> (kind, detail)."""
    if len(reply) != 3 or type(reply[1]) is not str or reply[1] not in ERROR_KINDS or type(reply[2]) is not str:
        raise _fail(f"malformed error reply: {_show(reply)}")
    return reply[1], reply[2]


def check_ready(reply: Any) -> tuple[str, Any]:
    """The first reply of a worker: ``("ready", info)`` -> ("ready", info dict), or
    ``("error", "load", detail)`` -> ("error", detail)."""
    kind = _shape(reply, ("ready", "error"))
    if kind == "error":
        if len(reply) != 3 or reply[1] != "load" or type(reply[2]) is not str:
            raise _fail(f"malformed load error: {_show(reply)}")
        return "error", reply[2]
    info = reply[1] if len(reply) == 2 else None
    if type(info) is not dict:
        raise _fail(f"malformed ready reply: {_show(reply)}")
    for key, kind_ in (("name", str), ("version", str), ("digest", str), ("state_schema_version", int),
                       ("pid", int)):
        if type(info.get(key)) is not kind_:
            raise _fail(f"ready reply: {key} is not {kind_.__name__}: {_show(info.get(key))}")
    if any(type(k) is not str for k in info):
        raise _fail("ready reply: a key of the release info is not a string")
    return "ready", info


def check_batch(reply: Any, items: int, states: int) -> tuple[str, Any, Any]:
    """A batch reply -> ("result", results, new_states) or ("error", kind, detail)."""
    kind = _shape(reply, ("result", "error"))
    if kind == "error":
        return ("error", *check_error(reply))
    if len(reply) != 3:
        raise _fail(f"a result reply has {len(reply)} parts, expected 3")
    results, new_states = reply[1], reply[2]
    if type(results) is not tuple or len(results) != items:
        got = f"{len(results)} results" if type(results) is tuple else _show(results)
        raise _fail(f"expected {items} results (one per record), got {got}")
    reasons = WORKER_DLQ_REASONS
    for n, r in enumerate(results):
        if type(r) is tuple:
            size = len(r)
            if size == 2:
                if type(r[0]) is int and r[0] == OK and type(r[1]) is bytes:
                    continue
            elif size == 3 and type(r[0]) is int and r[0] == DLQ and type(r[1]) is str and r[1] in reasons \
                    and type(r[2]) is str:
                continue
        raise _fail(f"result {n} is malformed: {_show(r)}")
    if type(new_states) is not dict:
        raise _fail(f"new states are not a map: {_show(new_states)}")
    for skey, st in new_states.items():
        if type(skey) is not int or not 0 <= skey < states:
            raise _fail(f"new state for key {_show(skey)}, not one of the {states} state keys sent")
        if st is not None and type(st) is not bytes:
            raise _fail(f"new state of key {skey} is neither bytes nor None: {_show(st)}")
    return "result", results, new_states


def check_health(reply: Any) -> tuple[str, Any]:
    """``("health", bool)`` -> ("health", bool), or ("error", kind) for an error reply."""
    kind = _shape(reply, ("health", "error"))
    if kind == "error":
        return "error", check_error(reply)[0]
    if len(reply) != 2 or type(reply[1]) is not bool:
        raise _fail(f"malformed health reply: {_show(reply)}")
    return "health", reply[1]
