"""``[worker] processes = N`` (daemon.engine.pool): a batch split by key over N model processes.

The split and the merge are checked as pure logic against one BatchProcessor running the whole
stream (per-key counts must come out the same, batch after batch, with the carry of a pipeline
that sends batch N+1 before N's states are stored); the pool's failure rules with in-process
stand-ins; and the real thing: a pool of two worker processes of a built bundle, pipelined, then
one of them killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon import config
from daemon.engine import pool as pool_mod
from daemon.engine.batch import NO_STATE, OK, BatchProcessor
from daemon.engine.pool import WorkerPool, member_of, merge, split
from daemon.engine.worker import InProcessWorker, SubprocessWorker, make_worker
from daemon.errors import BatchFailed, ConfigError, WorkerCrashed, WorkerTimeout
from daemon.model import Prediction

SCHEMA = {"type": "object"}


class Counter:
    """Counts records per key; the output names the key, the count and the record's seq."""

    def predict(self, batch: list[Any]) -> list[Prediction]:
        out = []
        for r in batch:
            n = (r.state or {}).get("n", 0) + 1
            if r.value.get("boom"):
                raise RuntimeError("boom")
            out.append(Prediction({"key": r.key, "n": n, "seq": r.value["seq"]}, {"n": n} if r.key else None))
        return out


def processor() -> BatchProcessor:
    return BatchProcessor(Counter(), SCHEMA, SCHEMA)


class Stream:
    """What the pipeline does (daemon/engine/pipeline.py, prepare/collect): a batch is built while
    the batch before it is still in flight (its states not stored): a key that batch has is
    carried instead of read from the store."""

    def __init__(self, seed: int, keys: int = 12) -> None:
        self.rng = random.Random(seed)
        self.keys = [f"k{i}".encode() for i in range(keys)]
        self.store: dict[bytes, bytes | None] = {}
        self.seq = 0
        self.previous: dict[bytes, int] | None = None
        self.expected: dict[bytes, int] = {}

    def batch(self, size: int) -> tuple[list[tuple[bytes | None, bytes, int]], list[bytes | None],
                                        list[tuple[int, int]], list[int | None], list[bytes]]:
        """(items, states, carry, expected count of each item, key of each state key)."""
        skeys: dict[bytes, int] = {}
        items: list[tuple[bytes | None, bytes, int]] = []
        want: list[int | None] = []
        for _ in range(size):
            key = None if self.rng.random() < 0.15 else self.rng.choice(self.keys)
            value = orjson.dumps({"seq": self.seq})
            self.seq += 1
            if key is None:
                items.append((None, value, NO_STATE))
                want.append(None)
                continue
            sk = skeys.setdefault(key, len(skeys))
            items.append((key, value, sk))
            self.expected[key] = self.expected.get(key, 0) + 1
            want.append(self.expected[key])
        before = self.previous or {}
        carry = [(sk, before[k]) for k, sk in skeys.items() if k in before]
        states = [None if k in before else self.store.get(k) for k in skeys]
        self.previous = skeys
        return items, states, carry, want, list(skeys)

    def collect(self, owners: list[bytes], new_states: dict[int, bytes | None]) -> None:
        for sk, st in new_states.items():
            self.store[owners[sk]] = st


def check(results: list[tuple[Any, ...]], items: list, want: list[int | None]) -> None:
    assert len(results) == len(items)
    for (key, value, _), result, n in zip(items, results, want):
        assert result[0] == OK, result
        out = orjson.loads(result[1])
        assert out["seq"] == orjson.loads(value)["seq"]  # each result at its own item's place
        assert out["key"] == (key.decode() if key else None)
        if n is not None:
            assert out["n"] == n, (key, out, n)


# ---- split and merge, pure -----------------------------------------------------------------------
def test_member_of_is_stable_and_spreads_keys():
    assert member_of(b"card-7", 3) == member_of(b"card-7", 3)  # not Python's salted hash: crc32
    import zlib

    assert member_of(b"card-7", 3) == zlib.crc32(b"card-7") % 3
    spread = {member_of(f"card-{i}".encode(), 4) for i in range(200)}
    assert spread == {0, 1, 2, 3}


