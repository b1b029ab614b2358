"""The data path against the real broker: exactly-once outputs, provenance, dead letters, state."""

from __future__ import annotations

import orjson

from daemon.engine import headers as H
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config


async def _input_positions(bootstrap: str, topic: str) -> dict:
    got = await kafkatools.read_committed(bootstrap, topic)
    return {(r.partition, r.offset): r.value for r in got}


async def test_every_input_once_with_provenance_and_dead_letters(kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "eng", partitions=2)
    good = streams.transactions(1500, seed=1)
    poison = [
        (b"card-p1", b"{not json"),
        (b"card-p2", orjson.dumps({"card_id": "card-p2", "amount": "ten", "features": [0] * 8})),
        (b"card-p3", b'{"card_id": "card-p3", "amount": 1, "features": [' + b",".join([b"0"] * 8) + b'], "pad": "'
         + b"x" * 5000 + b'"}'),
        (b"card-p4", orjson.dumps({"card_id": "card-p4", "amount": -5.0, "features": [0.1] * 8})),
    ]
    records = good[:700] + poison + good[700:]
    await kafkatools.produce(kafka_bootstrap, names["input"], records)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    daemon = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "daemon.log").start()
    try:
        await kafkatools.wait_for(lambda: daemon.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=90,
                                  what="all outputs and dead letters committed")
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        if daemon.alive():
            daemon.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert len(outputs) == len(good)
    streams.assert_counts_chain(outputs)

    reasons = {H.as_dict(r.headers)[H.H_DLQ_REASON].decode(): r for r in dead}
    assert set(reasons) == {"bad_json", "schema", "oversized", "model_error"}, reasons.keys()
    assert reasons["bad_json"].value == b"{not json" and reasons["bad_json"].key == b"card-p1"
    assert b"amount" in H.as_dict(reasons["schema"].headers)[H.H_DLQ_DETAIL]
    assert b"amount must be >= 0" in H.as_dict(reasons["model_error"].headers)[H.H_DLQ_DETAIL]

    h = H.as_dict(outputs[0].headers)
    assert h[H.H_RELEASE_NAME] == b"fraud-scorer" and h[H.H_RELEASE_VERSION] == b"1.0.0"
    assert len(h[H.H_RELEASE_DIGEST]) == 64
    assert h[H.H_SOURCE_TOPIC] == names["input"].encode()


async def _count_committed(bootstrap, names, expected) -> bool:
    out = await kafkatools.read_committed(bootstrap, names["output"], idle=0.3)
    dead = await kafkatools.read_committed(bootstrap, names["dlq"], idle=0.3)
    return len(out) + len(dead) >= expected


class Feeder:
    """Produces the given records at a steady pace in the background, so faults land mid-stream."""

    def __init__(self, bootstrap: str, topic: str, records: list, per_batch: int = 100, pause: float = 0.02):
        self.bootstrap, self.topic, self.records = bootstrap, topic, records
        self.per_batch, self.pause = per_batch, pause
        self.sent = 0

    async def run(self) -> None:
        import asyncio

        for i in range(0, len(self.records), self.per_batch):
            self.sent += await kafkatools.produce(self.bootstrap, self.topic, self.records[i:i + self.per_batch])
            await asyncio.sleep(self.pause)


async def _run_until_done(bootstrap, names, n, daemons, timeout=120):
    await kafkatools.wait_for(
        lambda: all(d.check() for d in daemons) and _count_committed(bootstrap, names, n),
        timeout=timeout, interval=0.5, what=f"{n} inputs accounted for")


