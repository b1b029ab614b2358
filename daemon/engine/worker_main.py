"""Entry point of a model worker subprocess:
``python -m daemon.engine.worker_main BUNDLE UNPACK_DIR [ISOLATE_MAX_RECORDS ISOLATE_MAX_FRACTION [LIMITS_JSON]]``.

Reads request frames on the original stdin and writes reply frames on the original stdout (both
kept on private descriptors); the model's own prints go to stderr and its stdin reads /dev/null,
so neither it nor a process it starts can corrupt the protocol or take a request's bytes.

Before anything of the release is imported, the worker applies its resource limits
(``LIMITS_JSON``: ``memory_mb``, ``max_open_files``, ``max_processes``; 0 leaves one unchanged),
soft and hard alike, so model code cannot raise them again. A ``MemoryError`` anywhere -- in
``predict`` too, where the batch's poison-record isolation would otherwise take it for a record's
fault -- ends the worker after it has answered ``("error", "oom", detail)``: the daemon fails the
release over with reason ``worker_oom``. The worker leads its own process group (the daemon starts
it in a new session); if the daemon goes away without closing it, the worker kills its whole
group, so nothing a model started outlives it.

Formats other than JSON (:mod:`daemon.formats`) come in ``FAILOVERD_WORKER_FORMATS`` (JSON; removed
from the environment before the release is imported), and the paths of this environment's bindings
in ``FAILOVERD_WORKER_BINDINGS`` (JSON name -> path; docs/bundles.md#bindings). While a batch
waits for the schema registry, the worker sends ``("waiting", detail)`` every 0.25 s before its
answer (:mod:`daemon.formats.keepalive`).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from daemon.engine import framing


class OutOfMemory(BaseException):
    """A MemoryError in model code, raised past every ``except Exception`` of the batch code."""


def apply_limits(limits: dict[str, Any]) -> list[str]:
    """setrlimit for the worker and everything it starts; returns what was applied, for the log.
    RLIMIT_DATA, not RLIMIT_AS: it counts the private writable memory a process maps (heap, arenas,
    numpy buffers, thread stacks) but not address space reserved and never made writable, which
    numpy, OpenBLAS and ONNX Runtime reserve in large amounts (docs/configuration.md, [worker])."""
    import resource

    applied = []
    for key, res, scale in (("memory_mb", resource.RLIMIT_DATA, 1 << 20),
                            ("max_open_files", resource.RLIMIT_NOFILE, 1),
                            ("max_processes", resource.RLIMIT_NPROC, 1)):
        value = int(limits.get(key) or 0) * scale
        if value <= 0:
            continue
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # an unprivileged process can lower its hard limit, never raise it
        resource.setrlimit(res, (value, value))
        applied.append(f"{key}={value // scale}")
    return applied


def _kill_group() -> None:
    """The worker and every process the model started (the worker leads its process group)."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    except OSError:
        pass
    os._exit(137)


def _watch_parent(parent: int) -> None:
    """A daemon that dies without closing the worker (kill -9) takes the worker's group with it."""
    import time

    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            _kill_group()


def _keep_alive(proto_out: BinaryIO, send_lock: threading.Lock) -> None:
    """While a batch waits on the schema registry, tell the daemon so every 0.25 s (its predict
    timeout restarts on each); checked under the send lock, so none follows the batch's answer."""
    import time

    from daemon.formats import WAITING

    while True:
        time.sleep(0.25)
        with send_lock:
            if WAITING.since:
                proto_out.write(framing.encode(("waiting", WAITING.detail)))


class _Guarded:
    """The model as BatchProcessor sees it: ``predict`` lets a MemoryError through as OutOfMemory."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def predict(self, batch: Any) -> Any:
        try:
            return self._model.predict(batch)
        except MemoryError as exc:
            raise OutOfMemory(f"MemoryError in predict: {exc}") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def main(argv: list[str]) -> int:
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # model prints go to stderr
    sys.stdout = sys.stderr
    proto_in = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # a model (or a process it starts) reading stdin gets EOF, never a request's bytes
    os.close(devnull)

    send_lock = threading.Lock()  # the keep-alive thread writes too

    def send(message: Any) -> None:
        frame = framing.encode(message)
        with send_lock:
            proto_out.write(frame)

    if os.getpid() == os.getpgrp():  # started in its own session: its group is its own to kill
        threading.Thread(target=_watch_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    limits: dict[str, Any] = {}
    try:
        limits = json.loads(argv[4]) if len(argv) > 4 else {}
        applied = apply_limits(limits)
        if applied:
            print(f"worker {os.getpid()}: limits {', '.join(applied)}", file=sys.stderr)
        from daemon.engine.batch import IsolationLimits
        from daemon.engine.loading import load_processor

        isolation = IsolationLimits(int(argv[2]), float(argv[3])) if len(argv) > 3 else None
        formats = json.loads(os.environ.pop("FAILOVERD_WORKER_FORMATS", "") or "{}")
        bindings = json.loads(os.environ.pop("FAILOVERD_WORKER_BINDINGS", "") or "{}")
        processor, info = load_processor(Path(argv[0]), Path(argv[1]) if len(argv) > 1 and argv[1] else None, isolation,
                                         None, formats, bindings)
        if formats:
            threading.Thread(target=_keep_alive, args=(proto_out, send_lock), name="keep-alive", daemon=True).start()
        processor.model = _Guarded(processor.model)
    except MemoryError as exc:
        send(("error", "load", f"MemoryError while loading (worker.memory_mb = {limits.get('memory_mb')}): {exc}"))
        return 3
    except BaseException as exc:  # noqa: BLE001 - report any load failure to the parent
        send(("error", "load", f"{type(exc).__name__}: {exc}"))
        return 3
    gc.freeze()  # the model, its data and the modules live as long as the process: never re-scan them
    send(("ready", {**info, "pid": os.getpid()}))

    while True:
        request = framing.read_blocking(proto_in)
        if request is None or request[0] == "close":
            close = getattr(processor.model, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            if request is None and os.getpid() == os.getpgrp():
                _kill_group()  # the daemon went away without a close: nothing of ours stays behind
            return 0
        kind = request[0]
        try:
            if kind == "batch":
                # A batch's objects die by refcount when it ends, so collections in the middle of
                # one only re-scan live records; cyclic garbage is collected between batches.
                gc.disable()
                try:
                    results, states = processor.process(request[1], request[2], request[3],
                                                        request[4] if len(request) > 4 else 0)
                finally:
                    gc.enable()
                send(("result", results, states))
            elif kind == "health":
                check = getattr(processor.model, "health_check", None)
                send(("health", bool(check()) if callable(check) else True))
            else:
                send(("error", "protocol", f"unknown request {kind!r}"))
        except (MemoryError, OutOfMemory) as exc:
            results, states = [], {}  # what the batch held, freed so the answer can be written
            gc.collect()
            send(("error", "oom", f"{type(exc).__name__}: {exc}"[:2000]))
            return 4
        except Exception as exc:  # noqa: BLE001 - a failing batch is reported, not fatal here
            send(("error", "exception", "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:
        # the daemon closed the protocol channel (it stopped, or gave up on this worker): nobody is
        # left to answer, which is not the model's error; no traceback in the daemon's log
        if os.getpid() == os.getpgrp():
            _kill_group()
        os._exit(0)