def test_split_keeps_keys_together_in_order_with_local_state_keys():
    items = [(b"a", b"1", 0), (b"b", b"2", 1), (None, b"3", NO_STATE), (b"a", b"4", 0), (b"c", b"5", 2),
             (None, b"6", NO_STATE), (b"b", b"7", 1)]
    shares, (where, local) = split(items, 2)
    assert sorted(p for s in shares for p in s.positions) == list(range(len(items)))  # each item once
    for share in shares:
        assert share.positions == sorted(share.positions)  # batch order within a process
        assert sorted({sk for _, _, sk in share.items if sk != NO_STATE}) == list(range(len(share.skeys)))
        for (key, value, sk), pos in zip(share.items, share.positions):
            assert (key, value) == items[pos][:2]
            if sk != NO_STATE:
                assert share.skeys[sk] == items[pos][2]  # local state key -> the batch's
                assert member_of(key, 2) == shares.index(share)
    for g in range(3):
        assert shares[where[g]].skeys[local[g]] == g
    # keyless records are spread, not piled on one process
    keyless = [shares.index(s) for s in shares for _, _, sk in s.items if sk == NO_STATE]
    assert sorted(keyless) == [0, 1]


def test_carry_lands_in_the_process_and_local_key_the_previous_batch_gave_it():
    keys = [f"k{i}".encode() for i in range(10)]
    first = [(k, b"{}", i) for i, k in enumerate(keys)]
    _, placement = split(first, 3)
    # the next batch numbers the keys differently (reversed), and carries every one of them
    second = [(k, b"{}", i) for i, k in enumerate(reversed(keys))]
    carry = [(i, len(keys) - 1 - i) for i in range(len(keys))]
    shares, _ = split(second, 3, carry, placement)
    prev_where, prev_local = placement
    for m, share in enumerate(shares):
        for local_now, local_before in share.carry:
            key_now = keys[len(keys) - 1 - share.skeys[local_now]]
            g_before = keys.index(key_now)
            assert prev_where[g_before] == m
            assert prev_local[g_before] == local_before
    assert sum(len(s.carry) for s in shares) == len(keys)
    with pytest.raises(BatchFailed, match="did not split"):
        split(second, 3, carry, None)  # a carry needs the previous batch's placement
    with pytest.raises(BatchFailed, match="one process"):
        split(second, 3, [(0, 99)], placement)


def test_merge_puts_answers_back_at_their_positions_and_state_keys():
    items = [(b"a", b"x", 0), (b"b", b"y", 1), (b"a", b"z", 0)]
    shares, _ = split(items, 2)
    answers: list = []
    for m, share in enumerate(shares):
        if not share.items:
            answers.append(None)
            continue
        results = [(OK, f"{m}:{v.decode()}".encode()) for _, v, _ in share.items]
        answers.append((results, {sk: f"s{share.skeys[sk]}".encode() for sk in range(len(share.skeys))}, 0.1 * (m + 1)))
    results, states, seconds = merge(len(items), shares, answers)
    assert [r[1].decode().split(":")[1] for r in results] == ["x", "y", "z"]
    assert states == {0: b"s0", 1: b"s1"}
    assert seconds == max(a[2] for a in answers if a is not None)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_split_stream_counts_exactly_as_one_processor(n):
    """Many pipelined batches with repeated keys (waves), keyless records and carry: N processors
    fed the shares give every record the count one processor gives it."""
    stream = Stream(seed=n)
    members = [processor() for _ in range(n)]
    placement = None
    in_flight = None  # the previous batch: collected only after the next one was built
    for size in [1, 7, 30, 2, 50, 13, 40, 1, 60, 25] * 3:
        items, states, carry, want, owners = stream.batch(size)
        if in_flight is not None:
            stream.collect(*in_flight)
        shares, placement = split(items, n, carry, placement)
        answers = []
        for proc, share in zip(members, shares):
            if share.items:
                res, new = proc.process(share.items, share.states(states), share.carry)
                answers.append((res, new, 0.0))
            else:
                answers.append(None)
        results, new_states, _ = merge(len(items), shares, answers)
        check(results, items, want)
        in_flight = (owners, new_states)


