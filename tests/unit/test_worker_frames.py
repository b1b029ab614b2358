"""The data-only frames between daemon and worker, and the check of every reply (issue 13, point 3).

Nothing a worker sends is executed (msgpack builds data, never objects), a frame's size is checked
before its body is read, and a reply that is not what the request allows is refused.
"""

from __future__ import annotations

import asyncio
import io
import pickle
import struct

import msgpack
import pytest

from daemon.engine import framing, replies
from daemon.engine.batch import DLQ, OK
from daemon.engine.headers import DLQ_REASONS
from daemon.engine.worker import ENV_ALLOWED, worker_environment


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def roundtrip(message):
    return framing.read_blocking(io.BytesIO(framing.encode(message)))


async def read_async(data: bytes, max_frame: int = framing.DEFAULT_MAX_FRAME):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await framing.read_async(reader, max_frame)


# ---- frames -----------------------------------------------------------------------------------
def test_a_batch_and_its_reply_cross_as_data():
    items = [(b"k1", b'{"a": 1}', 0), (None, b"{}", -1)]
    request = ("batch", items, [b'{"n": 1}', None], [(0, 3)])
    assert roundtrip(request) == ("batch", tuple(tuple(i) for i in items), (b'{"n": 1}', None), ((0, 3),))
    reply = ("result", [(OK, b"{}"), (DLQ, "schema", "bad")], {0: b"{}", 1: None})
    assert roundtrip(reply) == ("result", ((OK, b"{}"), (DLQ, "schema", "bad")), {0: b"{}", 1: None})


def test_a_pickle_frame_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    body = pickle.dumps(("error", "exception", Evil()))
    with pytest.raises(framing.FrameError):
        framing.decode(body)  # pickle opcodes are not one msgpack value
    assert not marker.exists()


@pytest.mark.parametrize("body", [b"garbage!" * 64, b"\xc1", b"\x92\x01", msgpack.packb(1) + b"extra",
                                  msgpack.packb([[[[1]]]] * 3)[:-1], b"\xa3\xff\xfe\xfd"])
def test_undecodable_frames_are_frame_errors(body):
    with pytest.raises(framing.FrameError):
        framing.read_blocking(io.BytesIO(frame(body)))


def test_deeply_nested_frames_are_frame_errors_not_crashes():
    body = b"\x91" * 100_000 + b"\xc0"  # an array in an array in ... (msgpack's stack limit)
    with pytest.raises(framing.FrameError):
        framing.decode(body)


async def test_an_oversized_frame_is_refused_before_its_body_is_read():
    head = struct.pack(">I", 1 << 30)  # announces 1 GiB, sends nothing more: the body is never awaited
    reader = asyncio.StreamReader()
    reader.feed_data(head)  # no EOF: reading the body would wait forever
    with pytest.raises(framing.FrameError, match="exceeds the 1048576-byte limit"):
        await asyncio.wait_for(framing.read_async(reader, 1 << 20), 2)
    assert await read_async(framing.encode(("health", True)), 1 << 20) == ("health", True)


def test_ext_types_decode_to_inert_values_that_no_check_accepts():
    body = msgpack.packb(("result", (msgpack.ExtType(5, b"x"),), {}))
    reply = framing.decode(body)
    with pytest.raises(replies.BadReply, match="result 0 is malformed"):
        replies.check_batch(reply, 1, 0)


# ---- replies ----------------------------------------------------------------------------------
GOOD = ("result", ((OK, b"{}"), (DLQ, "model_exception", "ValueError: x")), {0: b'{"n": 2}', 1: None})


def test_a_well_formed_batch_reply_passes():
    assert replies.check_batch(GOOD, 2, 2) == GOOD
    assert replies.check_batch(("error", "exception", "boom"), 2, 2) == ("error", "exception", "boom")
    assert replies.check_batch(("error", "oom", "MemoryError"), 2, 2) == ("error", "oom", "MemoryError")


