"""Hot standby: the standby runs every batch in shadow beside the active.

It gets the same batch (the same carried keys) with its own state namespace's states; its outputs
are compared with the active's (:class:`Agreement`, ``failoverd_standby_agreement_ratio``), its
new states are stored with the active's, and its outputs are never written. A standby that fails
in shadow is marked dead (no longer ready); the active's batch goes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson

from daemon import metrics as m
from daemon.engine.batch import OK

if TYPE_CHECKING:
    from daemon.engine.pipeline import Batch

log = logging.getLogger("failoverd.engine")

IGNORED_IN_AGREEMENT = ("model_version",)

Answer = tuple[list[tuple[Any, ...]], dict[int, bytes | None], float]
"""A worker's answer to a batch: (results, new states by skey, seconds)."""


def same_output(a: bytes, b: bytes) -> int:
    """1 when two outputs agree, ignoring fields that only name the model version."""
    if a == b:
        return 1
    da, db = orjson.loads(a), orjson.loads(b)
    if isinstance(da, dict) and isinstance(db, dict):
        for k in IGNORED_IN_AGREEMENT:
            da.pop(k, None)
            db.pop(k, None)
    return 1 if da == db else 0


class Agreement:
    """Outputs of the hot standby equal to the active's, of those both produced."""

    def __init__(self) -> None:
        self.equal = 0
        self.compared = 0

    def reset(self) -> None:
        """A new pair of releases: start counting afresh."""
        self.equal = self.compared = 0

    def add(self, equal: int, compared: int) -> None:
        self.equal += equal
        self.compared += compared
        if self.compared:
            m.STANDBY_AGREEMENT.set(self.equal / self.compared)


async def predict_with_shadow(b: "Batch", max_active: int, max_standby: int, agreement: Agreement) -> Answer:
    """Run the active and the hot standby on ``b``; keep the standby's new states in the batch
    (``new_states_s``). Returns the active's (results, new states, own latency): a slow standby
    must not count against the active."""
    sb = b.shadow
    assert sb is not None
    active_res, standby_res = await asyncio.gather(
        b.release.worker.process(b.items, b.states, b.carry, max_active),
        sb.worker.process(b.items, b.states_s, b.carry, max_standby), return_exceptions=True)
    if isinstance(active_res, BaseException):
        raise active_res
    if isinstance(standby_res, BaseException):
        log.warning("hot standby failed in shadow; it is no longer ready", extra={"error": str(standby_res)})
        sb.worker.dead = True
        m.STANDBY_READY.set(0)
        return active_res
    equal = compared = 0
    for ra, rb in zip(active_res[0], standby_res[0]):
        if ra[0] == OK and rb[0] == OK:
            compared += 1
            equal += same_output(ra[1], rb[1])
    agreement.add(equal, compared)
    b.new_states_s = standby_res[1]
    return active_res
