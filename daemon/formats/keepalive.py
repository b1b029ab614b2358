"""The daemon's side of a batch waiting for the schema registry (the worker side is
:data:`daemon.formats.WAITING`).

While a batch's registry lookups are in progress, the model worker sends ``("waiting", detail)``
frames every 0.25 s before its answer (``detail`` empty while a lookup is merely under way, the
registry's error while it is unavailable). Each one restarts the predict timeout: a registry
outage delays the batch, it is never a release failure and never a dead letter. Only a worker
whose formats use a registry may send them (anything else is a protocol error: a release cannot
keep its batch alive forever by saying it waits). While the registry is unavailable,
``failoverd_schema_registry_waiting{channel}`` is 1, ``failoverd_schema_registry_wait_seconds``
counts the time, and a warning is logged when the wait begins, an info line when it ends.
"""

from __future__ import annotations

import logging
import time

from daemon import metrics as m

log = logging.getLogger("failoverd.formats")


class BadKeepAlive(ValueError):
    """A ``waiting`` frame the worker may not send, or a malformed one."""


class RegistryWaits:
    def __init__(self, label: str, allowed: bool) -> None:
        self.label = label
        self.allowed = allowed
        self._since = 0.0
        self._last = 0.0

    def waiting(self, reply) -> float:
        """One keep-alive frame; returns the moment the predict timeout restarts from."""
        if not self.allowed:
            raise BadKeepAlive("a keep-alive (waiting) frame from a worker whose formats use no schema registry")
        if len(reply) != 2 or type(reply[1]) is not str:
            raise BadKeepAlive(f"malformed waiting frame: {str(reply)[:80]}")
        now = time.monotonic()
        detail = reply[1]
        if detail:
            if not self._since:
                self._since = self._last = now
                m.SCHEMA_REGISTRY_WAITING.labels(self.label).set(1)
                log.warning("schema registry unavailable: the batch waits and retries with backoff (nothing is "
                            "dead-lettered for it)", extra={"channel": self.label, "error": detail[:300]})
            m.SCHEMA_REGISTRY_WAIT_SECONDS.labels(self.label).inc(now - self._last)
            self._last = now
        return now

    def over(self) -> None:
        """The answer came: a wait in progress ended."""
        if self._since:
            waited = time.monotonic() - self._since
            m.SCHEMA_REGISTRY_WAIT_SECONDS.labels(self.label).inc(time.monotonic() - self._last)
            self._since = 0.0
            m.SCHEMA_REGISTRY_WAITING.labels(self.label).set(0)
            log.info("schema registry reachable again; the batch went on", extra={"channel": self.label,
                                                                                "seconds": round(waited, 3)})