async def test_kill_9_of_daemon_mid_stream_then_restart_loses_and_duplicates_nothing(
        kafka_bootstrap, tmp_path, example_bundles):
    import asyncio

    names = await make_topics(kafka_bootstrap, "k9", partitions=2)
    records = streams.transactions(6000, seed=2, n_cards=40)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"), instance_id="k9-a")
    args = ("--active-bundle", str(example_bundles["v1"]))
    feeder = Feeder(kafka_bootstrap, names["input"], records, per_batch=200, pause=0.25)
    first = DaemonProc(cfg, *args, log=tmp_path / "d1.log").start()
    second = None
    feed = None
    try:
        await kafkatools.wait_for(lambda: first.check() and "partitions assigned" in first.log(), timeout=60,
                                  what="the daemon to take its partitions")
        feed = asyncio.create_task(feeder.run())
        await kafkatools.wait_for(lambda: first.check() and first.committed() >= 1500,
                                  timeout=60, interval=0.05, what="some checkpoints")
        first.kill9()  # mid-stream: an interval is open, outputs are in flight
        assert feeder.sent < len(records), "the stream ended before the kill: the test would prove nothing"
        second = DaemonProc(cfg, *args, log=tmp_path / "d2.log").start()
        await kafkatools.wait_for(lambda: second.check() and "partitions assigned" in second.log(), timeout=60,
                                  what="the restarted daemon to take its partitions")
        await feed
        await _run_until_done(kafka_bootstrap, names, len(records), [second])
        assert second.terminate() == 0
    finally:
        if feed is not None:
            feed.cancel()
        for d in (first, second):
            if d is not None and d.alive():
                d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    streams.assert_counts_chain(outputs)  # state restored from the changelog at the checkpoint


async def test_two_instances_one_killed_survivor_takes_over_with_state(kafka_bootstrap, tmp_path, example_bundles):
    import asyncio

    names = await make_topics(kafka_bootstrap, "scale", partitions=4)
    records = streams.transactions(8000, seed=3, n_cards=60)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    args = ("--active-bundle", str(example_bundles["v1"]))
    daemons = []
    for name in ("a", "b"):
        cfg = write_config(tmp_path / f"{name}.toml", bootstrap=kafka_bootstrap, names=names,
                           state_dir=tmp_path / f"state-{name}", group=group, app=app)
        daemons.append(DaemonProc(cfg, *args, log=tmp_path / f"{name}.log").start())
    feeder = Feeder(kafka_bootstrap, names["input"], records, per_batch=200, pause=0.25)
    feed = asyncio.create_task(feeder.run())
    try:
        await kafkatools.wait_for(lambda: all(d.check() for d in daemons)
                                  and sum(d.committed() for d in daemons) >= 2500,
                                  timeout=90, interval=0.05, what="both instances processing")
        assert "partitions assigned" in daemons[1].log()
        daemons[0].kill9()
        assert feeder.sent < len(records), "the stream ended before the kill: the test would prove nothing"
        await feed
        await _run_until_done(kafka_bootstrap, names, len(records), [daemons[1]], timeout=150)
        assert daemons[1].terminate() == 0
    finally:
        if feed is not None:
            feed.cancel()
        for d in daemons:
            if d.alive():
                d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    # The survivor's per-card counts continue the dead instance's: the same as one instance alone.
    streams.assert_counts_chain(outputs)
    assert len(outputs) == len(records)


