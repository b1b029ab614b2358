"""The state restore against the real broker (daemon/engine/restore.py): partitions restored
together through one consumer, progress visible while it runs (``Restorer.restoring``, which
``/status`` shows, and the restore metrics), the store exact at the end, and a cancelled restore
that leaves its store consistent and resumable."""

from __future__ import annotations

import asyncio
import types

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from daemon import clients, metrics as m
from daemon.engine.restore import Restorer
from daemon.engine.state import StateStore, changelog_key
from tests import kafkatools

NS = "m/s1"
TOPIC = "in"


def _gauge(tp: TopicPartition) -> float:
    return m.REGISTRY.get_sample_value("failoverd_state_restore_remaining",
                                       {"topic": tp.topic, "partition": str(tp.partition)}) or 0.0


def _restored_total() -> float:
    return m.REGISTRY.get_sample_value("failoverd_state_restored_total") or 0.0


class SpyStore(StateStore):
    """A store that notes what the restore's progress said each time a chunk was written (that is,
    while the restore runs), and calls ``on_chunk`` after each."""

    restorer: Restorer
    tp: TopicPartition

    def __init__(self, path, restorer: Restorer, tp: TopicPartition) -> None:
        super().__init__(path)
        self.restorer, self.tp = restorer, tp
        self.seen: list[tuple[int, float, float]] = []
        self.on_chunk = lambda: None

    def apply_changelog(self, topic, records, position):
        self.seen.append((self.restorer.restoring.get(self.tp, -2), _gauge(self.tp), _restored_total()))
        n = super().apply_changelog(topic, records, position)
        self.on_chunk()
        return n


async def _write_changelog(bootstrap: str, topic: str, partition: int, keys: int, seed: str) -> dict[bytes, bytes]:
    """Committed changelog records of ``TOPIC`` on ``partition``, in scattered key order: every key
    twice (the second write wins), every 7th key deleted at the end, another input topic's records
    in between, and an aborted transaction that claims other values. Returns the state a restore
    must end with."""
    order = [(i * 7919) % keys for i in range(keys)]  # 7919 is prime: a permutation, not sorted
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=kafkatools.unique("cl"), linger_ms=5)
    await p.start()
    want: dict[bytes, bytes] = {}
    try:
        for round_ in (1, 2):
            await p.begin_transaction()
            for i in order:
                key, value = b"k%06d" % i, b"%s-%d-%d" % (seed.encode(), round_, i)
                await p.send(topic, value, key=changelog_key(TOPIC, NS, key), partition=partition)
                want[key] = value
                if i % 50 == 0:
                    await p.send(topic, b"x", key=changelog_key("other", NS, key), partition=partition)
            await p.commit_transaction()
        await p.begin_transaction()
        for i in range(0, keys, 7):
            await p.send(topic, None, key=changelog_key(TOPIC, NS, b"k%06d" % i), partition=partition)
            want.pop(b"k%06d" % i)
        await p.commit_transaction()
        await p.begin_transaction()
        for i in range(0, keys, 3):
            await p.send(topic, b"aborted", key=changelog_key(TOPIC, NS, b"k%06d" % i), partition=partition)
        await p.flush()
        await p.abort_transaction()
    finally:
        await p.stop()
    return want


@pytest.fixture
async def restore_clients(kafka_bootstrap):
    # what daemon/engine/connections.py builds for the restore
    restorer = clients.consumer(kafka_bootstrap, fetch_max_wait_ms=10)
    hw_reader = clients.consumer(kafka_bootstrap, isolation_level="read_uncommitted")
    await restorer.start()
    await hw_reader.start()
    try:
        yield types.SimpleNamespace(restorer=restorer, hw_reader=hw_reader)
    finally:
        await restorer.stop()
        await hw_reader.stop()


async def _end(c, topic: str, partition: int) -> int:
    ctp = TopicPartition(topic, partition)
    return (await c.hw_reader.end_offsets([ctp]))[ctp]


