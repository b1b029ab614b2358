"""daemon/sdnotify.py against real AF_UNIX datagram sockets, as systemd would listen on them."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import pytest

from daemon.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def listener(tmp_path):
    """A datagram socket bound in tmp_path, like systemd's notify socket; yields (sock, path)."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


@pytest.fixture
def abstract_listener():
    name = f"failoverd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    yield sock, "@" + name
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on sock, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_messages_on_a_path_socket(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier.from_env()
    assert n.enabled
    assert n.ready() is True
    assert sock.recv(4096) == b"READY=1"
    n.status("replaying 42 records\nfrom checkpoint 7")
    assert sock.recv(4096) == b"STATUS=replaying 42 records from checkpoint 7"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.send("READY=1", "STATUS=up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    n.close()


def test_messages_on_an_abstract_socket(abstract_listener, monkeypatch):
    sock, name = abstract_listener
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    n = Notifier.from_env()
    n.ready()
    n.status("serving")
    n.watchdog()
    n.stopping()
    assert [sock.recv(4096) for _ in range(4)] == [b"READY=1", b"STATUS=serving", b"WATCHDOG=1", b"STOPPING=1"]


def test_no_notify_socket_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    n = Notifier.from_env()
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_lost_socket_does_not_raise(tmp_path, caplog):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.ready() is False
    assert n.stopping() is False
    assert sum("cannot notify systemd" in r.getMessage() for r in caplog.records) == 1  # warned once


def test_watchdog_interval_from_env(tmp_path):
    sock = str(tmp_path / "s")
    assert Notifier.from_env({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 30.0
    mine = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval() == 2.0
    other = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval() is None  # meant for another process
    assert Notifier.from_env({"NOTIFY_SOCKET": sock}).watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "0"}).watchdog_interval() is None


async def _collect(sock: socket.socket, seconds: float) -> list[tuple[float, bytes]]:
    """Datagrams received during `seconds`, with their arrival time, while the loop keeps running."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for d in drain(sock):
            got.append((time.monotonic(), d))
        await asyncio.sleep(0.01)
    return got


async def test_watchdog_loop_pings_at_half_the_interval_only_while_healthy(listener):
    sock, path = listener
    n = Notifier(path, watchdog_usec=400_000)  # WatchdogSec=0.4s -> a ping every 0.2s
    state = {"healthy": True}
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(n, lambda: state["healthy"], stop))

    healthy = await _collect(sock, 1.0)
    assert {d for _, d in healthy} == {b"WATCHDOG=1"}
    assert 4 <= len(healthy) <= 7, healthy  # ~every 0.2s
    times = [t for t, _ in healthy]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 0.4, gaps  # always within the watchdog interval

    state["healthy"] = False
    await asyncio.sleep(0.25)  # let a ping already sent arrive
    drain(sock)
    assert await _collect(sock, 0.8) == []  # unhealthy: silence, so systemd would restart us

    state["healthy"] = True
    resumed = await _collect(sock, 0.5)
    assert resumed and {d for _, d in resumed} == {b"WATCHDOG=1"}

    stop.set()
    await asyncio.wait_for(task, timeout=1)
    drain(sock)
    assert await _collect(sock, 0.5) == []  # stopped


async def test_watchdog_loop_treats_a_raising_health_check_as_unhealthy(listener):
    sock, path = listener
    n = Notifier(path, watchdog_usec=200_000)

    def broken() -> bool:
        raise RuntimeError("health check bug")

    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(n, broken, stop))
    assert await _collect(sock, 0.5) == []
    stop.set()
    await asyncio.wait_for(task, timeout=1)


async def test_watchdog_loop_without_watchdog_waits_for_stop(listener):
    _, path = listener
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(Notifier(path), lambda: True, stop))
    await asyncio.sleep(0.05)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=1)
