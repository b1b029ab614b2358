"""Batches on their way through the model: prepared, predicted, collected, held, written.

The batch path is pipelined: batch N+1 is prepared and sent to the model while the model still
computes N, so the model always has its next batch waiting; then N's answer is collected (new
states stored) and its outputs written while the model computes N+1. N+1 was prepared before N's
new states were stored: for a key that N also has, N+1 says "carry" (the model worker takes the
state N left, in order) instead of a stored state, so per-key state is exact. While a checkpoint
commits in the background, collected batches are held (up to :attr:`Pipeline.MAX_HELD`) and
written when it ends. A partition's ``position`` (what a checkpoint commits) only covers batches
whose outputs were written.

Triage happens here, before the model: a record below the partition's fetch position is skipped
(a prefetched batch racing a seek); an undecodable record (:mod:`daemon.engine.records`), a
record known to kill the model process (:mod:`daemon.engine.isolation`), a null value or a value
over ``dead_letter.max_value_bytes`` goes straight to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition

from daemon import metrics as m
from daemon.engine import records as tolerant
from daemon.engine.assignment import Assignment
from daemon.engine.batch import NO_STATE
from daemon.engine.checkpointer import Checkpointer
from daemon.engine.isolation import CrashIsolation
from daemon.engine.output import Output
from daemon.engine.partition import Partition
from daemon.engine.release import LoadedRelease
from daemon.engine.shadow import Agreement, Answer, predict_with_shadow

Item = tuple[bytes | None, bytes, int]
"""What the model worker gets per record: (key, value, skey) -- skey indexes the batch's states."""
Emit = Callable[["Batch"], Awaitable[None]]


class Batch:
    """One fetched batch on its way through the model."""

    __slots__ = ("release", "items", "refs", "spans", "direct", "skey_owner", "states", "ends", "task",
                 "results", "predict_s", "keys", "carry", "shadow", "states_s", "new_states_s")

    def __init__(self, release: LoadedRelease) -> None:
        self.release = release
        self.items: list[Item] = []
        self.refs: list[Any] = []
        """The consumer record of each item (same order)."""
        self.spans: list[tuple[Partition, int, int]] = []
        """(partition, first, end) index ranges of ``items``/``refs``: one per partition, contiguous."""
        self.direct: list[tuple[Partition, Any, str, str]] = []
        """Dead letters decided before the model: (partition, record, reason, detail)."""
        self.skey_owner: list[tuple[Partition, bytes]] = []
        self.states: list[bytes | None] = []
        self.ends: dict[Partition, tuple[int, int]] = {}
        """Per partition: (next offset after the batch, records fetched)."""
        self.task: asyncio.Task[Answer] | None = None
        self.results: list[tuple[Any, ...]] = []
        self.predict_s = 0.0
        self.keys: dict[Partition, dict[bytes, int]] = {}
        """Per partition: state key -> skey (what the next batch may carry from)."""
        self.carry: list[tuple[int, int]] = []
        """(skey, skey in the previous batch): states the model worker takes from the previous batch."""
        self.shadow: LoadedRelease | None = None
        """The hot standby this batch was also sent to (its states: ``states_s``, ``new_states_s``)."""
        self.states_s: list[bytes | None] = []
        self.new_states_s: dict[int, bytes | None] | None = None


