"""One time budget shared by every step that may block (quix-streams' ``checkpointing/deadline.py``
is the model).

Shutdown and a partition handover run several steps that each wait on the broker or on a model
process (settle the commit in flight, drain the batches in flight, the final checkpoint, aborts,
closing clients and workers). Giving each step its own timeout lets the total drift past what
systemd (``TimeoutStopSec``) or the group's rebalance allows; one :class:`Deadline` passed to every
step bounds the total by construction: a step gets what is left, capped by its own share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

FLOOR_S = 0.1
"""Every step gets at least this much, even past the deadline: enough to send an abort or a close,
never enough to hang."""


class Deadline:
    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds

    def left(self, cap: float | None = None) -> float:
        """Seconds left (at least :data:`FLOOR_S`), at most ``cap``."""
        left = self._end - self._clock()
        if cap is not None:
            left = min(cap, left)
        return max(FLOOR_S, left)

    def share(self, fraction: float) -> float:
        """What is left, at most ``fraction`` of the whole budget (a step that must leave room
        for the steps after it)."""
        return self.left(self.seconds * fraction)

    @property
    def expired(self) -> bool:
        return self._clock() >= self._end

    async def run(self, aw: Awaitable[T], cap: float | None = None) -> T:
        """Await ``aw`` for at most :meth:`left` (``asyncio.TimeoutError`` after that)."""
        return await asyncio.wait_for(aw, self.left(cap))