# ---- the pool's rules, with in-process stand-ins --------------------------------------------------
class Member:
    """A SubprocessWorker stand-in: a BatchProcessor, answering after ``delay``; or failing."""

    def __init__(self) -> None:
        self.proc = processor()
        self.label = "active"
        self.dead = False
        self.killed = False
        self.fail: BaseException | None = None
        self.delay = 0.0
        self.calls = 0
        self.fail_on_call = 0
        self.returncode: int | None = None
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int:
        return 1000 + id(self) % 1000

    async def wait_exit(self) -> int | None:
        await self.exited.wait()
        return self.returncode

    async def process(self, items, states, carry=(), max_output=0):
        self.calls += 1
        if self.calls == self.fail_on_call:
            self.dead = True
            raise WorkerCrashed(f"active worker died on call {self.calls}")
        await asyncio.sleep(self.delay)
        if self.killed:
            raise WorkerCrashed("killed")
        if self.fail is not None:
            raise self.fail
        res, new = self.proc.process(items, states, carry, max_output)
        return res, new, self.delay

    def kill(self) -> None:
        self.killed = True
        self.dead = True

    async def close(self, timeout: float = 5.0) -> None:
        pass

    async def health(self) -> bool:
        return not self.dead


def stand_in_pool(n: int) -> tuple[WorkerPool, list[Member]]:
    pool = WorkerPool(Path("unused.fdb"), None, processes=n, label="active", predict_timeout=1, start_timeout=1)
    members = [Member() for _ in range(n)]
    pool.members = members  # type: ignore[assignment]
    return pool, members


async def test_pipelined_batches_through_the_pool_count_exactly():
    """Batch N+1 is sent (its task created) before N's answer is awaited, as the pipeline does."""
    pool, members = stand_in_pool(3)
    members[0].delay = 0.01  # answers out of step between processes
    stream = Stream(seed=42)
    inflight: list = []
    for size in [20, 5, 40, 1, 33, 12, 50, 8] * 2:
        items, states, carry, want, owners = stream.batch(size)
        task = asyncio.get_running_loop().create_task(pool.process(items, states, carry))
        inflight.append((task, items, want, owners))
        if len(inflight) > 1:
            t, its, w, own = inflight.pop(0)
            results, new_states, _ = await t
            check(results, its, w)
            stream.collect(own, new_states)
    for t, its, w, _ in inflight:
        results, new_states, _ = await t
        check(results, its, w)
    assert all(m.calls for m in members)


async def test_a_member_that_dies_fails_the_release_and_takes_the_others_down():
    pool, members = stand_in_pool(3)
    members[1].fail = WorkerTimeout("active worker (pid 2) did not answer within 1.000s; killed")
    members[0].delay = members[2].delay = 0.05
    stream = Stream(seed=1, keys=40)
    items, states, carry, _, _ = stream.batch(60)
    with pytest.raises(WorkerTimeout, match="did not answer"):  # the member's own error, as one worker raises it
        await pool.process(items, states, carry)
    assert all(m.killed for m in members) and pool.dead
    with pytest.raises(WorkerCrashed, match="not running"):
        await pool.process(items, states)
    assert not await pool.health()


async def test_a_death_on_a_later_batch_lets_the_earlier_batch_finish_first():
    """Process 1 dies on its share of batch 2 after answering batch 1, while process 0 still computes
    batch 1: batch 1 is answered in full (one worker would have answered it), batch 2 carries the
    death, and only then are the processes killed -- so crash isolation blames batch 2."""
    pool, members = stand_in_pool(2)
    members[0].delay = 0.1
    members[1].fail_on_call = 2
    keys = [f"k{i}".encode() for i in range(20)]
    assert {member_of(k, 2) for k in keys} == {0, 1}
    first = [(k, orjson.dumps({"seq": i}), i) for i, k in enumerate(keys)]
    second = [(k, orjson.dumps({"seq": 100 + i}), i) for i, k in enumerate(keys)]
    loop = asyncio.get_running_loop()
    one = loop.create_task(pool.process(first, [None] * 20))
    await asyncio.sleep(0)
    two = loop.create_task(pool.process(second, [None] * 20, [(i, i) for i in range(20)]))
    with pytest.raises(WorkerCrashed, match="died on call 2"):
        await two
    assert one.done() and not one.cancelled() and one.exception() is None
    results, _, _ = one.result()
    assert all(r[0] == OK for r in results)
    assert pool.dead and all(m.killed for m in members)


