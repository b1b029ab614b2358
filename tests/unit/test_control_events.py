"""The one validation of control-topic events (daemon/control.py), shared by the watcher, the
reader behind `release sync` and Registry.apply_events."""

from __future__ import annotations

import orjson
import pytest

from daemon import control
from daemon.control import InvalidEvent, check_event, decode

RELEASE = {"type": "release", "id": "r1", "time": "2026-11-27T09:00:00.000000Z", "epoch": 1.5, "channel": "active",
           "name": "fraud-scorer", "version": "2.0.0", "digest": "d" * 64, "who": "ops@host", "why": "go",
           "kind": "promote"}


def reason_of(value) -> str:
    with pytest.raises(InvalidEvent) as info:
        check_event(value)
    return info.value.reason


def test_events_failoverd_publishes_are_valid():
    assert check_event(RELEASE) is RELEASE
    assert check_event(dict(RELEASE, kind="rollback", rescore=True))
    assert check_event({"type": "failover", "id": "f1", "from": {}, "to": {}, "time": 1.0})
    assert check_event({"type": "failover_request", "id": "q1", "reason": "drill"})


@pytest.mark.parametrize("value, reason", [
    ([1, 2], "not_object"),
    ("release", "not_object"),
    ({"id": "x"}, "unknown_type"),
    ({"type": "self-destruct", "id": "x"}, "unknown_type"),
    ({k: v for k, v in RELEASE.items() if k != "digest"}, "missing_fields"),
    ({"type": "release", "id": "x"}, "missing_fields"),
    ({"type": "failover"}, "missing_fields"),
    (dict(RELEASE, channel="canary"), "bad_field"),
    (dict(RELEASE, kind="yolo"), "bad_field"),
    (dict(RELEASE, epoch="yesterday"), "bad_field"),
    (dict(RELEASE, epoch=True), "bad_field"),
    (dict(RELEASE, digest=None), "bad_field"),
    (dict(RELEASE, name=""), "bad_field"),
    (dict(RELEASE, rescore="yes"), "bad_field"),
    ({"type": "failover_request", "id": 7}, "bad_field"),
    ({"type": "failover_request", "id": "q", "reason": ["x"]}, "bad_field"),
])
def test_what_cannot_be_acted_on_is_refused_with_a_reason(value, reason):
    assert reason_of(value) == reason
    assert reason in control.SKIP_REASONS


def test_decode_refuses_what_is_not_json():
    with pytest.raises(InvalidEvent) as info:
        decode(b"\x00garbage")
    assert info.value.reason == "not_json"
    assert decode(orjson.dumps(RELEASE)) == RELEASE


def test_the_message_names_the_field():
    with pytest.raises(InvalidEvent, match="release event lacks digest"):
        check_event({k: v for k, v in RELEASE.items() if k != "digest"})
    with pytest.raises(InvalidEvent, match="channel='canary'"):
        check_event(dict(RELEASE, channel="canary"))


def test_publish_refuses_an_event_readers_would_skip():
    import asyncio

    with pytest.raises(ValueError, match="readers would skip"):
        asyncio.run(control.publish("127.0.0.1:1", "ctl", {"type": "release", "channel": "active"}, timeout=1))


def test_the_release_log_skips_bad_events_instead_of_failing(tmp_path):
    from daemon.registry import Registry

    registry = Registry(tmp_path / "registry")
    assert registry.apply_events([{"type": "release", "id": "x"}, [1], RELEASE]) != []
    assert [r.id for r in registry.history()] == ["r1"]


def test_the_channels_and_kinds_match_the_registry():
    from daemon import registry

    assert control._CHANNELS == registry.CHANNELS and control._KINDS == registry.KINDS