@pytest.mark.parametrize("reply, match", [
    (("result", ((OK, b"{}"),), {}), "expected 2 results"),
    (("result", ((OK, b"{}"),) * 3, {}), "expected 2 results"),
    (("result", [], {}), "expected 2 results"),
    (("result", ((OK, "str, not bytes"), (OK, b"{}")), {}), "result 0 is malformed"),
    (("result", ((OK, b"{}"), (DLQ, "no_such_reason", "x")), {}), "result 1 is malformed"),
    (("result", ((OK, b"{}"), (DLQ, "schema", b"bytes detail")), {}), "result 1 is malformed"),
    (("result", ((OK, b"{}"), (DLQ, "schema")), {}), "result 1 is malformed"),
    (("result", ((True, b"{}"), (OK, b"{}")), {}), "result 0 is malformed"),
    (("result", ((2, b"{}"), (OK, b"{}")), {}), "result 0 is malformed"),
    (("result", (b"{}", (OK, b"{}")), {}), "result 0 is malformed"),
    (("result", ((OK, b"{}"), (OK, b"{}")), {2: b"{}"}), "not one of the 2 state keys"),
    (("result", ((OK, b"{}"), (OK, b"{}")), {-1: b"{}"}), "not one of the 2 state keys"),
    (("result", ((OK, b"{}"), (OK, b"{}")), {"0": b"{}"}), "not one of the 2 state keys"),
    (("result", ((OK, b"{}"), (OK, b"{}")), {0: "{}"}), "neither bytes nor None"),
    (("result", ((OK, b"{}"), (OK, b"{}")), ((0, b"{}"),)), "not a map"),
    (("result", ((OK, b"{}"), (OK, b"{}"))), "has 2 parts"),
    (("ready", {}), "expected a reply of kind result or error"),
    (("health", True), "expected a reply of kind result or error"),
    (("error", "load", "x"), "malformed error reply"),
    (("error", "exception", 3), "malformed error reply"),
    ((), "expected a reply of kind"),
    ("result", "expected a reply of kind"),
    (None, "expected a reply of kind"),
    ({"kind": "result"}, "expected a reply of kind"),
])
def test_malformed_batch_replies_are_refused(reply, match):
    with pytest.raises(replies.BadReply, match=match):
        replies.check_batch(reply, 2, 2)


def test_a_reply_decoded_from_the_wire_is_checked_like_one_built_here():
    wire = framing.read_blocking(io.BytesIO(framing.encode(("result", [(OK, b"{}"), (DLQ, "schema", "d")], {1: None}))))
    assert replies.check_batch(wire, 2, 2)[0] == "result"


def test_ready_and_health_replies():
    info = {"name": "m", "version": "1", "digest": "sha256:x", "state_schema_version": 1, "pid": 7}
    assert replies.check_ready(("ready", info)) == ("ready", info)
    assert replies.check_ready(("error", "load", "ImportError: x")) == ("error", "ImportError: x")
    for bad in (("ready", {**info, "pid": "7"}), ("ready", {**info, "name": None}), ("ready",),
                ("result", (), {}), ("error", "exception", "x"), ("ready", [info])):
        with pytest.raises(replies.BadReply):
            replies.check_ready(bad)
    assert replies.check_health(("health", False)) == ("health", False)
    assert replies.check_health(("error", "exception", "x")) == ("error", "exception")
    for bad in (("health", 1), ("health",), ("result", (), {})):
        with pytest.raises(replies.BadReply):
            replies.check_health(bad)


def test_the_worker_may_give_only_the_batch_dead_letter_reasons():
    assert replies.WORKER_DLQ_REASONS <= set(DLQ_REASONS)
    assert "undecodable" not in replies.WORKER_DLQ_REASONS  # the engine's own
    assert "output_oversized" in replies.WORKER_DLQ_REASONS  # the worker checks the size it is told


# ---- environment ------------------------------------------------------------------------------
def test_the_worker_environment_is_an_allowlist_plus_what_the_operator_names():
    daemon_env = {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
                  "FAILOVERD_KAFKA__SASL_PLAIN_PASSWORD": "s3cret", "FAILOVERD_ADMIN_TOKEN": "t0ken",
                  "NOTIFY_SOCKET": "/run/systemd/notify", "AWS_SECRET_ACCESS_KEY": "k", "OMP_NUM_THREADS": "2"}
    env = worker_environment(daemon_env, ("OMP_NUM_THREADS",))
    assert env == {"PATH": "/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "OMP_NUM_THREADS": "2"}
    assert not any(name.startswith("FAILOVERD_") for name in ENV_ALLOWED)


def test_config_refuses_a_passthrough_name_of_the_daemons_own():
    from daemon import config
    from daemon.errors import ConfigError

    assert config.WorkerSettings(env_passthrough=("OMP_NUM_THREADS",)).env_passthrough == ("OMP_NUM_THREADS",)
    with pytest.raises(ConfigError, match="FAILOVERD_KAFKA__SASL_PLAIN_PASSWORD starts with FAILOVERD_"):
        config.WorkerSettings(env_passthrough=("FAILOVERD_KAFKA__SASL_PLAIN_PASSWORD",))
    with pytest.raises(ConfigError, match="an environment variable name"):
        config.WorkerSettings(env_passthrough=("NOT-A-NAME",))
    with pytest.raises(ConfigError, match="at least 16"):
        config.WorkerSettings(max_open_files=3)