async def test_paused_zombie_wakes_after_handover_and_its_commit_is_refused(kafka_bootstrap, tmp_path,
                                                                          example_bundles):
    import os
    import signal

    names = await make_topics(kafka_bootstrap, "zombie", partitions=1)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    args = ("--active-bundle", str(example_bundles["v1"]))
    # The zombie checkpoints rarely, so it is paused with an open transaction full of outputs.
    cfg_a = write_config(tmp_path / "a.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "sa",
                         group=group, app=app, extra={"checkpoint": {"interval_ms": 600000, "interval_records": 1000000}})
    cfg_b = write_config(tmp_path / "b.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "sb",
                         group=group, app=app)
    first = streams.transactions(400, seed=4, n_cards=20)
    await kafkatools.produce(kafka_bootstrap, names["input"], first)
    zombie = DaemonProc(cfg_a, *args, log=tmp_path / "a.log").start()
    survivor = None
    try:
        await kafkatools.wait_for(lambda: zombie.check() and "partitions assigned" in zombie.log(), timeout=60,
                                  what="zombie assigned")
        # wait until the zombie has processed (but not committed) records: its worker answered
        await kafkatools.wait_for(lambda: _uncommitted_outputs(kafka_bootstrap, names["output"]), timeout=60,
                                  what="zombie outputs in an open transaction")
        os.kill(zombie.pid, signal.SIGSTOP)
        survivor = DaemonProc(cfg_b, *args, log=tmp_path / "b.log").start()
        await _run_until_done(kafka_bootstrap, names, len(first), [survivor], timeout=90)
        os.kill(zombie.pid, signal.SIGCONT)
        await kafkatools.wait_for(lambda: "fenced" in zombie.log() or not zombie.alive(), timeout=60,
                                  what="the zombie's commit to be refused")
        # the zombie rejoins the group and may be given the partition back: with its 10-minute
        # checkpoint interval it would commit the rest only at its stop, so it stops now
        if zombie.alive():
            assert zombie.terminate() == 0
        second = streams.transactions(200, seed=5, n_cards=20)
        await kafkatools.produce(kafka_bootstrap, names["input"], second)
        await kafkatools.wait_for(
            lambda: _count_committed(kafka_bootstrap, names, len(first) + len(second)), timeout=90,
            interval=0.5, what="all inputs after the zombie woke")
    finally:
        for d in (zombie, survivor):
            if d is not None and d.alive():
                try:
                    os.kill(d.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    streams.assert_counts_chain(outputs)


async def _uncommitted_outputs(bootstrap: str, topic: str) -> bool:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        return (await c.end_offsets([tp]))[tp] > 0
    finally:
        await c.stop()


async def test_restore_stops_at_the_checkpoint_and_reads_only_the_delta(kafka_bootstrap, tmp_path, example_bundles):
    from aiokafka import AIOKafkaProducer

    from daemon.engine.state import changelog_key

    names = await make_topics(kafka_bootstrap, "restore", partitions=1)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    args = ("--active-bundle", str(example_bundles["v1"]))
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s1",
                       group=group, app=app)
    batch1 = [(b"card-r", orjson.dumps({"card_id": "card-r", "amount": 10.0, "features": [0.1] * 8}))] * 30
    await kafkatools.produce(kafka_bootstrap, names["input"], batch1)
    d = DaemonProc(cfg, *args, log=tmp_path / "d1.log").start()
    await _run_until_done(kafka_bootstrap, names, 30, [d])
    assert d.terminate() == 0

    # Uncommitted and aborted changelog writes claiming card-r has count 9999.
    bogus = orjson.dumps({"count": 9999, "mean_amount": 1.0})
    key = changelog_key(names["input"], "fraud-scorer/s1", b"card-r")
    for commit in (False, None):
        p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=kafkatools.unique("intruder"))
        await p.start()
        await p.begin_transaction()
        await (await p.send(names["changelog"], bogus, key=key, partition=0))
        if commit is False:
            await p.abort_transaction()
            await p.stop()
        else:
            open_txn = p  # left open while the daemon restores

    # A fresh instance (empty state dir) restores from the changelog: committed writes only.
    cfg2 = write_config(tmp_path / "f2.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s2",
                        group=group, app=app)
    await kafkatools.produce(kafka_bootstrap, names["input"], batch1[:1])
    d2 = DaemonProc(cfg2, *args, log=tmp_path / "d2.log").start()
    try:
        # the restore reads committed writes only, and waits for the open transaction to end
        # (another writer's records may stand behind its start): end it while d2 restores
        await kafkatools.wait_for(lambda: d2.check() and "restoring state" in d2.log(), timeout=60,
                                  what="d2 restoring")
        await open_txn.abort_transaction()
        await open_txn.stop()
        open_txn = None
        await _run_until_done(kafka_bootstrap, names, 31, [d2])
        assert d2.terminate() == 0
    finally:
        if open_txn is not None:
            await open_txn.abort_transaction()
            await open_txn.stop()
        if d2.alive():
            d2.kill9()
    outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
    last = max(outputs, key=lambda r: r.offset)
    assert orjson.loads(last.value)["count"] == 31  # 30 committed + this one; never 10000
    assert "state restored" in d2.log()

    # The first instance's store is at the changelog position of its last checkpoint: a restart
    # there reads only the delta written since (by d2), not the whole changelog.
    d3 = DaemonProc(cfg, *args, log=tmp_path / "d3.log").start()
    try:
        await kafkatools.produce(kafka_bootstrap, names["input"], batch1[:1])
        await _run_until_done(kafka_bootstrap, names, 32, [d3])
        assert d3.terminate() == 0
    finally:
        if d3.alive():
            d3.kill9()
    restore_lines = [ln for ln in d3.log().splitlines() if "restoring state" in ln]
    assert restore_lines and " from=0 " not in restore_lines[0] + " ", restore_lines
    outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
    assert orjson.loads(max(outputs, key=lambda r: r.offset).value)["count"] == 32


