"""A tiny client of systemd's notification protocol (``sd_notify(3)``), without dependencies.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). The daemon
sends newline-separated ``KEY=VALUE`` datagrams to that socket::

    notifier = Notifier.from_env()
    notifier.ready()                 # READY=1       : partitions assigned, state restored, release loaded
    notifier.status("replaying 42")  # STATUS=...    : one line shown by `systemctl status`
    notifier.watchdog()              # WATCHDOG=1    : "still alive"; see watchdog_loop()
    notifier.stopping()              # STOPPING=1    : shutdown has begun

Without ``NOTIFY_SOCKET`` (a terminal, a container, tests) every call is a no-op, so callers never
check. Sending never raises: a notification that cannot be delivered is logged once and dropped,
because systemd going away must not take the data path down with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("failoverd.sdnotify")


class Notifier:
    """Sends notifications to ``address`` (``None``: disabled, every call is a no-op)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd configured for this process through its environment."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_usec = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec:
            # WATCHDOG_PID names the process the watchdog is meant for: a child that inherited
            # the environment must not ping on its parent's behalf.
            if pid and pid.strip() != str(os.getpid()):
                log.debug("WATCHDOG_PID=%s is not this process (%d): watchdog disabled", pid, os.getpid())
            else:
                try:
                    watchdog_usec = int(usec)
                except ValueError:
                    log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return cls(address, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WatchdogSec=``), or ``None`` when there is none."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000

    # ---- the messages ---------------------------------------------------------------------
    def ready(self) -> bool:
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        # One line: systemd cuts a STATUS= at the newline that separates assignments.
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram. True when delivered, False when disabled or lost."""
        if self.address is None:  # not enabled
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, _sockaddr(self.address))
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s", self.address, exc)
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(address={self.address!r}, watchdog_interval={self.watchdog_interval()!r})"


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # abstract namespace socket
    return address


async def watchdog_loop(notifier: Notifier, healthy: Callable[[], bool], stop: asyncio.Event) -> None:
    """Send ``WATCHDOG=1`` every half watchdog interval while ``healthy()`` is true, until ``stop``.

    While ``healthy()`` is false (or raises) no ping is sent, so systemd restarts a daemon that
    stays unhealthy for a whole ``WatchdogSec``. Running on the event loop, it also stops pinging
    when the loop itself is blocked, which is the hang the watchdog exists to catch. Without a
    watchdog configured it just waits for ``stop``.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        await stop.wait()
        return
    period = interval / 2
    was_healthy = True
    while not stop.is_set():
        try:
            ok = bool(healthy())
        except Exception:  # a broken health check is an unhealthy daemon, not a dead watchdog
            log.exception("health check raised; withholding the watchdog ping")
            ok = False
        if ok:
            notifier.watchdog()
        elif was_healthy:
            log.warning("unhealthy: withholding the systemd watchdog ping (restart in %.0fs if it lasts)",
                        interval)
        was_healthy = ok
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
        except asyncio.TimeoutError:
            pass