class Pipeline:
    MAX_HELD = 4
    """Batches predicted while a checkpoint commits, held until it ends; then the loop waits."""

    def __init__(self, assignment: Assignment, output: Output, checkpointer: Checkpointer,
                 isolation: CrashIsolation, agreement: Agreement, emit: Emit) -> None:
        self.assignment = assignment
        self.output = output
        self.checkpointer = checkpointer
        self.isolation = isolation
        self.agreement = agreement
        self.emit = emit
        """Writes one collected batch (the engine's emit step)."""
        self.inflight: collections.deque[Batch] = collections.deque()
        """Batches sent to the model and not collected yet (at most two)."""
        self.held: list[Batch] = []
        """Predicted batches (states stored) whose outputs wait for the commit in flight to end."""
        self._markers_found = 0
        """Undecodable-record markers (daemon/engine/records.py) the batches have met so far."""

    @property
    def busy(self) -> bool:
        return bool(self.inflight or self.held)

    def oldest(self) -> Batch | None:
        """The batch the model answers next (a worker that died or hung died on it)."""
        return self.inflight[0] if self.inflight else None

    async def feed(self, data: dict[TopicPartition, list[Any]], active: LoadedRelease,
                   shadow: LoadedRelease | None) -> None:
        """Send the fetched ``data`` to the model; write what the model answered before it."""
        while self.inflight and self.inflight[-1].shadow is not shadow:
            # the hot standby just became ready, was replaced or died: its worker did not see the batch
            # in flight, so nothing may be carried across; store every state first
            await self.finish_oldest()
        previous = self.inflight[-1] if self.inflight else None
        batch = self.prepare(data, active, previous, shadow)
        if batch is not None:
            if batch.items:
                batch.task = asyncio.get_running_loop().create_task(self._predict(batch))
            self.inflight.append(batch)
        while len(self.inflight) > 1:
            await self.finish_oldest()

    async def drain(self) -> None:
        """Finish every batch in flight and write every held one."""
        while self.inflight:
            await self.finish_oldest(wait=True)
        await self.write(None, wait=True)

    async def finish_oldest(self, wait: bool = False) -> None:
        """Collect the oldest batch in flight and write it (or hold it: see :meth:`write`)."""
        await self.collect(self.inflight[0])  # if this fails, the engine discards it (still in flight)
        await self.write(self.inflight.popleft(), wait=wait)

    async def write(self, batch: Batch | None, wait: bool = False) -> None:
        """Write ``batch`` (after any held ones), or hold it while a checkpoint commits, so that the
        model is fed the next batches meanwhile. ``wait``: write now, after the commit ends."""
        if not wait and self.checkpointer.busy and len(self.held) < self.MAX_HELD:
            if batch is not None:
                self.held.append(batch)
            return
        while self.held:
            await self.emit(self.held.pop(0))
        if batch is not None:
            await self.emit(batch)

    async def discard(self) -> None:
        """Drop the batches not written yet; their records are fetched again from what was written.
        Held batches already stored their states: a caller that had any rewinds to the checkpoint."""
        inflight, self.inflight = list(self.inflight), collections.deque()
        held, self.held = self.held, []
        # never leave a reply in the pipe
        await asyncio.gather(*(b.task for b in inflight if b.task is not None), return_exceptions=True)
        for b in [*held, *inflight]:
            for p in b.ends:
                self.assignment.refetch_from_position(p)

    def prepare(self, data: dict[TopicPartition, list[Any]], rel: LoadedRelease, previous: Batch | None = None,
                shadow: LoadedRelease | None = None) -> Batch | None:
        """Build the model's batch; ``previous``: the batch in flight, whose states are not stored
        yet (keys it has carry its result instead of a stored state); ``shadow``: the hot standby,
        which gets the same batch with its own namespace's states."""
        ns = rel.ns
        b = Batch(rel)
        b.shadow = shadow
        if previous is not None and previous.release is not rel:
            previous = None  # cannot happen (a release change drains first); never carry across models
        markers = tolerant.STATS.markers > self._markers_found  # the client met a record it could not read
        parts = self.assignment.parts
        max_value = self.output.max_value
        poisoned = self.isolation.poison
        for tp, records in data.items():
            p = parts.get(tp)
            if p is None:
                continue
            poison = poisoned.get(tp) if poisoned else None
            keys: dict[bytes, int] = {}
            n = 0
            first = len(b.refs)
            for r in records:
                if r.offset < p.fetched:
                    continue  # already handed to the model (a seek raced with a prefetched batch)
                n += 1
                if markers and tolerant.is_marker(r):
                    self._markers_found += 1
                    b.direct.append((p, r, "undecodable", r.headers[-1][1].decode("utf-8", "replace")))
                    continue
                if poison is not None and r.offset in poison:
                    b.direct.append((p, r, "model_crash", poison[r.offset]))
                    continue
                value = r.value
                if value is None or len(value) > max_value:
                    b.direct.append((p, r, "oversized" if value is not None else "bad_json",
                                     f"{len(value)} bytes > {max_value}" if value is not None else "null value"))
                    continue
                key = r.key
                if key is None:
                    sk = NO_STATE
                else:
                    known = keys.get(key)
                    if known is not None:
                        sk = known
                    else:
                        sk = keys[key] = len(b.skey_owner)
                        b.skey_owner.append((p, key))
                b.items.append((key, value, sk))
                b.refs.append(r)
            if len(b.refs) > first:
                b.spans.append((p, first, len(b.refs)))
            if n:
                m.RECORDS_IN.labels(tp.topic, p.partition_b.decode()).inc(n)
                end = records[-1].offset + 1
                p.fetched = max(p.fetched, end)
                b.ends[p] = (end, n)
            if keys:
                b.keys[p] = keys
                before = previous.keys.get(p) if previous is not None else None
                if before:
                    carried = [(sk, before[k]) for k, sk in keys.items() if k in before]
                    b.carry.extend(carried)
                    lookup = [k for k in keys if k not in before]
                else:
                    lookup = list(keys)
                got = p.store.get_many(ns, lookup) if lookup else {}
                b.states.extend(got.get(k) for k in keys)  # dict order = skey order; carried: None here
                if shadow is not None:
                    got = p.store.get_many(shadow.ns, lookup) if lookup else {}
                    b.states_s.extend(got.get(k) for k in keys)
        if not b.ends:
            return None
        return b

    async def _predict(self, b: Batch) -> Answer:
        if b.shadow is None:
            answer: Answer = await b.release.worker.process(b.items, b.states, b.carry,
                                                            self.output.max_output(b.release))
            return answer
        return await predict_with_shadow(b, self.output.max_output(b.release), self.output.max_output(b.shadow),
                                         self.agreement)

    async def collect(self, b: Batch) -> None:
        """Wait for the model's answer and store the batch's new states."""
        if b.items:
            assert b.task is not None
            b.results, new_states, b.predict_s = await b.task
            m.PREDICT_SECONDS.labels(b.release.channel).observe(b.predict_s)
            owner = b.skey_owner
            self.output.check_state_sizes(b.release, new_states, owner)
            stores = [(b.release.ns, new_states)]
            if b.shadow is not None and b.new_states_s is not None and b.shadow.ns != b.release.ns:
                # the hot standby's own namespace; one that declares the active's (same name and
                # state_schema_version) reads the active's states and never writes them
                stores.append((b.shadow.ns, b.new_states_s))
            for ns, states in stores:
                for sk, st in states.items():
                    p, key = owner[sk]
                    p.store.put(ns, key, st)
