"""Anti-flapping policy: a cool-down after each failover and a cap per time window
(the restart-intensity idea of mode's supervisors).

It governs this instance's failovers and the switches of the active release that follow another
instance's failover on the control topic (the controller defers those by :meth:`FailoverPolicy.wait_s`);
an operator's promote or rollback is not subject to it."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class FailoverPolicy:
    def __init__(self, *, cooldown_s: float, max_failovers: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self.max_failovers = max_failovers
        self.window_s = window_s
        self.clock = clock
        self.history: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        while self.history and now - self.history[0] > self.window_s:
            self.history.popleft()

    def check(self) -> str | None:
        """None when a failover may happen now, else why not."""
        now = self.clock()
        self._trim(now)
        if len(self.history) >= self.max_failovers:
            return (f"failover cap reached: {len(self.history)} failovers in the last {self.window_s:.0f}s "
                    f"(max {self.max_failovers})")
        if self.history and now - self.history[-1] < self.cooldown_s:
            return f"in cool-down: last failover {now - self.history[-1]:.1f}s ago (cool-down {self.cooldown_s:.1f}s)"
        return None

    def cooldown_left(self) -> float:
        """Seconds until the cool-down after the last failover ends (0 when not cooling down)."""
        if not self.history:
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - self.history[-1]))

    def capped(self) -> bool:
        now = self.clock()
        self._trim(now)
        return len(self.history) >= self.max_failovers

    def record(self) -> None:
        self.history.append(self.clock())

    def wait_s(self) -> float:
        """Seconds until :meth:`check` allows a failover again: the cool-down, or the time until
        the oldest failover that fills the cap leaves the window (0 when it allows one now)."""
        now = self.clock()
        self._trim(now)
        wait = 0.0
        if self.history:
            wait = self.cooldown_s - (now - self.history[-1])
        if len(self.history) >= self.max_failovers:
            oldest_to_leave = self.history[len(self.history) - self.max_failovers]
            wait = max(wait, self.window_s - (now - oldest_to_leave))
        return max(0.0, wait)
