"""Model workers as seen from the event loop.

``SubprocessWorker`` (default) runs the model in a child process that receives whole
batches over a pipe, behind the release boundary (docs/architecture.md, "Trust boundary"):
msgpack frames, size-limited, each reply checked (:mod:`daemon.engine.replies`); an allowlisted
environment; its own session and process group, killed whole; resource limits
(:class:`Boundary`). A child that exits, crashes, breaks the protocol, runs out of memory or does
not answer within the predict timeout is killed and reported as
:class:`~daemon.errors.WorkerCrashed`, :class:`~daemon.errors.ProtocolError`,
:class:`~daemon.errors.WorkerOutOfMemory` or :class:`~daemon.errors.WorkerTimeout`.
Requests may be queued: the next batch is written while the model still computes the previous
one (answers come back in order), so the model never waits for the event loop; the timeout and
the reported latency of a batch count from the moment the model could start on it.

``process(items, states, carry)`` returns ``(results, new_states, seconds)``; ``carry`` lists
``(skey, previous_skey)`` pairs whose state is the one the previous batch left (see
:meth:`daemon.engine.batch.BatchProcessor.process`). ``InProcessWorker`` runs trusted models in a
thread of this process. Neither runs model code on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol

from daemon.bundle.environments import worker_python
from daemon.engine import framing, replies
from daemon.engine.batch import BatchProcessor, IsolationLimits
from daemon.errors import (BatchFailed, BundleError, ConfigError, ProtocolError, ReleaseFailure, WorkerCrashed,
                           WorkerOutOfMemory, WorkerTimeout)
from daemon.formats import WAITING, needs_registry
from daemon.formats.keepalive import BadKeepAlive, RegistryWaits

__all__ = ["BatchFailed", "Boundary", "InProcessWorker", "SubprocessWorker", "Worker", "make_worker", "set_boundary",
           "set_bindings", "set_formats", "set_processes"]

log = logging.getLogger("failoverd.worker")

ENV_ALLOWED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONHASHSEED")
"""What a worker inherits of the daemon's environment without being told (plus ``LC_*``): never
the daemon's secrets (``FAILOVERD_*``, the admin token, Kafka credentials), nor ``NOTIFY_SOCKET``
(a model must not speak to systemd for the daemon). ``[worker] env_passthrough`` names more."""


@dataclasses.dataclass(frozen=True)
class Boundary:
    """What a subprocess worker is allowed (``[worker]`` settings; docs/configuration.md)."""

    max_frame_bytes: int = framing.DEFAULT_MAX_FRAME
    env_passthrough: tuple[str, ...] = ()
    memory_mb: int = 4096
    max_open_files: int = 1024
    max_processes: int = 0

    @classmethod
    def from_settings(cls, w: Any) -> "Boundary":
        return cls(max_frame_bytes=w.max_frame_bytes, env_passthrough=tuple(w.env_passthrough or ()),
                   memory_mb=w.memory_mb, max_open_files=w.max_open_files, max_processes=w.max_processes)

    def limits(self) -> dict[str, int]:
        return {"memory_mb": self.memory_mb, "max_open_files": self.max_open_files,
                "max_processes": self.max_processes}


_boundary = Boundary()


def set_boundary(boundary: Boundary) -> None:
    """The boundary of every subprocess worker started from now on (``App`` sets it from ``[worker]``)."""
    global _boundary
    _boundary = boundary


_formats: dict[str, Any] = {}


def set_formats(spec: dict[str, Any]) -> None:
    """The formats (and schema registry) of every worker started from now on (``App`` sets it from
    ``[inputs] format``, ``[output] format`` and ``[schema_registry]``: :func:`daemon.formats.spec_of`)."""
    global _formats
    _formats = dict(spec)


_bindings: dict[str, str] = {}


def set_bindings(paths: dict[str, str]) -> None:
    """This environment's ``[bindings]`` (name -> path) for every worker started from now on (``App``
    sets it from the configuration); a worker passes on those its bundle declares (docs/bundles.md)."""
    global _bindings
    _bindings = dict(paths)


def configure(settings: Any) -> None:
    """Everything a worker started from now on takes from the configuration: the boundary
    (``[worker]``), the formats (``[inputs]``/``[output]`` format, ``[schema_registry]``) and this
    environment's ``[bindings]``. The daemon (``App``) and the integrations call it once."""
    from daemon import formats

    set_boundary(Boundary.from_settings(settings.worker))
    set_formats(formats.spec_of(settings))
    set_bindings({name: str(p) for name, p in settings.bindings.items()})
    set_processes(settings.worker.processes)


