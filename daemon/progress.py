"""Progress of a long command on a terminal: one line on stderr, rewritten in place.

Only when stderr is a terminal (a pipe, a file, ``--json`` consumers and CI logs get nothing
extra: stdout carries the result, unchanged). Updates are throttled to ten a second, so calling
:meth:`Progress.update` per record costs next to nothing. ``FAILOVERD_PROGRESS=0`` turns it off,
``=1`` forces it on (tests).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def wanted(stream: TextIO) -> bool:
    forced = os.environ.get("FAILOVERD_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class Progress:
    """``with Progress("reading dlq") as p: p.update(done, total)``; ``p.step("packing")``."""

    def __init__(self, what: str, *, stream: TextIO | None = None, enabled: bool | None = None,
                 interval: float = 0.1) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.enabled = wanted(self.stream) if enabled is None else enabled
        self.interval = interval
        self._last = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

    def step(self, text: str) -> None:
        """A new phase: shown at once."""
        self._show(text, force=True)

    def update(self, done: int, total: int | None = None, unit: str = "") -> None:
        """``done`` of ``total`` (unknown: None) so far; shown at most every ``interval`` seconds,
        and always when it reaches ``total``."""
        if not self.enabled:
            return
        if total:
            text = f"{done}/{total}{unit} ({100 * done // max(total, 1)}%)"
        else:
            text = f"{done}{unit}"
        self._show(text, force=bool(total) and done >= (total or 0))

    def done(self) -> None:
        """Clear the line (the command's own output follows)."""
        if self.enabled and self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def _show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        line = f"{self.what}: {text}"
        pad = max(0, self._width - len(line))
        self._write("\r" + line + " " * pad)
        self._width = len(line)

    def _write(self, s: str) -> None:
        try:
            self.stream.write(s)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: progress is not worth an error
            self.enabled = False


QUIET = Progress("", enabled=False)
"""Reports nothing: the default of functions that take a ``progress``."""