async def test_restore_shows_progress_while_it_runs_and_ends_exact(kafka_bootstrap, restore_clients, tmp_path,
                                                                  monkeypatch):
    changelog = kafkatools.unique("changelog")
    await kafkatools.create_topics(kafka_bootstrap, {changelog: 2})
    want = [await _write_changelog(kafka_bootstrap, changelog, p, keys, f"p{p}") for p, keys in ((0, 6000), (1, 2500))]
    monkeypatch.setattr(Restorer, "BUFFER_RECORDS", 2000)  # small chunks: many writes to look through
    restorer = Restorer(restore_clients, changelog)
    tps = [TopicPartition(TOPIC, p) for p in (0, 1)]
    stores = [SpyStore(tmp_path / f"{p}.sqlite", restorer, tp) for p, tp in enumerate(tps)]
    restored_before = _restored_total()
    samples: list[tuple[int, float, int, float, float]] = []  # what /status and /metrics would say, meanwhile

    async def sample_until_done() -> None:
        while not all(s.seen for s in stores) or any(restorer.restoring.get(tp, 1) for tp in tps):
            samples.append((restorer.restoring.get(tps[0], -2), _gauge(tps[0]),
                            restorer.restoring.get(tps[1], -2), _gauge(tps[1]), _restored_total()))
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(asyncio.gather(sample_until_done(), *(restorer.restore(tp, s) for tp, s in zip(tps, stores))), 120)
        # on the event loop, while it ran: the records left went down through several values, the
        # gauge always said the same, and the restored counter went up
        for i in (0, 2):
            left = [sample[i] for sample in samples if sample[i] > 0]
            assert len(set(left)) >= 3 and left == sorted(left, reverse=True), left
        assert all(sample[0] == sample[1] and sample[2] == sample[3] for sample in samples if sample[0] >= 0 <= sample[2])
        counts = [sample[4] for sample in samples if sample[0] > 0]
        assert counts == sorted(counts) and counts[-1] > counts[0] >= restored_before
        for p, (tp, store) in enumerate(zip(tps, stores)):
            left = [seen[0] for seen in store.seen]
            # every chunk was written while the restore said records were left, and that went down
            # (the last write may only carry the position past the aborted transaction's marker)
            assert len(left) >= 5 and all(n > 0 for n in left[:-1]), left
            assert left == sorted(left, reverse=True) and left[0] > left[-1], left
            assert restorer.restoring[tp] == 0 and _gauge(tp) == 0
            assert store.items(NS) == want[p]  # last writes, deletes, not the other topic's, never the aborted
            assert store.position() == await _end(restore_clients, changelog, p)
        assert restore_clients.restorer.assignment() == set()  # it does not keep polling the changelog
    finally:
        for s in stores:
            s.close()


async def test_a_cancelled_restore_leaves_its_store_consistent_and_resumable(kafka_bootstrap, restore_clients,
                                                                            tmp_path, monkeypatch):
    changelog = kafkatools.unique("changelog")
    await kafkatools.create_topics(kafka_bootstrap, {changelog: 2})
    want = [await _write_changelog(kafka_bootstrap, changelog, p, 3000, f"p{p}") for p in (0, 1)]
    monkeypatch.setattr(Restorer, "BUFFER_RECORDS", 2000)
    monkeypatch.setattr(StateStore, "RESTORE_COMMIT_RECORDS", 1500)  # some chunks committed before the cancel
    restorer = Restorer(restore_clients, changelog)
    tps = [TopicPartition(TOPIC, p) for p in (0, 1)]
    stores = [SpyStore(tmp_path / f"{p}.sqlite", restorer, tp) for p, tp in enumerate(tps)]
    tasks = [asyncio.create_task(restorer.restore(tp, s)) for tp, s in zip(tps, stores)]

    loop = asyncio.get_running_loop()

    def cancel_after_four_chunks() -> None:  # a stop, or a sibling partition that failed to open
        if len(stores[0].seen) == 4:
            loop.call_soon_threadsafe(tasks[0].cancel)

    stores[0].on_chunk = cancel_after_four_chunks
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(tasks[0]), 60)
        written = len(stores[0].seen)
        assert written in (4, 5)  # the chunk in flight when the cancel came, at most
        await asyncio.wait_for(tasks[1], 120)  # the other partition's restore is not disturbed
        assert len(stores[0].seen) == written  # nothing wrote the cancelled store after its restore returned
        assert stores[1].items(NS) == want[1]
        stores[0].close()
        # the cancelled store opens again at a position somewhere in the middle, and a new restore
        # from there ends exactly where a full one does
        again = StateStore(tmp_path / "0.sqlite")
        end = await _end(restore_clients, changelog, 0)
        assert 0 < again.position() < end
        await asyncio.wait_for(restorer.restore(tps[0], again), 120)
        assert again.items(NS) == want[0] and again.position() == end
        again.close()
    finally:
        for t in tasks:
            t.cancel()
        for s in stores:
            s.close()