def current_bindings() -> dict[str, str]:
    """What :func:`set_bindings` set (the daemon digests the bound content itself: daemon.engine.release)."""
    return dict(_bindings)


def worker_environment(environ: Mapping[str, str], passthrough: tuple[str, ...] = ()) -> dict[str, str]:
    """The allowlisted part of ``environ``, plus the names the operator passes through."""
    return {k: v for k, v in environ.items() if k in ENV_ALLOWED or k.startswith("LC_") or k in passthrough}


Answer = tuple[list[tuple[Any, ...]], dict[int, bytes | None], float]
Item = tuple[bytes | None, bytes, int]
Carry = list[tuple[int, int]] | tuple[()]
"""(skey, skey in the previous batch) pairs, or none."""
"""A worker's answer to a batch: one result per item, the new state per skey, seconds it took."""


class Worker(Protocol):
    """What the engine, the failover controller and the standby keeper may use of a model worker
    (both :class:`SubprocessWorker` and :class:`InProcessWorker`); nothing reads a worker's
    private state."""

    label: str
    """Its channel (``active``, ``standby``, ``probe``): named in its logs and errors."""
    dead: bool
    """Unusable: it exited, crashed, hung, broke the protocol, or was killed. Set by whoever finds out."""
    info: dict[str, Any]
    bundle_path: Path

    @property
    def pid(self) -> int | None:
        """The model process (None in-process, or before it started)."""

    @property
    def returncode(self) -> int | None:
        """The model process's exit code once it exited on its own or was killed; None while it runs
        (always None in-process: a thread does not exit)."""

    async def wait_exit(self) -> int | None:
        """Return when the model process exits (its code), however that happens: the engine awaits
        it so a worker that dies between batches is noticed at once, not at the next batch. Never
        returns in-process (a thread does not exit)."""

    async def start(self) -> dict[str, Any]:
        """Load the bundle; the release info (name, version, digest, ...). BundleError if it cannot."""

    async def process(self, items: list[Item], states: list[bytes | None],
                      carry: Carry = (), max_output: int = 0) -> Answer:
        """Run one batch (see the module docstring); a ReleaseFailure if the release failed on it."""

    async def health(self) -> bool: ...

    def kill(self) -> None:
        """Stop it at once (SIGKILL to its process group); it is dead afterwards."""

    async def close(self, timeout: float = 5.0) -> None:
        """Stop it politely (the model's close()), within ``timeout``; then kill what is left."""


class _Worker:
    """What both kinds of worker know: the bundle, the timeouts, their channel label."""

    def __init__(self, bundle_path: Path, unpack_dir: Path | None, *, predict_timeout: float,
                 start_timeout: float, label: str = "model", isolation: IsolationLimits | None = None) -> None:
        self.bundle_path = Path(bundle_path)
        self.isolation = isolation or IsolationLimits()
        """How many poison records a batch may dead-letter (daemon.engine.batch), set where the model runs."""
        self.unpack_dir = unpack_dir
        self.predict_timeout = predict_timeout
        self.start_timeout = start_timeout
        self.label = label
        self.info: dict[str, Any] = {}
        self.dead = False