async def test_a_batch_failure_fails_the_batch_but_keeps_the_processes():
    """As with one worker: BatchFailed is replayed by the failure controller with the same release."""
    pool, members = stand_in_pool(2)
    members[0].fail = BatchFailed("active predict failed: RuntimeError: boom")
    members[1].delay = 0.05  # still computing when the other share fails: its answer is awaited, not left
    items = [(f"k{i}".encode(), orjson.dumps({"seq": i}), i) for i in range(20)]
    with pytest.raises(BatchFailed, match="boom"):
        await pool.process(items, [None] * 20)
    assert not pool.dead and not any(m.killed for m in members)
    assert members[1].calls == 1
    members[0].fail = None
    results, _, _ = await pool.process(items, [None] * 20)
    assert all(r[0] == OK for r in results)


async def test_wait_exit_and_returncode_name_the_first_member_to_exit():
    pool, members = stand_in_pool(3)
    waiter = asyncio.get_running_loop().create_task(pool.wait_exit())
    await asyncio.sleep(0)
    assert not waiter.done() and pool.returncode is None
    members[2].returncode = -9
    members[2].exited.set()
    assert await asyncio.wait_for(waiter, 2) == -9
    members[0].returncode = -15
    assert pool.returncode == -9  # the first to exit, not the first in the list


def test_label_follows_the_channel():
    pool, members = stand_in_pool(2)
    pool.label = "standby"
    assert all(m.label == "standby" for m in members)


# ---- make_worker and the configuration ------------------------------------------------------------
def test_make_worker_builds_a_pool_for_processes_above_one():
    kw: dict[str, Any] = {"predict_timeout": 1, "start_timeout": 1}
    pool = make_worker("subprocess", Path("x.fdb"), None, label="active", processes=3, **kw)
    assert isinstance(pool, WorkerPool) and len(pool.members) == 3
    assert all(isinstance(m, SubprocessWorker) for m in pool.members)
    assert isinstance(make_worker("subprocess", Path("x.fdb"), None, label="active", processes=1, **kw),
                      SubprocessWorker)
    assert isinstance(make_worker("subprocess", Path("x.fdb"), None, label="probe", processes=3, **kw),
                      SubprocessWorker)  # crash isolation probes one record at a time
    assert isinstance(make_worker("inprocess", Path("x.fdb"), None, label="active", processes=1, **kw),
                      InProcessWorker)
    with pytest.raises(ConfigError, match=r"worker.processes = 2 needs worker.mode = \"subprocess\".*fix"):
        make_worker("inprocess", Path("x.fdb"), None, label="active", processes=2, **kw)


def test_processes_in_the_configuration(tmp_path):
    base = '[inputs]\ntopics = ["in"]\n[output]\ntopic = "out"\n[dead_letter]\ntopic = "dlq"\n'
    path = tmp_path / "f.toml"
    path.write_text(base + "[worker]\nprocesses = 4\n")
    assert config.load(path, env={}).worker.processes == 4
    path.write_text(base)
    assert config.load(path, env={}).worker.processes == 1
    path.write_text(base + "[worker]\nprocesses = 0\n")
    with pytest.raises(ConfigError, match=r"worker.processes = 0"):
        config.load(path, env={})
    path.write_text(base + '[worker]\nprocesses = 2\nmode = "inprocess"\n')
    with pytest.raises(ConfigError, match=r"worker.processes = 2 .*fix: set worker.processes = 1"):
        config.load(path, env={})


# ---- the real thing: two worker processes of a built bundle --------------------------------------
COUNTING = '''\
from daemon.model import Prediction


class Model:
    def __init__(self, context):
        pass

    def predict(self, batch):
        out = []
        for r in batch:
            n = (r.state or {}).get("count", 0) + 1
            out.append(Prediction({"card_id": r.value["card_id"], "count": n, "seq": r.value.get("seq"),
                                   "score": 0.5, "pid": __import__("os").getpid()}, {"count": n}))
        return out
'''


