"""Ports for the servers tests start (admin APIs, metrics, registries, S3 stores).

A port found free by binding port 0 comes from the kernel's ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 by default), the same range every outgoing
connection takes its local port from: between the test picking it and its server binding it,
a client socket of the broker, a daemon or the other xdist worker could take it (seen: a faust
app's metrics port "Address already in use"). These ports come from below that range instead,
each xdist worker from a slice of its own, and are checked free before they are handed out.
"""

from __future__ import annotations

import itertools
import os
import socket

BASE, SLICE = 15000, 2000
"""Worker ``gwN`` takes ports ``BASE + N * SLICE`` onwards (8 workers fit below 32768)."""


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker[2:].isdigit() else 0
    start = BASE + (n % 8) * SLICE
    return range(start, start + SLICE)


_next = itertools.cycle(_slice())


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, outside the ephemeral range."""
    for _ in range(SLICE):
        port = next(_next)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {_slice()}: is something else listening there?")