class SubprocessWorker(_Worker):
    """The model in a child process: its own session and process group (killed whole), a clean
    environment, resource limits (:class:`Boundary`), and every reply checked before it is used
    (:mod:`daemon.engine.replies`): a reply that is oversized, undecodable or not what the request
    allows is a :class:`~daemon.errors.ProtocolError` (reason ``protocol``) and the worker is killed."""

    def __init__(self, bundle_path: Path, unpack_dir: Path | None, **kw: Any) -> None:
        super().__init__(bundle_path, unpack_dir, **kw)
        self.boundary = _boundary
        self.formats = _formats
        self.bindings = dict(_bindings)
        self._waits = RegistryWaits(self.label, needs_registry(self.formats))
        self._proc: asyncio.subprocess.Process | None = None
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()
        self._group_gone = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    async def wait_exit(self) -> int | None:
        if self._proc is None:
            await asyncio.Event().wait()  # not started: nothing to exit
        assert self._proc is not None
        return await self._proc.wait()

    async def start(self) -> dict[str, Any]:
        b = self.boundary
        env = worker_environment(os.environ, b.env_passthrough)
        # The release's own environment (built from its lock, cached) or the daemon's interpreter
        # (empty lock); in a thread: a first build takes seconds (docs/bundles.md, environments).
        runtime = await asyncio.to_thread(worker_python, self.bundle_path, self.unpack_dir, env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(runtime.pythonpath)
        if self.formats:  # in the environment, not argv (which any user can read): it may hold registry credentials
            env["FAILOVERD_WORKER_FORMATS"] = json.dumps(self.formats)
        if self.bindings:
            env["FAILOVERD_WORKER_BINDINGS"] = json.dumps(self.bindings)
        self._proc = await asyncio.create_subprocess_exec(
            runtime.executable, "-m", "daemon.engine.worker_main", str(self.bundle_path), str(self.unpack_dir or ""),
            str(self.isolation.max_records), repr(self.isolation.max_fraction), json.dumps(b.limits()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            start_new_session=True, limit=1 << 24)
        try:
            return await self._handshake()
        except BaseException:
            # cancelled (the daemon stops while the release loads) or any failure: the process,
            # started in a session of its own, would outlive the daemon; nothing of it stays behind
            self.dead = True
            self.kill()
            raise

    async def _handshake(self) -> dict[str, Any]:
        """Read the started worker's first reply: its release info, or why it did not load."""
        assert self._proc is not None and self._proc.stdout is not None
        b = self.boundary
        _widen_pipes(self._proc)
        try:
            reply = await asyncio.wait_for(framing.read_async(self._proc.stdout, b.max_frame_bytes),
                                           self.start_timeout)
            kind, info = replies.check_ready(reply)
        except asyncio.TimeoutError:
            self.kill()
            raise BundleError(f"{self.label}: worker for {self.bundle_path} did not load within {self.start_timeout:.0f}s")
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self._proc.wait()
            self.kill()
            raise BundleError(f"{self.label}: worker for {self.bundle_path} exited with code {code} while loading"
                              f"{_signal_hint(code)}")
        except (framing.FrameError, replies.BadReply) as exc:
            self.dead = True
            self.kill()
            await self._reap()
            raise BundleError(f"{self.label}: worker for {self.bundle_path} broke the protocol while loading: {exc}")
        if kind != "ready":
            await self._reap()
            self.kill()
            raise BundleError(f"{self.label}: bundle {self.bundle_path} failed to load: {info}")
        self.info = info
        log.info("worker ready", extra={"release": f"{self.info['name']}@{self.info['version']}",
                                        "pid": self._proc.pid, "channel": self.label})
        return self.info

    async def _call(self, request: tuple[Any, ...], timeout: float) -> tuple[Any, float]:
        """Send a request, wait for its answer; returns (reply, seconds since the worker could start it)."""
        if self.dead or self._proc is None:
            raise WorkerCrashed(f"{self.label} worker is not running")
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None  # both are pipes (start)
        try:
            async with self._write_lock:  # requests go out in order ...
                stdin.write(framing.encode(request))
                await stdin.drain()
        except (ConnectionError, BrokenPipeError) as exc:
            return await self._died(exc)
        async with self._read_lock:  # ... and answers come back in the same order
            if self.dead:
                raise WorkerCrashed(f"{self.label} worker (pid {self.pid}) is gone")
            t0 = time.monotonic()  # the answer before this one was read: the worker is on ours
            try:
                while True:
                    reply = await asyncio.wait_for(framing.read_async(stdout, self.boundary.max_frame_bytes), timeout)
                    if type(reply) is tuple and reply and reply[0] == "waiting":  # the schema registry: keep-alive
                        t0 = self._waits.waiting(reply)  # the timeout and the latency restart
                        continue
                    self._waits.over()
                    return reply, time.monotonic() - t0
            except BadKeepAlive as exc:
                raise self._broke(str(exc)) from None
            except asyncio.TimeoutError:
                self.dead = True
                self.kill()
                raise WorkerTimeout(f"{self.label} worker (pid {self.pid}) did not answer within {timeout:.3f}s; killed")
            except framing.FrameError as exc:
                raise self._broke(str(exc)) from None
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as exc:
                return await self._died(exc)

    def _broke(self, detail: str) -> ProtocolError:
        """The worker sent what it must not: it is killed (with its group), never read again."""
        self.dead = True
        self.kill()
        log.error("worker broke the protocol; killed", extra={"channel": self.label, "pid": self.pid,
                                                              "error": detail[:300]})
        return ProtocolError(f"{self.label} worker (pid {self.pid}) broke the protocol: {detail}; killed")

    async def _died(self, exc: BaseException) -> NoReturn:
        self.dead = True
        code = await self._reap()
        self.kill()  # what the model started dies with it
        raise WorkerCrashed(f"{self.label} worker (pid {self.pid}) died (exit code {code}{_signal_hint(code)}): "
                            f"{type(exc).__name__}") from None

    async def process(self, items: list[Item], states: list[bytes | None],
                      carry: Carry = (), max_output: int = 0) -> Answer:
        reply, seconds = await self._call(("batch", items, states, carry, max_output), self.predict_timeout)
        try:
            kind, a, b = replies.check_batch(reply, len(items), len(states))
        except replies.BadReply as exc:
            raise self._broke(str(exc)) from None
        if kind == "result":
            return a, b, seconds
        if a == "exception":
            raise BatchFailed(f"{self.label} predict failed: {b}")
        if a == "oom":
            self.dead = True
            self.kill()
            raise WorkerOutOfMemory(f"{self.label} worker (pid {self.pid}) ran out of memory "
                                    f"(worker.memory_mb = {self.boundary.memory_mb}): {b[:300]}; killed")
        raise self._broke(f"the worker refused a batch request: {b[:300]}")

    async def health(self) -> bool:
        try:
            reply, _ = await self._call(("health",), self.predict_timeout)
            kind, ok = replies.check_health(reply)
        except replies.BadReply as exc:
            self._broke(str(exc))
            return False
        except ReleaseFailure:
            return False
        return kind == "health" and ok

    def kill(self) -> None:
        """SIGKILL to the worker's whole process group: the worker and whatever the model started
        (the worker leads its group; the group outlives the worker while any member is alive, so
        this also reaches the children of a worker that already exited)."""
        proc = self._proc
        if proc is None or self._group_gone:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            self._group_gone = proc.returncode is not None  # nothing left of it to kill
        except PermissionError:  # pragma: no cover - the group id was reused by another user's process
            self._group_gone = True

    async def _reap(self) -> int | None:
        if self._proc is None:
            return None
        try:
            return await asyncio.wait_for(self._proc.wait(), 5)
        except asyncio.TimeoutError:
            self.kill()
            return await self._proc.wait()

    async def close(self, timeout: float = 5.0) -> None:
        if self._proc is None:
            return
        stdin = self._proc.stdin
        if self._proc.returncode is None and not self.dead and stdin is not None:
            try:
                stdin.write(framing.encode(("close",)))
                await stdin.drain()
                stdin.close()
                await asyncio.wait_for(self._proc.wait(), timeout)
            except (asyncio.TimeoutError, ConnectionError, BrokenPipeError):
                pass
        self.kill()  # the worker if it did not stop in time, and whatever the model left running
        if self._proc.returncode is None:
            await self._reap()


def _signal_hint(code: int | None) -> str:
    if code == -signal.SIGKILL:
        return ", killed by SIGKILL: the kernel's OOM killer (see the kernel log and systemd MemoryMax) or kill -9"
    if code is not None and code < 0:
        try:
            return f", killed by {signal.Signals(-code).name}"
        except ValueError:
            return ""
    return ""


class InProcessWorker(_Worker):
    """Runs a trusted model in a dedicated thread of the daemon process."""

    def __init__(self, bundle_path: Path, unpack_dir: Path | None, **kw: Any) -> None:
        super().__init__(bundle_path, unpack_dir, **kw)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"model-{self.label}")
        self._processor: BatchProcessor | None = None

    @property
    def pid(self) -> int | None:
        return None

    @property
    def returncode(self) -> int | None:
        return None

    async def wait_exit(self) -> int | None:
        await asyncio.Event().wait()  # a thread does not exit
        return None

    async def start(self) -> dict[str, Any]:
        from daemon.engine.loading import load_processor

        loop = asyncio.get_running_loop()
        try:
            self._processor, self.info = await asyncio.wait_for(
                loop.run_in_executor(self._pool, load_processor, self.bundle_path, self.unpack_dir, self.isolation,
                                     None, _formats, dict(_bindings)),
                self.start_timeout)
        except asyncio.TimeoutError:
            raise BundleError(f"{self.label}: bundle {self.bundle_path} did not load within {self.start_timeout:.0f}s")
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{self.label}: bundle {self.bundle_path} failed to load: {type(exc).__name__}: {exc}")
        return self.info

    async def process(self, items: list[Item], states: list[bytes | None],
                      carry: Carry = (), max_output: int = 0) -> Answer:
        processor = self._processor
        if self.dead or processor is None:
            raise WorkerCrashed(f"{self.label} in-process model is unusable after a timeout")
        loop = asyncio.get_running_loop()
        started: list[float] = []  # set by the thread: a queued batch's clock starts when it starts

        def run() -> tuple[list[tuple[Any, ...]], dict[int, bytes | None]]:
            started.append(time.monotonic())
            return processor.process(items, states, carry, max_output)

        fut = loop.run_in_executor(self._pool, run)
        while not fut.done():
            left = self.predict_timeout - (time.monotonic() - started[0]) if started else self.predict_timeout
            if WAITING.since:  # waiting for the schema registry (daemon.formats): not the model's time
                started[:] = [time.monotonic()]
                left = min(self.predict_timeout, 0.25)
            if left <= 0:
                self.dead = True  # the thread cannot be killed; this worker is done
                raise WorkerTimeout(f"{self.label} in-process predict did not answer within "
                                    f"{self.predict_timeout:.3f}s")
            await asyncio.wait({fut}, timeout=left)
        try:
            results, new_states = fut.result()
        except Exception as exc:
            raise BatchFailed(f"{self.label} predict failed: {type(exc).__name__}: {exc}") from exc
        return results, new_states, time.monotonic() - started[0]

    async def health(self) -> bool:
        if self.dead or self._processor is None:
            return False
        check = getattr(self._processor.model, "health_check", None)
        if not callable(check):
            return True
        loop = asyncio.get_running_loop()
        try:
            return bool(await asyncio.wait_for(loop.run_in_executor(self._pool, check), self.predict_timeout))
        except Exception:
            return False

    def kill(self) -> None:
        self.dead = True

    async def close(self, timeout: float = 5.0) -> None:
        close = getattr(getattr(self._processor, "model", None), "close", None)
        if callable(close) and not self.dead:
            loop = asyncio.get_running_loop()
            try:
                await asyncio.wait_for(loop.run_in_executor(self._pool, close), timeout)
            except Exception:  # noqa: BLE001
                log.exception("model close() failed")
        self._pool.shutdown(wait=False, cancel_futures=True)


_processes = 1


def set_processes(processes: int) -> None:
    """How many model processes every release started from now on gets (``[worker] processes``;
    ``App`` sets it from the configuration through :func:`configure`)."""
    global _processes
    _processes = processes


def make_worker(mode: str, bundle_path: Path, unpack_dir: Path | None, *, predict_timeout: float,
                start_timeout: float, label: str, isolation: IsolationLimits | None = None,
                processes: int | None = None) -> Worker:
    """``processes`` (default: ``[worker] processes``, :func:`set_processes`): more than one gives a
    :class:`daemon.engine.pool.WorkerPool` of that many subprocess workers. A crash-isolation probe
    (label ``probe``) runs one record at a time and always gets one process."""
    n = _processes if processes is None else processes
    if label == "probe":
        n = 1
    if n > 1 and mode != "subprocess":
        raise ConfigError(f"worker.processes = {n} needs worker.mode = \"subprocess\" (an in-process model runs in "
                          f"a thread of the daemon); fix: set worker.processes = 1, or worker.mode = \"subprocess\"")
    if n > 1:
        from daemon.engine.pool import WorkerPool  # it builds on this module

        return WorkerPool(bundle_path, unpack_dir, processes=n, predict_timeout=predict_timeout,
                          start_timeout=start_timeout, label=label, isolation=isolation)
    cls: type[SubprocessWorker] | type[InProcessWorker] = SubprocessWorker if mode == "subprocess" else InProcessWorker
    return cls(bundle_path, unpack_dir, predict_timeout=predict_timeout, start_timeout=start_timeout, label=label,
               isolation=isolation)


def _widen_pipes(proc: asyncio.subprocess.Process) -> None:
    """Let a whole batch fit in each pipe (Linux: up to pipe-max-size, 1 MiB by default), so a
    request or an answer is written in one go instead of 64 KiB at a time between event-loop turns."""
    try:
        import fcntl

        size = min(1 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        # asyncio's StreamReader keeps its transport private (Python 3.11-3.13)
        for transport in (stdin.transport, stdout._transport):  # type: ignore[attr-defined]
            fcntl.fcntl(transport.get_extra_info("pipe").fileno(), fcntl.F_SETPIPE_SZ, size)
    except (OSError, ValueError, AttributeError):
        pass  # not Linux, or not allowed: 64 KiB pipes work, a little slower
