"""The data path's loop and lifecycle: fetch ─ predict ─ emit ─ checkpoint, exactly once.

One asyncio task runs the loop (:meth:`Engine.run`); the rebalance listener, the failure handler
and every control call that changes releases take the same lock, so a batch, a checkpoint, a
handover and a failover never interleave. Model code runs in the worker (subprocess or executor
thread), never on the event loop. Each step has its own room:

- :mod:`~daemon.engine.connections` the Kafka clients; :mod:`~daemon.engine.assignment` the owned
  partitions (assignment, fencing, rewind, pause); :mod:`~daemon.engine.restore` state restore;
- :mod:`~daemon.engine.pipeline` batches through the model; :mod:`~daemon.engine.shadow` the hot
  standby; :mod:`~daemon.engine.output` outputs and dead letters; :mod:`~daemon.engine.isolation`
  records that kill the model process;
- :mod:`~daemon.engine.checkpointer` the checkpoint, which returns its outcome as a value;
  :mod:`~daemon.engine.rescore` corrections after a rollback.

The rest of the daemon steers the engine only through :class:`~daemon.engine.control.EngineControl`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from daemon import clients
from daemon import metrics as m
from daemon.engine import limits
from daemon.engine import records as tolerant
from daemon.engine.assignment import Assignment, RebalanceListener
from daemon.engine.checkpoint import CheckpointPolicy
from daemon.engine.checkpointer import Checkpointer
from daemon.engine.connections import EngineClients
from daemon.engine.control import BatchSummary, Change, ControlSurface, EngineControl
from daemon.engine.deadline import Deadline
from daemon.engine.isolation import PROCESS_DEATHS, CrashIsolation, Loader
from daemon.engine.output import Output
from daemon.engine.pipeline import Batch, Pipeline
from daemon.engine.release import LoadedRelease
from daemon.engine.rescore import rescore
from daemon.engine.restore import Restorer
from daemon.errors import CheckpointFailed, ConfigError, ReleaseFailure

log = logging.getLogger("failoverd.engine")

FailureHandler = Callable[[EngineControl, ReleaseFailure], Awaitable[bool]]
BatchObserver = Callable[[BatchSummary], None]
ChangeHandler = Callable[[EngineControl, Change], Awaitable[None]]

CLOSE_BUDGET_S = 20.0
"""Shutdown: the final checkpoint, aborts, clients and workers (systemd's TimeoutStopSec is 30 s)."""
ABORT_S = 5.0
"""A handover past its deadline: the aborts that end our transactions."""
WAKEABLE_S = 0.005
"""A fetch that may wait this long or longer is raced against :meth:`Engine.wake` (a shorter one
is not worth the extra task: the loop comes back within it anyway)."""


class Engine(ControlSurface):
    def __init__(self, settings: Any, *, active: LoadedRelease | None, standby: LoadedRelease | None = None,
                 instance_id: str | None = None, on_failure: FailureHandler | None = None,
                 observers: list[BatchObserver] | None = None, on_change: ChangeHandler | None = None,
                 loader: Loader | None = None) -> None:
        s = self.s = settings
        super().__init__(settings, active, standby, instance_id)
        self.on_failure = on_failure
        self.observers = observers or []
        self.on_change = on_change
        self.hot = s.failover.standby_mode == "hot"
        self.eos = bool(s.checkpoint.exactly_once)
        self.policy = CheckpointPolicy(s.checkpoint.interval_ms, s.checkpoint.interval_records)
        self.failure: ReleaseFailure | None = None
        self.fatal: BaseException | None = None
        """An error the engine cannot continue after (e.g. a partition could not be opened)."""
        self.assigned_once = asyncio.Event()
        self.last_checkpoint: float | None = None
        self._handovers = 0
        """Rebalance callbacks begun: a fetch that returns across one is stale (:meth:`run`)."""
        self.clients = EngineClients(s)
        self.restore = Restorer(self.clients, s.state.changelog_topic)
        self.assignment = Assignment(self.clients, self.restore, state_dir=s.state.directory, eos=self.eos,
                                     session_timeout_ms=s.kafka.session_timeout_ms, lock=self.lock,
                                     stopping=self.stopping, is_paused=lambda: self._paused)
        self.checkpointer = Checkpointer(self.clients, self.assignment, eos=self.eos, group=s.kafka.group_id,
                                         changelog=s.state.changelog_topic, checkpoint_topic=s.checkpoint.topic,
                                         instance_id=self.instance_id,
                                         write_timeout=s.kafka.request_timeout_ms / 1000)
        self.output = Output(out_topic=s.output.topic, dlq_topic=s.dead_letter.topic,
                             changelog=s.state.changelog_topic, max_value=s.dead_letter.max_value_bytes)
        self.isolation = CrashIsolation(loader)
        self.pipeline = Pipeline(self.assignment, self.output, self.checkpointer, self.isolation, self.agreement,
                                 emit=lambda b: self._emit(b))
        self._exit_watch: tuple[Any, asyncio.Task[None]] | None = None
        self._changelog_partitions = 0  # read at start, again when an input partition outgrows it

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to Kafka; on failure everything started so far is stopped again (retry-safe)."""
        s = self.s
        m.init_labels()
        tolerant.install()  # a record the client cannot parse becomes a dead letter, not a crash loop
        self._set_limits(await limits.read(self.clients.common, [s.output.topic, s.dead_letter.topic,
                                                                 s.state.changelog_topic, s.checkpoint.topic]))
        listener = RebalanceListener(self._on_revoked, self._on_assigned, self.stopping, self._fatal)
        await self.clients.start(listener, self.output.limits.batch_bytes)
        try:
            parts = self.clients.partitions_of
            inputs = {t: await parts(t) for t in s.inputs.topics}
            self.output.configure(out_partitions=await parts(s.output.topic),
                                  dlq_partitions=await parts(s.dead_letter.topic), input_partitions=inputs)
            self._changelog_partitions = await parts(s.state.changelog_topic)
            self._check_state_width(max(inputs.values()) - 1)
        except BaseException:
            await self.clients.discard()
            raise
        self.publish_release_info()

    def _set_limits(self, found: limits.Limits) -> None:
        self.output.limits = found
        self.assignment.batch_bytes = found.batch_bytes

    def stop(self) -> None:
        self.stopping.set()
        self.wake()

    def _fatal(self, exc: BaseException) -> None:
        self.fatal = exc
        self.stop()

    async def run(self) -> None:
        """Process until :meth:`stop`; then checkpoint (or abort) and close everything."""
        consumer = self.assignment.consumer
        try:
            while not self.stopping.is_set():
                self.assignment.follow_pause(self._paused)
                if self._paused or not self.partitions:
                    wait = 0.2
                elif self.pipeline.busy:
                    wait = 0.001  # the model is busy or outputs wait for a commit: come back soon
                else:
                    wait = self.policy.time_left() if self.policy.records else 0.5
                handovers = self._handovers
                data = await self._fetch(consumer, wait)
                async with self.lock:
                    if self.stopping.is_set():
                        break
                    if handovers != self._handovers and data:
                        # fetched across a handover: before it (stale: the revoke checkpointed and
                        # the assignment rewound or gave the partition away since) or after its
                        # seeks. Put back: each partition is read again from where it stands
                        self.assignment.unfetch(data)
                        data = {}
                    await self._turn(data)
            clean = True
        except BaseException as exc:
            clean = False
            if not isinstance(exc, asyncio.CancelledError):
                log.critical("the loop stopped on an unexpected error; nothing since the last checkpoint "
                             "commits", extra={"error": repr(exc)})
                self.fatal = self.fatal or exc
            raise
        finally:
            self._watch_exit(None)
            await self.close(commit=clean)

    async def _fetch(self, consumer: Any, wait: float) -> dict[TopicPartition, list[Any]]:
        """``getmany`` for up to ``wait`` seconds, cut short by :meth:`wake` (the active model
        process exited, a failover was requested, or a stop): a dead worker is handled the moment it
        exits, not when the next batch would have been sent to it. Cancelling ``getmany`` while it
        waits loses nothing: aiokafka hands out buffered records only when it returns them."""
        limit = self.s.worker.max_batch_records
        self._watch_exit(self._active.worker if self._active is not None else None)
        if wait < WAKEABLE_S:
            data: dict[TopicPartition, list[Any]] = await consumer.getmany(timeout_ms=max(1, int(wait * 1000)),
                                                                           max_records=limit)
            return data
        if self._woken:
            self._woken = False
            return {}
        woken = self._wake = asyncio.get_running_loop().create_future()
        fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=int(wait * 1000), max_records=limit))
        try:
            await asyncio.wait((fetch, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wake = None
            if not fetch.done():
                fetch.cancel()
                await asyncio.wait((fetch,))
        if fetch.cancelled():
            self._woken = False
            return {}
        got: dict[TopicPartition, list[Any]] = fetch.result()
        return got

    def _watch_exit(self, worker: Any) -> None:
        """Keep one task awaiting the exit of ``worker`` (the active's), which wakes the loop."""
        if self._exit_watch is not None:
            if self._exit_watch[0] is worker:
                return
            self._exit_watch[1].cancel()
            self._exit_watch = None
        if worker is not None and not worker.dead:
            async def exited() -> None:
                await worker.wait_exit()
                self.wake()

            self._exit_watch = (worker, asyncio.create_task(exited(), name="active-worker-exit"))

    async def _turn(self, data: dict[TopicPartition, list[Any]]) -> None:
        """One turn of the loop, under the lock."""
        self._watch_active()  # a model process that exited since the last turn is a failure now
        if self._pending_failure is not None and not self._paused:
            exc, self._pending_failure = self._pending_failure, None
            if isinstance(exc, PROCESS_DEATHS) and self.pipeline.inflight:
                # A worker found dead (its exit, watched) with batches in flight: the answers it
                # sent before it died still count, and the batch it died on is the first one it
                # left unanswered, which _guard blames (crash isolation probes that batch's records).
                dead = self._active
                await self._guard(self.pipeline.drain())
                if self._active is not dead or self._paused or self.stopping.is_set():
                    return  # handled there
            await self.pipeline.discard()
            if isinstance(exc, PROCESS_DEATHS) and self._active is not None:
                self._active.worker.dead = True  # exited: never sent another request
            await self._release_failed(exc, None)  # it died between batches: no batch to blame
            return
        if data and self._paused:
            self.assignment.unfetch(data)  # fetched before the pause took hold: read again on resume
        elif data:
            await self._guard(self._feed(data))
        elif self.pipeline.inflight:
            await self._drain()
        if self.pipeline.held and not self.checkpointer.busy:
            await self._guard(self.pipeline.write(None))  # the commit ended: write held batches
        if self._checkpoint_asap and self.policy.records:
            self._checkpoint_asap = False
            await self.checkpoint()  # after a failover: committed before anything else
        elif self.policy.due():
            await self._close_interval()  # commits while the model computes the next batches
        if self._pending_change is not None and self.on_change is not None:
            change, self._pending_change = self._pending_change, None
            await self._drain()
            await self.checkpoint()  # a release change takes effect at a checkpoint boundary
            await self.on_change(self, change)
        self._update_lag()
        self._watch_standby()
        self._watch_active()
        m.READY.set(1 if self.ready()[0] else 0)

    async def close(self, deadline: float = CLOSE_BUDGET_S, commit: bool = True) -> None:
        """Final checkpoint unless a release failed (then abort), then close clients and workers,
        every step within one shared :class:`Deadline`. ``commit=False`` (the loop ended on an
        error or was cancelled mid-step, maybe between storing a batch's states and writing its
        outputs): abort, never commit what the interval holds."""
        self._closing = True
        budget = Deadline(deadline)
        try:
            await asyncio.wait_for(self.lock.acquire(), budget.share(1 / 2))
            locked = True
        except asyncio.TimeoutError:
            locked = False  # a step holding the lock is stuck (broker down): close around it
        try:
            try:
                if self.checkpointer.in_flight:
                    await budget.run(self._settle(), budget.seconds / 4)
                if locked and commit and self.failure is None and not self._paused and self.fatal is None:
                    await budget.run(self._drain(), budget.seconds / 4)
                    await budget.run(self.checkpoint(), budget.seconds / 2)
                else:
                    await budget.run(self.pipeline.discard(), budget.seconds / 4)
            except Exception as exc:  # noqa: BLE001 - shutdown goes on; nothing uncommitted is visible
                log.warning("final checkpoint failed; aborting", extra={"error": repr(exc)})
            self.checkpointer.cancel()  # stuck (broker down): the aborts below end its transactions
            await self.assignment.close_all(budget.left(5))
        finally:
            if locked:
                self.lock.release()
        await self.clients.stop(budget)
        for rel in (self._active, self._standby):
            if rel is not None:
                await rel.worker.close(timeout=budget.left(3))
        m.READY.set(0)

    async def rescore(self, since: dict[TopicPartition, int], label: str) -> int:
        """Corrections for committed inputs from ``since`` (daemon.engine.rescore)."""
        await self._settle()
        assert self._active is not None
        return await rescore(since, label, rel=self._active, clients=self.clients, assignment=self.assignment,
                             output=self.output, checkpointer=self.checkpointer,
                             max_batch_records=self.s.worker.max_batch_records)

    # ---- rebalances ---------------------------------------------------------------------------
    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Checkpoint what was processed before the partitions move, within the group's rebalance
        timeout (the session timeout); past it, abort the interval: the next owner replays it."""
        self._handovers += 1  # before the lock: a fetch waiting for it is stale (run)
        async with self.lock:
            budget = Deadline(max(10.0, self.s.kafka.session_timeout_ms / 1000))
            try:
                await budget.run(self._settle())
                await self._drain()  # never cut short (a reply would stay in the pipe): predict_timeout bounds it
                if any(tp in self.partitions for tp in revoked):
                    try:
                        await budget.run(self.checkpoint())
                    except asyncio.TimeoutError:
                        raise
                    except Exception as exc:  # noqa: BLE001
                        log.warning("checkpoint before handover failed", extra={"error": repr(exc)})
            except asyncio.TimeoutError:
                log.error("checkpoint before handover did not end in time; aborting the interval",
                          extra={"seconds": budget.seconds})
                self.checkpointer.cancel()
                await self.pipeline.discard()
                await self.assignment.abort_and_rewind(timeout=ABORT_S)
                self.policy.reset()
            m.READY.set(0)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._handovers += 1
        async with self.lock:
            await self._settle()
            await self.pipeline.discard()  # batches of a fetch that raced the handover: read again
            await self._follow_input_widths(assigned)
            opened = await self.assignment.take(assigned, self._paused)
            self._note_release_start(opened)
            self.policy.reset()
            self.assigned_once.set()
            m.READY.set(1 if self.ready()[0] else 0)

    async def _follow_input_widths(self, assigned: set[TopicPartition]) -> None:
        """Partitions were added to an input topic (the group rebalanced onto them): outputs stop
        keeping the input partition unless the output topic is as wide, and the changelog must be
        at least as wide (input partition p keeps its state in changelog partition p)."""
        consumer = self.assignment.consumer
        widths = {t: len(consumer.partitions_for_topic(t) or ()) for t in self.s.inputs.topics}
        self.output.set_input_partitions({t: n for t, n in widths.items() if n})
        widest = max((tp.partition for tp in assigned), default=-1)
        if widest >= self._changelog_partitions:
            await clients.refresh_metadata(self.clients.restorer)  # partitions added to it meanwhile?
            self._changelog_partitions = await self.clients.partitions_of(self.s.state.changelog_topic)
        self._check_state_width(widest)

    def _check_state_width(self, widest: int) -> None:
        if widest >= self._changelog_partitions:
            changelog = self.s.state.changelog_topic
            raise ConfigError(
                f"state.changelog_topic {changelog!r} has {self._changelog_partitions} partitions but input "
                f"partition {widest} needs changelog partition {widest}: input partition p keeps its state in "
                f"changelog partition p. Add partitions to {changelog!r} (its spec, then `failoverd topics apply`) "
                "to at least the widest input topic's count")

    # ---- batches ------------------------------------------------------------------------------
    async def _feed(self, data: dict[TopicPartition, list[Any]]) -> None:
        assert self._active is not None
        sb = self._standby
        shadow = sb if self.hot and sb is not None and not sb.worker.dead else None
        await self.pipeline.feed(data, self._active, shadow)

    async def _drain(self) -> None:
        """Finish the batches in flight (outputs written), e.g. before a handover or a release change."""
        if self.pipeline.busy:
            await self._guard(self.pipeline.drain())

    async def _guard(self, step: Awaitable[None]) -> None:
        try:
            await step
        except CheckpointFailed:
            pass  # _settle already dropped what was not written and rewound every partition
        except KafkaError as exc:
            # producing failed (broker trouble, or fenced): nothing of the interval commits
            log.warning("producing a batch failed; rewinding to the last checkpoint", extra={"error": repr(exc)})
            m.CHECKPOINT_ABORTS.labels("write_failed").inc()
            await self.pipeline.discard()
            await self.rewind_all()
        except ReleaseFailure as exc:
            # a worker that died or hung did so on the oldest batch in flight (it answers in order)
            failing = self.pipeline.oldest() if isinstance(exc, PROCESS_DEATHS) else None
            await self.pipeline.discard()
            await self._release_failed(exc, failing)  # rewinds; the next fetch replays from the checkpoint

    async def _emit(self, b: Batch) -> None:
        """Write the batch's outputs and dead letters; only then does its input count as processed."""
        if self.checkpointer.in_flight and not await self._settle():
            raise CheckpointFailed("the checkpoint committed in the background failed")
        t0 = time.monotonic()
        done = await self.output.emit(b, self.assignment, self.checkpointer)
        self.policy.add(done.processed)  # written, so due for a checkpoint
        m.BATCH_SECONDS.observe(time.monotonic() - t0 + b.predict_s)
        if self.observers:
            summary = BatchSummary(b.release, len(b.refs) + len(b.direct), done.predicted, b.predict_s,
                                   done.output_invalid, done.model_exceptions)
            for observe in self.observers:
                observe(summary)
        if self._pending_failure is not None:
            exc, self._pending_failure = self._pending_failure, None
            raise exc  # a rate signal fired: this batch's outputs are aborted with the interval

    # ---- checkpoints --------------------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Commit everything processed so far and wait for the outcome."""
        if await self._close_interval():
            await self._settle()

    async def _close_interval(self) -> bool:
        """Write held batches, wait for the previous commit, start committing this interval
        (a checkpoint covers exactly the batches whose outputs and states it carries)."""
        if self.pipeline.held:
            await self._guard(self.pipeline.write(None, wait=True))
        if not await self._settle() or self.pipeline.held:
            return False
        self.policy.reset()
        info = self._active.info if self._active is not None else {}
        return self.checkpointer.begin(list(self.partitions.values()), info)

    async def _settle(self) -> bool:
        """Wait for the checkpoint in flight and act on its outcome. False if a partition's commit
        failed: then the batches in flight or held are dropped, a fenced partition is dropped, and
        every partition rewinds to its last checkpoint."""
        outcome = await self.checkpointer.settle()
        if outcome is None:
            return True
        for _, exc in outcome.store_errors:  # committed, but the local store could not keep it
            self.fatal = exc
            self.stop()
        if outcome.ok:
            self.last_checkpoint = outcome.time
            m.CHECKPOINTS.inc()
            m.LAST_CHECKPOINT_TIMESTAMP.set(outcome.time)
            m.CHECKPOINT_SECONDS.observe(outcome.seconds)
            for hook in self._checkpoint_hooks:
                hook()
            return True
        # nothing written after the checkpoint may commit: drop what is in flight or held (held
        # batches stored states of the next interval) and rewind every partition
        await self.pipeline.discard()
        for p, exc in outcome.failures:
            if isinstance(exc, asyncio.CancelledError):
                raise exc
            if isinstance(exc, ProducerFenced):
                await self.assignment.drop_fenced(p, "fenced at commit")
            else:
                log.warning("checkpoint failed; rewinding to the last checkpoint",
                            extra={"partition": f"{p.tp.topic}:{p.tp.partition}", "error": repr(exc)})
                m.CHECKPOINT_ABORTS.labels("error").inc()
        await self.rewind_all()
        if outcome.too_large:
            # a topic's max.message.bytes went down since start: what no longer fits becomes a
            # dead letter from the replay on (output_oversized), instead of failing again
            self._set_limits(await limits.read(self.clients.common, list(self.output.limits.max_bytes)))
            log.warning("a write was refused as too large; topic limits re-read",
                        extra={"limits": self.output.limits.max_bytes})
        return False

    async def rewind_all(self) -> int:
        """Abort every open transaction and seek every partition to its last checkpoint."""
        await self._settle()
        replay = await self.assignment.abort_and_rewind()
        self.policy.reset()
        return replay

    # ---- failures -----------------------------------------------------------------------------
    async def _release_failed(self, exc: ReleaseFailure, failing: Batch | None = None) -> None:
        """Abort the open interval; let the failure handler decide (switch, pause, or stop).
        ``failing``: the batch a worker died or hung on, if known (daemon.engine.isolation)."""
        assert self._active is not None
        self._failed_at = time.monotonic()  # a failover's duration counts from here
        m.MODEL_ERRORS.labels(self._active.channel, exc.reason).inc()
        log.error("release failed", extra={"release": self._active.ref, "reason": exc.reason, "error": str(exc)})
        self._last_replay = await self.rewind_all()
        if failing is not None and await self._isolate(exc, failing):
            return  # one record was to blame: it is a dead letter now, the release goes on
        if self.on_failure is not None and await self.on_failure(self, exc):
            return  # the handler switched or paused; the next fetch replays from the checkpoint
        self.failure = exc
        self.stopping.set()

    async def _isolate(self, exc: ReleaseFailure, batch: Batch) -> bool:
        """A record of ``batch`` kills the model process: go on with a fresh worker of the active."""
        active, sb = self._active, self._standby
        assert active is not None
        # nothing to fail over to (cold mode loads its standby at failover time)
        no_standby = self.s.failover.standby_mode != "cold" and (sb is None or sb.worker.dead)
        fresh = await self.isolation.isolate(exc, batch, active, no_standby)
        if fresh is None:
            return False
        self._active = fresh
        active.worker.kill()
        await active.worker.close(timeout=1.0)
        self.publish_release_info()
        return True

