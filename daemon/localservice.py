"""A local Java service run in the background for development and tests: the process side shared by
the local Kafka broker (:mod:`daemon.kafka_local`) and the local schema registry
(:mod:`daemon.schema_registry_local`).

A service has a pid file, a log file and a port. It is started detached (its own session, so a
Ctrl-C in the shell that started it does not stop it), waited for until it answers, and stopped
with SIGTERM, then SIGKILL after a timeout.

``FAILOVERD_JAVA_OPTS`` adds JVM options to each service's command line (after its own, so they
win). ``make test`` sets ``-XX:TieredStopAtLevel=1``: its brokers and registries live minutes and
serve small requests, and the client JIT alone halved the broker's CPU over the engine, failover and
nothing-lost suites (43 s and 34 s against 22 s and 24 s, same wall time), CPU the tests share on
two cores. Benchmarks and the demo keep the JVM's default (full) JIT.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from daemon.errors import BrokerError


@contextlib.contextmanager
def installing(target: Path) -> Iterator[None]:
    """One process at a time installs ``target``: two `up` commands started together (the test
    suite's brokers and registries, on parallel workers) would otherwise unpack into one directory
    at once, and one would run half-written jars. The second waits, then finds it installed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive (a zombie child of ours counts as gone)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return None
    except (FileNotFoundError, IndexError):
        pass
    return pid


JAVA_OPTS_ENV = "FAILOVERD_JAVA_OPTS"


def java_opts() -> list[str]:
    """The extra JVM options of ``FAILOVERD_JAVA_OPTS`` (shell words), or none."""
    return shlex.split(os.environ.get(JAVA_OPTS_ENV, ""))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require(tool: str, why: str, error: type[BrokerError] = BrokerError) -> str:
    """The path of ``tool`` on PATH, or ``error`` saying why it is needed."""
    path = shutil.which(tool)
    if not path:
        raise error(f"`{tool}` not found on PATH: {why}")
    return path


def start(cmd: list[str], *, home: Path, pid_file: Path, log_file: Path, ready: Callable[[], bool],
          what: str, address: str, timeout: float, error: type[BrokerError] = BrokerError) -> int:
    """Start ``cmd`` detached in ``home`` (output appended to ``log_file``), record its pid, and wait
    until ``ready()``; ``error`` with the log's tail if it exits first, or at the deadline."""
    home.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=home)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise error(f"{what} exited with code {proc.returncode}; last log lines:\n{tail}")
        if ready():
            return proc.pid
        time.sleep(0.25)
    raise error(f"{what} did not answer on {address} within {timeout:.0f}s; see {log_file}")


def stop(pid_file: Path, timeout: float) -> str:
    """SIGTERM the service, SIGKILL it after ``timeout``; what happened, in words."""
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return "already down"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and read_pid(pid_file) is not None:
        time.sleep(0.1)
    if read_pid(pid_file) is not None:
        os.kill(pid, signal.SIGKILL)
        while read_pid(pid_file) is not None:
            time.sleep(0.1)
        pid_file.unlink(missing_ok=True)
        return f"killed pid {pid} after {timeout:.0f}s without a clean shutdown"
    pid_file.unlink(missing_ok=True)
    return f"down (pid {pid} stopped)"
