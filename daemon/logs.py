"""Logging setup: human-readable lines by default, JSON lines with ``--log-format json``."""

from __future__ import annotations

import logging
import sys
import time

import orjson

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


class RepeatFilter(logging.Filter):
    """Let one line of a kind through per ``window`` seconds from chatty libraries.

    While a broker is down aiokafka logs the same few warnings many times a second (about 9,000
    lines in 26 s were seen in the broker-outage chaos test), which buries everything else and
    fills journald. A kind is (logger, level, message template); the first line after a quiet
    window passes and says, in its ``suppressed`` field, how many of its kind were held back.
    Records of other loggers (failoverd's own) always pass.
    """

    MAX_KINDS = 1000

    def __init__(self, window: float = 10.0, prefixes: tuple[str, ...] = ("aiokafka",)) -> None:
        super().__init__()
        self.window = window
        self.prefixes = prefixes
        self._kinds: dict[tuple[str, int, str], list[float]] = {}  # kind -> [time it last passed, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        seen = self._kinds.get(kind)
        if seen is not None and now - seen[0] < self.window:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.suppressed = seen[1]
        if len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()
        self._kinds[kind] = [now, 0]
        return True


def setup(level: str = "info", fmt: str = "human") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    if level.lower() != "debug":
        handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka is chatty at INFO about every (re)connect; keep it at WARNING unless debugging.
    if level.lower() != "debug":
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
