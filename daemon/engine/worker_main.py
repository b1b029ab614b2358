"""Entry point of a model worker subprocess:
``python -m daemon.engine.worker_main BUNDLE UNPACK_DIR [ISOLATE_MAX_RECORDS ISOLATE_MAX_FRACTION]``.

Reads request frames on stdin and writes reply frames on the original stdout; the model's own
prints go to stderr so they can never corrupt the protocol.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

from daemon.engine import framing


def main(argv: list[str]) -> int:
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # model prints go to stderr
    sys.stdout = sys.stderr
    proto_in = os.fdopen(os.dup(0), "rb", buffering=1 << 16)

    def send(message) -> None:
        proto_out.write(framing.encode(message))

    try:
        from daemon.engine.batch import IsolationLimits
        from daemon.engine.loading import load_processor

        isolation = IsolationLimits(int(argv[2]), float(argv[3])) if len(argv) > 3 else None
        processor, info = load_processor(argv[0], argv[1] if len(argv) > 1 and argv[1] else None, isolation)
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
            return 0
        kind = request[0]
        try:
            if kind == "batch":
                # A batch's objects die by refcount when it ends, so collections in the middle of
                # one only re-scan live records; cyclic garbage is collected between batches.
                gc.disable()
                try:
                    results, states = processor.process(request[1], request[2], request[3])
                finally:
                    gc.enable()
                send(("result", results, states))
            elif kind == "health":
                check = getattr(processor.model, "health_check", None)
                send(("health", bool(check()) if callable(check) else True))
            else:
                send(("error", "protocol", f"unknown request {kind!r}"))
        except Exception as exc:  # noqa: BLE001 - a failing batch is reported, not fatal here
            send(("error", "exception", "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
