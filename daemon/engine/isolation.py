"""Records that kill the model process: found, dead-lettered, and never a failover.

A record can kill the model process of every release (a native crash, ``os._exit``, a hang):
failing over would only hand it to the standby, which dies on it too. So the records of the batch
a worker died or hung on are remembered as *suspects*; when a worker dies again on a batch holding
some of them (the standby, replaying), or at once when there is no standby to fail over to, a
throwaway worker of the active release runs the suspects one at a time. The record it dies or
hangs on is dead-lettered (``model_crash``) and a fresh worker of the active release goes on,
without a failover. If none kills it (or more than ``max_killers`` do, or the first two tried
both do), the release is at fault and the failure handler acts as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition

from daemon.engine.batch import NO_STATE
from daemon.engine.release import LoadedRelease
from daemon.errors import ReleaseFailure, WorkerCrashed, WorkerOutOfMemory, WorkerTimeout

if TYPE_CHECKING:
    from daemon.engine.pipeline import Batch

log = logging.getLogger("failoverd.engine")

PROCESS_DEATHS = (WorkerCrashed, WorkerTimeout, WorkerOutOfMemory)
"""Failures a single record can cause in the model process."""

Loader = Callable[[Path, str], Awaitable[LoadedRelease]]
RecordId = tuple[str, int, int]
"""(topic, partition, offset)"""


class CrashIsolation:
    max_killers = 10
    """More records of one batch that kill a worker on their own: the release is at fault."""

    def __init__(self, loader: Loader | None) -> None:
        self.loader = loader
        """Loads a worker of a release (the app's loader): probes, and the restart after a record killed one."""
        self.suspects: set[RecordId] = set()
        """The records of the batch a worker last died or hung on."""
        self.poison: dict[TopicPartition, dict[int, str]] = {}
        """Records that kill the model process, by partition and offset: dead letters ``model_crash``."""

    async def isolate(self, exc: ReleaseFailure, batch: "Batch", active: LoadedRelease,
                      no_standby: bool) -> LoadedRelease | None:
        """After a worker of ``active`` died or hung on ``batch``: if one record of it is to blame,
        remember it as poison and return a fresh worker of ``active`` to go on with; else None
        (the release is at fault). ``no_standby``: there is nothing to fail over to."""
        ids = {(r.topic, r.partition, r.offset) for r in batch.refs}
        suspects = ids & self.suspects if self.suspects else set()
        self.suspects = ids
        if self.loader is None or not (suspects or no_standby):
            return None
        # every record of the failing batch is probed: the one that killed this worker need not be
        # among the earlier suspects (a second poison record, after the first was dead-lettered)
        killers = await self.probe(batch, ids, active)
        if not killers:
            return None  # no record kills a fresh worker on its own: the release is at fault
        for r, why in killers:
            tp = TopicPartition(r.topic, r.partition)
            self.poison.setdefault(tp, {})[r.offset] = (f"the model process of {active.ref} {why} on this record "
                                                        f"alone (after: {exc})")[:900]
            log.error("one record kills the model process: dead-lettering it instead of failing over",
                      extra={"partition": f"{r.topic}:{r.partition}", "offset": r.offset, "release": active.ref,
                             "why": why})
        try:
            return await self.loader(active.bundle_path, "active")
        except Exception as err:  # noqa: BLE001 - then the failure handler decides, as for any failure
            log.error("could not restart the active release's worker", extra={"error": repr(err)})
            return None

    async def probe(self, batch: "Batch", suspects: set[RecordId], active: LoadedRelease
                    ) -> list[tuple[Any, str]] | None:
        """Run ``suspects`` of ``batch`` one at a time through throwaway workers of ``active`` (a
        fresh one after each death): every record a worker dies or hangs on, with what happened.
        None when more than ``max_killers`` do, or the first record tried does and so does the one
        after it: a release that dies on anything is at fault, not its records."""
        assert self.loader is not None
        killers: list[tuple[Any, str]] = []
        tried = 0
        probe: LoadedRelease | None = None
        try:
            for i, r in enumerate(batch.refs):
                if (r.topic, r.partition, r.offset) not in suspects:
                    continue
                if probe is None:
                    try:
                        probe = await self.loader(active.bundle_path, "probe")
                    except Exception as err:  # noqa: BLE001
                        log.error("could not start a worker to find the record at fault", extra={"error": repr(err)})
                        return None
                key, value, skey = batch.items[i]
                single = [(key, value, 0 if skey != NO_STATE else NO_STATE)]
                states = [batch.states[skey]] if skey != NO_STATE else []
                tried += 1
                why = ""
                try:
                    await probe.worker.process(single, states, ())
                except WorkerCrashed:
                    why = "died"
                except WorkerTimeout:
                    why = "hung"
                except WorkerOutOfMemory:
                    why = "ran out of memory"
                except ReleaseFailure:
                    pass  # failed otherwise on it: not what killed the worker
                if why:
                    killers.append((r, why))
                    if len(killers) > self.max_killers or len(killers) == tried >= 2:
                        return None
                    probe.worker.kill()
                    await probe.worker.close(timeout=1.0)
                    probe = None
            return killers
        finally:
            if probe is not None:
                probe.worker.kill()
                await probe.worker.close(timeout=1.0)
