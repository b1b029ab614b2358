"""``[worker] processes = N``: one release served by N model processes (docs/configuration.md).

One worker process runs the model on one core. A :class:`WorkerPool` is a
:class:`~daemon.engine.worker.Worker` over N :class:`~daemon.engine.worker.SubprocessWorker` of
the same bundle, so the engine, the hot standby, the failover controller and the standby keeper use
it exactly as they use one worker.

Each batch is split by a stable hash of the record key (:func:`member_of`): every key always goes
to the same process, so a key's records keep their order within it and its state never leaves it.
Keyless records (no state) are spread round-robin. Each process gets its share of the batch with
its own dense state-key numbering; the answers are put back at the items' original positions and
state keys, and the batch's time is the slowest share's.

Carry (:meth:`daemon.engine.batch.BatchProcessor.process`): the pipeline sends batch N+1 before N's
new states are stored and names, for each key N also had, the state key it had in N. Within the
pool that state lives in the process that had the key in N -- the same process, since the key hashes
to it -- under the state key *that process's share* of N gave it. So the pool remembers, for the
previous batch, where each of its state keys went (process, local state key), and rewrites every
carry pair into the share's numbering. A share is sent only to the process it belongs to; a process
that gets no share of a batch keeps what it had, which no later batch can carry from (a carried key
was in the previous batch, so its process had a share of it).

A release is one thing: a process that dies, hangs, breaks the protocol or runs out of memory is
the whole release failing. Every process is killed and the member's own error is raised
(:class:`~daemon.errors.WorkerCrashed`, ...), so failover replaces all of a release's processes --
once the batches sent before the failing one have been answered (the failed process had answered
its shares of them), so that the batch blamed for a death is the one it happened on, as with one
worker (:mod:`daemon.engine.isolation`).
A :class:`~daemon.errors.BatchFailed` (predict raised for a whole share, the process is fine)
leaves the processes running, as it leaves one worker running: the failure controller replays the
batch from the checkpoint with the same release until the error rate says otherwise.

Resource limits (:class:`~daemon.engine.worker.Boundary`) apply to each process: ``memory_mb`` is
per process, so a release may use up to N times it. The poison-record limits
(``failover.isolate_max_records`` and ``_fraction``) apply to each process's share of a batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Any

from daemon.engine.batch import NO_STATE
from daemon.engine.worker import Answer, Carry, Item, SubprocessWorker
from daemon.errors import BatchFailed, BundleError, ReleaseFailure, WorkerCrashed

log = logging.getLogger("failoverd.worker")

__all__ = ["Share", "WorkerPool", "member_of", "merge", "split"]


def member_of(key: bytes | None, n: int) -> int:
    """The process (0 .. n-1) a key belongs to: CRC-32 of its bytes, the same in every daemon and
    every run (Python's ``hash`` of bytes is salted per process)."""
    return zlib.crc32(key or b"") % n


@dataclasses.dataclass
class Share:
    """One process's part of a batch."""

    items: list[Item] = dataclasses.field(default_factory=list)
    """The batch's items for this process, in batch order, with local state keys."""
    positions: list[int] = dataclasses.field(default_factory=list)
    """Index in the batch of each of ``items``."""
    skeys: list[int] = dataclasses.field(default_factory=list)
    """Local state key -> the batch's state key."""
    carry: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """(local state key, local state key in this process's share of the previous batch)."""

    def states(self, states: list[bytes | None]) -> list[bytes | None]:
        return [states[g] for g in self.skeys]


Placement = tuple[list[int], list[int]]
"""Where a batch's state keys went: (process by state key, local state key by state key); -1: none."""


def split(items: list[Item], n: int, carry: Carry = (), previous: Placement | None = None,
          ) -> tuple[list[Share], Placement]:
    """``items`` as ``n`` shares by key (module docstring), with ``carry`` rewritten into each
    share's numbering from ``previous`` (what :func:`split` returned for the batch before). Returns
    the shares and this batch's placement (the next batch's ``previous``)."""
    shares = [Share() for _ in range(n)]
    size = 1 + max((s for _, _, s in items), default=-1)
    where = [-1] * size
    local = [-1] * size
    spread = 0
    for i, (key, value, skey) in enumerate(items):
        if skey < 0:  # NO_STATE: no state, any process will do
            share = shares[spread % n]
            spread += 1
            share.items.append((key, value, NO_STATE))
            share.positions.append(i)
            continue
        m = where[skey]
        if m < 0:
            m = where[skey] = zlib.crc32(key or b"") % n
            share = shares[m]
            local[skey] = len(share.skeys)
            share.skeys.append(skey)
        else:
            share = shares[m]
        share.items.append((key, value, local[skey]))
        share.positions.append(i)
    if carry:
        if previous is None:
            raise BatchFailed("a batch carries state from a previous batch the worker pool did not split "
                              "(the previous batch failed)")
        before_where, before_local = previous
        for skey, prev in carry:
            m = where[skey] if 0 <= skey < size else -1
            if m < 0 or not 0 <= prev < len(before_where) or before_where[prev] != m:
                # the same key hashes to the same process in every batch: a mismatch is a bug, not data
                raise BatchFailed(f"carry ({skey}, {prev}) names a state key the batches did not place in "
                                  f"one process")
            shares[m].carry.append((local[skey], before_local[prev]))
    return shares, (where, local)


def merge(size: int, shares: list[Share], answers: list[Answer | None]) -> Answer:
    """The shares' answers as one answer to the whole batch of ``size`` items (``None``: a share
    that was not sent, having no items)."""
    results: list[tuple[Any, ...]] = [()] * size
    new_states: dict[int, bytes | None] = {}
    seconds = 0.0
    for share, answer in zip(shares, answers):
        if answer is None:
            continue
        part, states, took = answer
        for pos, result in zip(share.positions, part):
            results[pos] = result
        back = share.skeys
        for sk, st in states.items():
            new_states[back[sk]] = st
        seconds = max(seconds, took)
    return results, new_states, seconds


class WorkerPool:
    """N subprocess workers of one release behind the one-worker interface (module docstring)."""

    def __init__(self, bundle_path: Path, unpack_dir: Path | None, *, processes: int, label: str = "model",
                 **kw: Any) -> None:
        if processes < 1:
            raise ValueError(f"a worker pool needs at least one process, not {processes}")
        self.bundle_path = Path(bundle_path)
        self.members = [SubprocessWorker(bundle_path, unpack_dir, label=label, **kw) for _ in range(processes)]
        self.info: dict[str, Any] = {}
        self._label = label
        self._dead = False
        self._first: SubprocessWorker | None = None
        """The member that failed or exited first: its exit code is the pool's."""
        self._previous: Placement | None = None
        """Where the last batch's state keys went (what the next batch may carry from)."""
        self._calls = 0
        self._open: dict[int, asyncio.Future[None]] = {}
        """Batches in flight by call number: done when the call has returned or raised."""

    # ---- what the engine reads -------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        self._label = value
        for m in self.members:
            m.label = value

    @property
    def dead(self) -> bool:
        return self._dead or any(m.dead for m in self.members)

    @dead.setter
    def dead(self, value: bool) -> None:
        self._dead = value

    @property
    def pid(self) -> int | None:
        """The first process's (:attr:`pids` has them all)."""
        return self.members[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [m.pid for m in self.members]

    @property
    def returncode(self) -> int | None:
        """The exit code of the first process that exited (None while all run)."""
        first = self._first
        if first is not None and first.returncode is not None:
            return first.returncode
        for m in self.members:
            if m.returncode is not None:
                self._first = first or m
                return m.returncode
        return None

    async def wait_exit(self) -> int | None:
        """Return when any process exits (its code): the release cannot go on without it."""
        waits = [asyncio.create_task(m.wait_exit()) for m in self.members]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        exited = next(m for m, w in zip(self.members, waits) if w in done)
        self._first = self._first or exited
        return exited.returncode

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        """Start every process at once (they share the release environment, built once under its
        lock); if one cannot load, none is kept."""
        try:
            got = await asyncio.gather(*(m.start() for m in self.members), return_exceptions=True)
        except BaseException:  # cancelled (the daemon stops while the release loads): nothing stays behind
            self.kill()
            raise
        failed = [g for g in got if isinstance(g, BaseException)]
        if not failed:
            digests = {str(g["digest"]) for g in got if isinstance(g, dict)}
            if len(digests) != 1:
                failed.append(BundleError(f"{self.label}: the processes of {self.bundle_path} loaded different "
                                          f"releases ({', '.join(sorted(digests))})"))
        if failed:
            self.kill()
            await asyncio.gather(*(m.close(timeout=1.0) for m in self.members), return_exceptions=True)
            first = failed[0]
            if isinstance(first, (BundleError, asyncio.CancelledError)):
                raise first
            raise BundleError(f"{self.label}: starting the processes of {self.bundle_path} failed: "
                              f"{type(first).__name__}: {first}")
        info = got[0]
        assert isinstance(info, dict)
        self.info = info
        log.info("worker pool ready", extra={"release": f"{info['name']}@{info['version']}", "channel": self.label,
                                             "pids": self.pids})
        return self.info

    async def process(self, items: list[Item], states: list[bytes | None],
                      carry: Carry = (), max_output: int = 0) -> Answer:
        # split before the first await: the batches' placements follow the order of the calls,
        # which is the order each process receives its shares in
        if self.dead:
            raise WorkerCrashed(f"{self.label} worker pool (pids {self.pids}) is not running")
        previous, self._previous = self._previous, None
        shares, placement = split(items, len(self.members), carry, previous)
        self._previous = placement
        calls: dict[asyncio.Task[Answer], int] = {}
        for n, (member, share) in enumerate(zip(self.members, shares)):
            if share.items:
                fut = asyncio.create_task(member.process(share.items, share.states(states), share.carry,
                                                         max_output))
                calls[fut] = n
        if not calls:
            return [], {}, 0.0
        seq = self._calls
        self._calls += 1
        finished = asyncio.get_running_loop().create_future()
        self._open[seq] = finished
        try:
            answers, death, failure = await self._answers(seq, calls, len(shares))
        except asyncio.CancelledError:
            for fut in calls:
                fut.cancel()
            raise
        finally:
            del self._open[seq]
            finished.set_result(None)
        if death is not None:
            raise death
        if failure is not None:
            raise failure  # a process whose share failed has nothing to carry from: it refuses a carry itself
        return merge(len(items), shares, answers)

    async def _answers(self, seq: int, calls: dict[asyncio.Task[Answer], int], size: int
                       ) -> tuple[list[Answer | None], ReleaseFailure | None, BaseException | None]:
        """Every share's answer (by process), or the release's failure: the first process that died,
        hung or misbehaved (then all are killed), else the first other error (BatchFailed).

        A process that fails on its share of this batch answered its shares of the batches sent
        before (answers come in order), and the other processes are still computing theirs: those
        earlier batches are let finish before the processes are killed, as one worker would have
        answered them, so the engine blames the batch the process died on (crash isolation), not
        the one before it. The wait is at most the rest of one batch (bounded by the predict timeout)."""
        answers: list[Answer | None] = [None] * size
        death: ReleaseFailure | None = None
        failure: BaseException | None = None
        pending = set(calls)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is None:
                    answers[calls[fut]] = fut.result()
                elif isinstance(exc, ReleaseFailure) and not isinstance(exc, BatchFailed):
                    if death is None:  # the first process to die, hang or misbehave: the release's error
                        death = exc
                        self._first = self._first or self.members[calls[fut]]
                        self._dead = True  # no batch is sent from now on
                        earlier = [f for s, f in self._open.items() if s < seq]
                        if earlier:
                            await asyncio.wait(earlier)
                        self.kill()  # the others' answers to this batch will not be used: end them now
                elif failure is None:
                    failure = exc
        return answers, death, failure

    async def health(self) -> bool:
        if self.dead:
            return False
        got = await asyncio.gather(*(m.health() for m in self.members), return_exceptions=True)
        return all(g is True for g in got)

    def kill(self) -> None:
        """SIGKILL to every process's group; the pool is dead afterwards."""
        self._dead = True
        for m in self.members:
            m.dead = True
            m.kill()

    async def close(self, timeout: float = 5.0) -> None:
        await asyncio.gather(*(m.close(timeout) for m in self.members), return_exceptions=True)
