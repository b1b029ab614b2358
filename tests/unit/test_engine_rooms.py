"""The decision logic of the engine's rooms and of the failover controller, with small fakes of
their collaborators (no broker, no model process): the shutdown deadline, the checkpoint's
outcome, rewind and the seeks of pause/resume, the crash-by-record suspects, and the controller's
failover / pause / cap decisions. The guarantees themselves (exactly once, nothing lost, bounded
replay) are tested against the real broker in tests/integration and tests/hostile; these tests
pin the decisions that lead there, where a fake makes the case cheap to state."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, ProducerFenced

from daemon.engine.assignment import Assignment
from daemon.engine.batch import NO_STATE
from daemon.engine.checkpointer import Checkpointer
from daemon.engine.control import BatchSummary
from daemon.engine.deadline import Deadline
from daemon.engine.isolation import CrashIsolation
from daemon.engine.partition import Partition
from daemon.errors import BatchFailed, ReleaseFailure, WorkerCrashed, WorkerTimeout
from tests.unit.test_failover_logic import Clock
from tests.unit.test_standby_keeper import FakeEngine, FakeRelease, controller

TP = TopicPartition("in", 0)


# ---- one shutdown deadline ---------------------------------------------------------------------
def test_deadline_gives_each_step_what_is_left_capped_by_its_share_never_less_than_the_floor():
    clock = Clock()
    d = Deadline(20, clock=clock)
    assert d.left() == 20 and d.left(5) == 5 and d.share(1 / 2) == 10
    clock.t += 18
    assert d.left(5) == 2 and d.share(1 / 2) == 2 and not d.expired
    clock.t += 5
    assert d.expired and d.left() == 0.1  # a step past the deadline still gets to send its abort


async def test_deadline_run_times_out_on_what_is_left():
    d = Deadline(0.05)
    assert await d.run(asyncio.sleep(0, result=7)) == 7
    with pytest.raises(asyncio.TimeoutError):
        await d.run(asyncio.sleep(5))


# ---- fakes of Kafka clients and a partition's store ----------------------------------------------
class FakeConsumer:
    def __init__(self, assigned=(TP,)) -> None:
        self.assigned = set(assigned)
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.paused: set[TopicPartition] = set()

    def assignment(self):
        return set(self.assigned)

    def seek(self, tp, offset) -> None:
        self.seeks.append((tp, offset))

    def pause(self, *tps) -> None:
        self.paused |= set(tps)

    def resume(self, *tps) -> None:
        self.paused -= set(tps)


class FakeStore:
    def __init__(self, fail_commit: bool = False) -> None:
        self.pending = {(b"ns", b"k"): b"1"}
        self.committed_at: int | None = None
        self.discarded = 0
        self.fail_commit = fail_commit

    @property
    def dirty(self) -> bool:
        return bool(self.pending)

    def begin_commit(self):
        changes, self.pending = self.pending, {}
        return {}  # no changelog records: the commit's own steps are what is under test

    def commit(self, position) -> None:
        if self.fail_commit:
            raise OSError("disk full")
        self.committed_at = position

    def discard_pending(self) -> None:
        self.discarded += 1
        self.pending = {}

    def close(self) -> None:
        pass


def done(value=None, exc: BaseException | None = None) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
    return fut


class FakeProducer:
    """A transactional producer whose commit can be refused."""

    def __init__(self, commit_error: BaseException | None = None) -> None:
        self.commit_error = commit_error
        self.calls: list[str] = []

    async def begin_transaction(self) -> None:
        self.calls.append("begin")

    async def send(self, topic, value, key=None):
        self.calls.append(f"send:{topic}")
        return done(types.SimpleNamespace(offset=0))

    async def send_offsets_to_transaction(self, offsets, group) -> None:
        self.calls.append(f"offsets:{offsets[TP]}")

    async def commit_transaction(self) -> None:
        self.calls.append("commit")
        if self.commit_error is not None:
            raise self.commit_error

    async def abort_transaction(self) -> None:
        self.calls.append("abort")

    async def stop(self) -> None:
        self.calls.append("stop")


def partition(producer=None, store=None, committed: int = 10) -> Partition:
    return Partition(tp=TP, store=store or FakeStore(), producer=producer or FakeProducer(), committed=committed)


def rooms(consumer: FakeConsumer | None = None, paused=lambda: False):
    clients = types.SimpleNamespace(consumer=consumer or FakeConsumer(), shared_producer=None)
    assignment = Assignment(clients, types.SimpleNamespace(restoring={}), state_dir=Path("/nonexistent"), eos=True,
                            session_timeout_ms=10000, lock=asyncio.Lock(), stopping=asyncio.Event(),
                            is_paused=paused)
    checkpointer = Checkpointer(clients, assignment, eos=True, group="g", changelog="cl", checkpoint_topic="ckpt",
                                instance_id="test")
    return clients, assignment, checkpointer


def processed(p: Partition, upto: int) -> None:
    """As the emit step leaves a partition after writing records up to ``upto``."""
    p.position = p.highest = p.fetched = upto
    p.uncommitted = upto - p.committed


# ---- the checkpoint returns its outcome ------------------------------------------------------------
async def test_a_committed_checkpoint_moves_the_partition_and_keeps_the_state():
    _, assignment, checkpointer = rooms()
    p = partition()
    assignment.parts[TP] = p
    processed(p, 15)
    p.acks = [done()]
    assert checkpointer.begin([p], {"name": "m"})
    assert checkpointer.in_flight
    outcome = await checkpointer.settle()
    assert outcome is not None and outcome.ok and outcome.status == "committed" and not outcome.failures
    assert p.committed == 15 and p.uncommitted == 0 and not p.in_txn and p.store.committed_at is None
    assert p.producer.calls == ["begin", "send:ckpt", "offsets:15", "commit"]
    assert not checkpointer.in_flight and await checkpointer.settle() is None  # taken once


async def test_nothing_to_commit_begins_nothing():
    _, assignment, checkpointer = rooms()
    p = partition()
    p.store.pending = {}
    assert not checkpointer.begin([p], {}) and not checkpointer.in_flight


async def test_a_refused_write_fails_the_checkpoint_before_it_commits():
    """Step 3: Kafka would commit a transaction one of whose batches was refused."""
    _, assignment, checkpointer = rooms()
    p = partition()
    processed(p, 15)
    p.acks = [done(exc=KafkaTimeoutError())]
    checkpointer.begin([p], {})
    outcome = await checkpointer.settle()
    assert outcome.status == "failed" and isinstance(outcome.failures[0][1], KafkaTimeoutError)
    assert "commit" not in p.producer.calls and p.committed == 10  # the checkpoint did not move


async def test_a_fenced_commit_is_reported_as_fenced_and_a_too_large_write_is_named():
    from aiokafka.errors import MessageSizeTooLargeError

    _, assignment, checkpointer = rooms()
    p = partition(FakeProducer(commit_error=ProducerFenced()))
    processed(p, 12)
    checkpointer.begin([p], {})
    outcome = await checkpointer.settle()
    assert outcome.status == "fenced" and outcome.fenced == [p] and not outcome.too_large
    q = partition(FakeProducer(commit_error=MessageSizeTooLargeError()))
    processed(q, 12)
    checkpointer.begin([q], {})
    outcome = await checkpointer.settle()
    assert outcome.status == "failed" and outcome.too_large and outcome.fenced == []


async def test_a_store_that_cannot_keep_a_committed_checkpoint_is_in_the_outcome():
    _, assignment, checkpointer = rooms()
    p = partition(store=FakeStore(fail_commit=True))
    processed(p, 13)
    checkpointer.begin([p], {})
    outcome = await checkpointer.settle()
    assert outcome.ok and p.committed == 13  # committed in Kafka ...
    assert [(q, type(e)) for q, e in outcome.store_errors] == [(p, OSError)]  # ... the engine must stop


# ---- rewind, fencing, pause and resume --------------------------------------------------------------
async def test_rewind_forgets_the_interval_and_seeks_back_to_the_checkpoint():
    consumer = FakeConsumer()
    _, assignment, _ = rooms(consumer)
    p = partition()
    assignment.parts[TP] = p
    processed(p, 25)
    p.in_txn = True
    assert await assignment.abort_and_rewind() == 15
    assert p.producer.calls == ["abort"] and not p.in_txn and p.store.discarded == 1
    assert (p.position, p.fetched, p.uncommitted) == (10, 10, 0) and consumer.seeks == [(TP, 10)]
    assert assignment.replayed_total == 15


async def test_a_partition_fenced_while_the_interval_was_open_is_dropped_and_its_replay_still_counted():
    consumer = FakeConsumer(assigned=())  # the group moved it meanwhile: no re-open is scheduled
    _, assignment, _ = rooms(consumer)
    p = partition()
    assignment.parts[TP] = p
    processed(p, 18)
    await assignment.drop_fenced(p, "fenced at commit")
    assert TP not in assignment.parts and p.producer.calls == ["stop"]
    assert assignment.rewind(p) == 8 and consumer.seeks == []  # not ours: nothing to seek


async def test_pause_pauses_every_assigned_partition_each_turn_and_resume_rereads_from_the_model():
    consumer = FakeConsumer(assigned=(TP, TopicPartition("in", 1)))
    _, assignment, _ = rooms(consumer)
    p = partition()
    assignment.parts[TP] = p
    processed(p, 14)
    p.fetched = 20  # handed to the model up to 20; written up to 14
    assignment.follow_pause(True)
    assert consumer.paused == consumer.assigned and consumer.seeks == []
    assignment.follow_pause(True)  # a rebalance hands partitions over unpaused: paused again
    assert consumer.paused == consumer.assigned
    assignment.follow_pause(False)
    assert consumer.paused == set() and consumer.seeks == [(TP, 20)]
    assignment.follow_pause(False)
    assert consumer.seeks == [(TP, 20)]  # resumed once, not at every turn
    assignment.unfetch({TP: []})  # fetched while paused: read again from the same place
    assert consumer.seeks[-1] == (TP, 20)


async def test_a_kept_partition_aborts_what_it_began_since_the_revoke_before_it_is_rewound():
    """A fetch that raced the handover began a transaction after the revoke's checkpoint: the
    assignment keeps the partition (the broker's committed offset is still ours), aborts that
    transaction (it must never commit with the replayed records) and rewinds to the checkpoint."""
    consumer = FakeConsumer()

    async def committed(tp):
        return 10

    consumer.committed = committed
    _, assignment, _ = rooms(consumer)
    p = partition(committed=10)
    assignment.parts[TP] = p
    processed(p, 16)
    p.in_txn = True
    assert await assignment.take({TP}, paused=False) == []  # kept, nothing opened
    assert assignment.parts[TP] is p and p.producer.calls == ["abort"] and not p.in_txn
    assert (p.position, p.fetched) == (10, 10) and consumer.seeks == [(TP, 10)]


async def test_records_put_back_seek_only_the_partitions_still_assigned():
    """A fetch put back, or a discarded batch's partitions, during a handover: aiokafka raises on a
    seek of a partition no longer assigned (the assignment, taken next, closes it)."""
    other = TopicPartition("in", 1)
    consumer = FakeConsumer(assigned=(TP,))  # ``other`` was handed over by the rebalance
    _, assignment, _ = rooms(consumer)
    for tp in (TP, other):
        q = Partition(tp=tp, store=FakeStore(), producer=FakeProducer(), committed=10)
        q.fetched, q.position = 12, 11
        assignment.parts[tp] = q
    assignment.unfetch({TP: [], other: []})
    assert consumer.seeks == [(TP, 12)]
    for tp in (TP, other):
        assignment.refetch_from_position(assignment.parts[tp])
    assert consumer.seeks == [(TP, 12), (TP, 11)]


# ---- crash-by-record isolation ------------------------------------------------------------------------
class ProbeWorker:
    def __init__(self, kills: dict[int, type[ReleaseFailure]]) -> None:
        self.kills, self.seen, self.killed, self.closed = kills, [], False, False

    async def process(self, items, states, carry=(), max_output=0):
        offset = int(items[0][1])
        self.seen.append(offset)
        if offset in self.kills:
            raise self.kills[offset](f"died on {offset}")
        return [(0, b"ok")], {}, 0.0

    def kill(self) -> None:
        self.killed = True

    async def close(self, timeout: float = 5.0) -> None:
        self.closed = True


def a_batch(offsets: list[int]):
    refs = [types.SimpleNamespace(topic="in", partition=0, offset=o) for o in offsets]
    items = [(None, str(o).encode(), NO_STATE) for o in offsets]
    return types.SimpleNamespace(refs=refs, items=items, states=[])


def isolation_with(kills: dict[int, type[ReleaseFailure]]):
    loaded: list[tuple[str, ProbeWorker]] = []

    async def loader(path, channel):
        worker = ProbeWorker(kills)
        loaded.append((channel, worker))
        return types.SimpleNamespace(worker=worker, bundle_path=path, ref="m@1")

    active = types.SimpleNamespace(bundle_path=Path("/b/m.fdb"), ref="m@1")
    return CrashIsolation(loader), active, loaded


async def test_a_first_death_with_a_standby_only_remembers_the_suspects():
    iso, active, loaded = isolation_with({5: WorkerCrashed})
    assert await iso.isolate(WorkerCrashed("x"), a_batch([4, 5, 6]), active, no_standby=False) is None
    assert loaded == [] and iso.suspects == {("in", 0, 4), ("in", 0, 5), ("in", 0, 6)}


async def test_a_second_death_on_a_suspect_finds_the_record_and_restarts_the_active():
    iso, active, loaded = isolation_with({5: WorkerTimeout})
    await iso.isolate(WorkerCrashed("x"), a_batch([4, 5, 6]), active, no_standby=False)
    fresh = await iso.isolate(WorkerCrashed("y"), a_batch([5, 6, 7]), active, no_standby=False)
    assert fresh is not None and loaded[-1][0] == "active"
    assert "hung on this record alone" in iso.poison[TP][5]
    probes = [w for ch, w in loaded if ch == "probe"]
    assert probes[0].seen == [5] and probes[1].seen == [6, 7]  # the rest of the batch passes a fresh worker
    assert all(w.killed and w.closed for w in probes)


async def test_a_release_that_dies_on_every_record_is_at_fault_not_a_record():
    iso, active, loaded = isolation_with({4: WorkerCrashed, 5: WorkerCrashed, 6: WorkerCrashed})
    assert await iso.isolate(WorkerCrashed("x"), a_batch([4, 5, 6]), active, no_standby=True) is None
    assert iso.poison == {}  # 4 killed a probe, and so did another of the suspects


async def test_two_records_of_one_batch_that_kill_the_worker_are_both_dead_letters():
    iso, active, loaded = isolation_with({4: WorkerCrashed, 6: WorkerTimeout})
    fresh = await iso.isolate(WorkerCrashed("x"), a_batch([3, 4, 5, 6, 7]), active, no_standby=True)
    assert fresh is not None
    assert sorted(iso.poison[TP]) == [4, 6]
    probes = [w for ch, w in loaded if ch == "probe"]
    assert [p.seen for p in probes] == [[3, 4], [5, 6], [7]]  # a fresh worker after each death


async def test_a_record_that_fails_otherwise_is_not_the_one_that_killed_the_worker():
    iso, active, _ = isolation_with({4: BatchFailed})
    assert await iso.isolate(WorkerCrashed("x"), a_batch([4, 5]), active, no_standby=True) is None
    assert iso.poison == {}


# ---- the failover controller's decisions ---------------------------------------------------------------
def summary(predicted: int, invalid: int = 0, failed: int = 0, seconds: float = 0.01) -> BatchSummary:
    return BatchSummary(release=None, records=predicted, predicted=predicted, predict_seconds=seconds,
                        output_invalid=invalid, model_exceptions=failed)


def test_observer_requests_a_failover_once_a_signal_fires_and_only_one():
    c = controller()
    engine = FakeEngine()
    c.attach(engine)
    for _ in range(4):
        c.observe(summary(1, invalid=1))
        assert engine.pending_failure is None  # fewer than min_samples
    c.observe(summary(0))  # nothing reached the model: not a sample
    assert engine.pending_failure is None
    c.observe(summary(1, invalid=1))
    first = engine.pending_failure
    assert first is not None and first.reason == "output_invalid"
    c.observe(summary(1, invalid=1))
    assert engine.pending_failure is first


def test_a_manual_request_is_ignored_while_paused():
    c = controller()
    engine = FakeEngine()
    c.attach(engine)
    engine.paused = True
    c.request("drill")
    assert engine.pending_failure is None
    engine.paused = False
    c.request("drill")
    assert engine.pending_failure.reason == "manual"


async def test_failover_switches_to_the_standby_and_commits_the_replay_first():
    from tests.unit.test_standby_keeper import engine_on_v2_with_v1_standby

    c = controller()
    engine = engine_on_v2_with_v1_standby()
    c.attach(engine)
    old, standby = engine.active, engine.standby
    checkpoints = []
    engine.checkpoint_soon = lambda: checkpoints.append(True)
    assert await c.failover(engine, "worker_crashed", "died")
    assert engine.active is standby and engine.standby is None and standby.channel == "active"
    assert old.worker.dead and old.worker.closed and checkpoints == [True]
    assert [e["kind"] for e in c.events] == ["failover"] and len(c.policy.history) == 1
    assert engine.hooks == [c._after_checkpoint]


async def test_no_healthy_standby_pauses_and_a_standby_that_arrives_ends_the_pause():
    c = controller()
    engine = FakeEngine(active=FakeRelease(Path("/b/v2.fdb"), pid=2, digest="v2"))
    c.attach(engine)
    assert await c.failover(engine, "worker_crashed", "died")
    assert engine.paused and c.pause_kind == "no_standby" and engine.active.digest == "v2"
    arrived = FakeRelease(Path("/b/v1.fdb"), pid=1, digest="v1")
    engine.install_standby(arrived)
    await c._standby_installed(engine, arrived)
    assert not engine.paused and engine.active is arrived


async def test_the_cap_pauses_instead_of_flapping():
    from tests.unit.test_standby_keeper import engine_on_v2_with_v1_standby

    c = controller(cooldown_ms=0, max_failovers=1)
    engine = engine_on_v2_with_v1_standby()
    c.attach(engine)
    c.policy.record()  # one failover in the window already
    standby = engine.standby
    assert await c.failover(engine, "exception_rate", "too many")
    assert engine.paused and c.pause_kind == "cap" and engine.standby is standby  # nothing switched
    assert c.events[-1]["kind"] == "paused" and c.events[-1]["reason"] == "cap"


# ---- the exception tree ------------------------------------------------------------------------
def test_the_exception_tree_drawing_names_every_failoverd_error():
    import importlib
    import pkgutil

    import daemon
    from daemon import errors

    for mod in pkgutil.walk_packages(daemon.__path__, "daemon."):
        if not mod.name.endswith(("__main__", "worker_main")):
            importlib.import_module(mod.name)
    seen, todo = set(), [errors.FailoverdError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if not sub.__name__.startswith("_"):
                seen.add(sub.__name__)
            todo.append(sub)
    missing = sorted(name for name in seen if f"── {name}" not in errors.__doc__)
    assert not missing, f"daemon/errors.py's drawing lacks {missing}"