@pytest.fixture(scope="module")
def counting_bundle(tmp_path_factory) -> Path:
    from tests.hostile.harness import build_bundle

    return build_bundle(tmp_path_factory.mktemp("pool"), name="pool-count", version="1.0.0", source=COUNTING)


async def test_two_real_processes_pipelined_then_one_killed(counting_bundle):
    pool = WorkerPool(counting_bundle, None, processes=2, label="active", predict_timeout=10, start_timeout=60)
    info = await pool.start()
    try:
        assert info["name"] == "pool-count" and len(set(pool.pids)) == 2 and None not in pool.pids
        assert await pool.health()
        rng = random.Random(3)
        cards = [f"card-{i}".encode() for i in range(30)]
        expected: dict[bytes, int] = {}
        store: dict[bytes, bytes | None] = {}
        previous: dict[bytes, int] = {}
        inflight: list = []
        seen_pids: set[int] = set()
        seq = 0
        for _ in range(12):
            skeys: dict[bytes, int] = {}
            items, want = [], []
            for _ in range(rng.randrange(1, 200)):
                key = rng.choice(cards)
                sk = skeys.setdefault(key, len(skeys))
                value = {"card_id": key.decode(), "seq": seq, "amount": 1, "features": []}
                items.append((key, orjson.dumps(value), sk))
                seq += 1
                expected[key] = expected.get(key, 0) + 1
                want.append(expected[key])
            carry = [(sk, previous[k]) for k, sk in skeys.items() if k in previous]
            states = [None if k in previous else store.get(k) for k in skeys]
            previous = skeys
            inflight.append((asyncio.get_running_loop().create_task(pool.process(items, states, carry)), items,
                             want, list(skeys)))
            if len(inflight) > 1:
                task, its, w, owners = inflight.pop(0)
                results, new_states, seconds = await task
                assert seconds > 0
                for (key, value, _), r, n in zip(its, results, w):
                    assert r[0] == OK, r
                    out = orjson.loads(r[1])
                    assert (out["card_id"], out["seq"], out["count"]) == (key.decode(), orjson.loads(value)["seq"], n)
                    assert out["pid"] == pool.pids[member_of(key, 2)]  # the key's own process
                    seen_pids.add(out["pid"])
                for sk, st in new_states.items():  # collected after the next batch was sent, as the pipeline does
                    store[owners[sk]] = st
        for task, *_ in inflight:
            await task
        assert seen_pids == set(pool.pids)

        # one process killed between batches: noticed at once, and the release is dead as a whole
        waiter = asyncio.get_running_loop().create_task(pool.wait_exit())
        victim = pool.members[1].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert await asyncio.wait_for(waiter, 5) == -signal.SIGKILL
        assert pool.returncode == -signal.SIGKILL
        items = [(c, orjson.dumps({"card_id": c.decode(), "seq": 0, "amount": 1, "features": []}), i)
                 for i, c in enumerate(cards)]
        with pytest.raises(WorkerCrashed):
            await pool.process(items, [None] * len(cards))
        assert pool.dead
        survivor = pool.members[0]
        assert survivor.pid is not None
        await asyncio.wait_for(survivor.wait_exit(), 5)  # the other process was killed with it
    finally:
        pool.kill()
        await pool.close(timeout=2)


async def test_a_pool_that_cannot_load_keeps_no_process(tmp_path):
    from daemon.errors import BundleError
    from tests.hostile.harness import build_bundle

    broken = build_bundle(tmp_path, name="pool-broken", version="1.0.0",
                          source="class Model:\n    def __init__(self, context):\n        raise RuntimeError('no')\n")
    pool = WorkerPool(broken, None, processes=2, label="standby", predict_timeout=5, start_timeout=60)
    with pytest.raises(BundleError, match="failed to load"):
        await pool.start()
    assert all(m.returncode is not None for m in pool.members)


def test_module_is_documented_where_users_look():
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert "`processes`" in text
    assert pool_mod.__doc__ and "memory_mb" in pool_mod.__doc__