async def test_second_signal_forces_exit_while_the_first_waits_on_a_hung_model(kafka_bootstrap, tmp_path,
                                                                               example_bundles):
    import signal
    import time

    names = await make_topics(kafka_bootstrap, "sig", partitions=1)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"worker": {"predict_timeout_ms": 120000}})
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v2"]), log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and "partitions assigned" in d.log(), timeout=60,
                                  what="assigned")
        hang = orjson.dumps({"card_id": "c", "amount": 1.0, "features": [0.0] * 8, "fault": "hang"})
        await kafkatools.produce(kafka_bootstrap, names["input"], [(b"c", hang)])
        await kafkatools.wait_for(lambda: d.get("/status")[0] == 200 and
                                  d.committed() == 0 and "fraud-scorer@2.0.0" in d.log(), timeout=30,
                                  what="the hung predict")
        d.proc.send_signal(signal.SIGTERM)
        await kafkatools.wait_for(lambda: "stopping" in d.log(), timeout=10, what="the first signal handled")
        assert d.alive(), "the daemon waits for the hung batch (up to predict_timeout) on the first signal"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(10)
        assert code == 130 and time.monotonic() - t0 < 5
        assert "second signal: forcing exit" in d.log()
        await kafkatools.wait_for(lambda: not d.worker_pids_in_session(), timeout=10,
                                  what="the hung model worker to be killed with the daemon")
    finally:
        d.kill9()
    # nothing from the hung interval was committed
    assert await kafkatools.read_committed(kafka_bootstrap, names["output"]) == []


async def test_restore_reads_committed_state_behind_another_writers_open_transaction(
        kafka_bootstrap, tmp_path, example_bundles):
    """A changelog partition can have another writer (with several input topics, partition N of
    each topic writes changelog partition N). Its open transaction holds the last stable offset
    back; the restore must still apply our committed records that stand behind its start."""
    from aiokafka import AIOKafkaProducer

    from daemon.engine.state import changelog_key

    names = await make_topics(kafka_bootstrap, "lso", partitions=1)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    args = ("--active-bundle", str(example_bundles["v1"]))
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s1",
                       group=group, app=app)
    rec = (b"card-l", orjson.dumps({"card_id": "card-l", "amount": 10.0, "features": [0.1] * 8}))
    await kafkatools.produce(kafka_bootstrap, names["input"], [rec] * 30)
    d1 = DaemonProc(cfg, *args, log=tmp_path / "d1.log").start()
    other = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=kafkatools.unique("other-topic"),
                             transaction_timeout_ms=180000)
    await other.start()
    try:
        await _run_until_done(kafka_bootstrap, names, 30, [d1])
        await other.begin_transaction()
        await (await other.send(names["changelog"], b"{}", partition=0,
                                key=changelog_key("another-input-topic", "fraud-scorer/s1", b"card-x")))
        # 20 more records: d1's committed changelog records land behind the open one
        await kafkatools.produce(kafka_bootstrap, names["input"], [rec] * 20)
        await _run_until_done(kafka_bootstrap, names, 50, [d1])
        assert d1.terminate() == 0

        # a fresh instance restores from the changelog while the other transaction is still open
        cfg2 = write_config(tmp_path / "f2.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s2",
                            group=group, app=app)
        d2 = DaemonProc(cfg2, *args, log=tmp_path / "d2.log").start()
        try:
            await kafkatools.wait_for(lambda: d2.check() and "restoring state" in d2.log(), timeout=60,
                                      what="d2 restoring")
            await other.commit_transaction()  # the other writer's interval ends
            await kafkatools.produce(kafka_bootstrap, names["input"], [rec])
            await _run_until_done(kafka_bootstrap, names, 51, [d2])
            assert d2.terminate() == 0
        finally:
            if d2.alive():
                d2.kill9()
    finally:
        await other.stop()
    outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"])
    assert [orjson.loads(r.value)["count"] for r in sorted(outputs, key=lambda r: r.offset)] == list(range(1, 52))
