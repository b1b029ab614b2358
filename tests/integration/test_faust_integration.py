"""The faust integration (daemon/integrations/faust.py) in a real faust worker on the real broker.

Each test runs examples/faust_app/app.py as a subprocess (its own topics, faust app id and consumer
group, registry and configuration), feeds it card transactions and reads back its output and
dead-letter topics: kill -9 of the active model worker mid-stream, a promotion through
``failoverd release promote``, poison records. faust delivers at least once: duplicates are
counted and reported, and must stay within what one commit interval can replay.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from daemon.engine import headers as H
from daemon.registry import Registry
from tests import kafkatools, streams
from tests.conftest import ROOT
from tests.daemonproc import free_port, make_topics, write_config

import faust  # noqa: E402,F401 - the test extra installs it: a missing install fails here, never skips

pytestmark = pytest.mark.timeout(90)

BATCH = 100
PARTITIONS = 2
COMMIT_INTERVAL = 0.5


class FaustApp:
    """examples/faust_app/app.py as a faust worker subprocess."""

    def __init__(self, tmp: Path, config: Path, app_id: str, bootstrap: str) -> None:
        self.log_path = tmp / "faust.log"
        self.metrics_port = free_port()  # the integration's /metrics, which the tests scrape
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), FAILOVERD_CONFIG=str(config),
                        FAUST_BOOTSTRAP=bootstrap,  # the test's broker (FAILOVERD_TEST_KAFKA_PORT may move it)
                        FAUST_APP_ID=app_id, FAUST_DATADIR=str(tmp / "faust-data"),
                        FAUST_PARTITIONS=str(PARTITIONS), FAUST_BATCH=str(BATCH),
                        FAUST_COMMIT_INTERVAL=str(COMMIT_INTERVAL), FAUST_WEB_PORT=str(free_port()),
                        FAUST_METRICS_PORT=str(self.metrics_port))
        self.proc: subprocess.Popen | None = None

    def start(self) -> FaustApp:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "faust_app" / "app.py"), "worker",
                                      "-l", "info"], cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"faust worker exited; log:\n{self.log()[-4000:]}")
        return True

    def model_workers(self) -> dict[str, int]:
        """The model worker processes this faust worker started: {bundle file name: pid}."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "daemon.engine.worker_main"],
                             capture_output=True, text=True)
        found = {}
        for pid in (int(x) for x in out.stdout.split()):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            found[Path(argv[argv.index(b"daemon.engine.worker_main") + 1].decode()).name] = pid
        return found

    def stop(self) -> None:
        if self.proc is None:
            return
        workers = list(self.model_workers().values())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in workers:  # each in a session of its own: not in the faust worker's group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


class Readback:
    """Follows the output and dead-letter topics; every record by the input position it answers."""

    def __init__(self, bootstrap: str, names: dict) -> None:
        self.bootstrap, self.names = bootstrap, names
        self.outputs: list = []
        self.dead: list = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Readback:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          isolation_level="read_committed", auto_offset_reset="earliest")
        await self._consumer.start()
        tps = [TopicPartition(self.names["output"], p) for p in range(PARTITIONS)]
        tps.append(TopicPartition(self.names["dlq"], 0))
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=200)
        for tp, records in batch.items():
            (self.outputs if tp.topic == self.names["output"] else self.dead).extend(records)

    def positions(self) -> collections.Counter:
        return collections.Counter(streams.source_position(r) for r in self.outputs + self.dead)

    async def until(self, predicate, app: FaustApp, timeout: float, what: str) -> None:
        async def step() -> bool:
            app.check()
            await self.poll()
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            return bool(value)

        await kafkatools.wait_for(step, timeout=timeout, interval=0, what=what)


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


async def following(port: int, app: FaustApp) -> None:
    """Until the app follows the control topic (a request published before that is history to it,
    as to a daemon's first read of the topic)."""
    def follows() -> bool:
        app.check()
        try:
            return 'failoverd_control_following{integration="faust"} 1.0' in scrape(port).splitlines()
        except OSError:
            return False

    await kafkatools.wait_for(follows, timeout=30, interval=0.2, what="the app following the control topic")


def version(record) -> bytes:
    return H.as_dict(record.headers)[H.H_RELEASE_VERSION]


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> dict[tuple[int, int], bytes]:
    """Produce and return {(partition, offset): value} of what was written."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=k) for k, v in records]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {(m.partition, m.offset): v for m, (_, v) in zip(metas, records)}


@pytest.fixture
async def setup(tmp_path, kafka_bootstrap, example_bundles):
    names = await make_topics(kafka_bootstrap, "faust", partitions=PARTITIONS)
    registry = Registry(tmp_path / "registry")
    digests = {v: registry.add(example_bundles[v]) for v in ("v1", "v2")}
    registry.promote(digests["v2"], "active", "test")
    registry.promote(digests["v1"], "standby", "test")
    app_id = kafkatools.unique("faust-app")
    config = write_config(tmp_path / "failoverd.toml", bootstrap=kafka_bootstrap, names=names,
                          state_dir=tmp_path / "state", registry=tmp_path / "registry", group=app_id, app=app_id,
                          extra={"failover": {"cooldown_ms": 1000, "min_samples": 5, "error_window": 50}})
    app = FaustApp(tmp_path, config, app_id, kafka_bootstrap)
    yield names, config, app, digests
    app.stop()


async def produce_until_standby_answers(rb: Readback, app: FaustApp, bootstrap: str, topic: str, inputs: dict,
                                       first_seed: int, what: str) -> None:
    """Produce 10 transactions at a time (seeds ``first_seed``, +1, ...; what was written goes into
    ``inputs``) until an output of fraud-scorer 1.0.0 shows: the app switches asynchronously, so
    records must keep coming for the switch to show in the outputs."""
    seeds = itertools.count(first_seed)

    async def switched() -> bool:
        inputs.update(await produce(bootstrap, topic, streams.transactions(10, seed=next(seeds))))
        await asyncio.sleep(0.2)
        await rb.poll()
        return any(version(r) == b"1.0.0" for r in rb.outputs)

    await rb.until(switched, app, 30, what)


def report(name: str, inputs: dict, rb: Readback) -> int:
    seen = rb.positions()
    dups = sum(n - 1 for n in seen.values() if n > 1)
    by_version = collections.Counter(version(r).decode() for r in rb.outputs)
    print(f"\n[{name}] inputs {len(inputs)}, outputs {len(rb.outputs)} {dict(by_version)}, "
          f"dead letters {len(rb.dead)}, duplicates {dups} (bound: {BATCH * PARTITIONS}, one batch per partition "
          f"within faust's {COMMIT_INTERVAL} s commit interval)")
    return dups


async def test_kill9_of_the_active_model_worker_fails_over_to_the_standby(setup, kafka_bootstrap, example_bundles):
    names, _, app, digests = setup
    port = app.start().metrics_port
    first = await produce(kafka_bootstrap, names["input"], streams.transactions(1500, seed=1))
    async with Readback(kafka_bootstrap, names) as rb:
        await rb.until(lambda: len(rb.outputs) >= 200, app, 40, "the first outputs")
        workers = app.model_workers()
        active = next(pid for name, pid in workers.items() if digests["v2"] in name)
        assert len(workers) == 2, f"expected an active and a standby model worker, found {workers}"
        os.kill(active, signal.SIGKILL)
        killed_at = len(rb.outputs)
        second = await produce(kafka_bootstrap, names["input"], streams.transactions(1500, seed=2))
        inputs = {**first, **second}
        await rb.until(lambda: set(inputs) <= set(rb.positions()), app, 40, "an output for every input")
        await asyncio.sleep(COMMIT_INTERVAL)
        await rb.poll()
    dups = report("kill -9", inputs, rb)
    assert not rb.dead, [H.as_dict(r.headers)[H.H_DLQ_REASON] for r in rb.dead]
    assert set(rb.positions()) == set(inputs)
    assert dups <= BATCH * PARTITIONS
    after = {p for p in second}
    versions_after = {version(r) for r in rb.outputs if streams.source_position(r) in after}
    assert versions_after == {b"1.0.0"}, f"the standby must score the rest; saw {versions_after}"
    assert killed_at < len(first), "the kill came after the first half was done: not mid-stream"
    assert 'failoverd_failovers_total{integration="faust",reason="worker_crashed"} 1.0' in scrape(port).splitlines()
    assert list(app.model_workers()) == [n for n in app.model_workers() if digests["v1"] in n]


async def test_release_promote_switches_the_running_app(setup, kafka_bootstrap):
    names, config, app, _ = setup
    port = app.start().metrics_port
    inputs = await produce(kafka_bootstrap, names["input"], streams.transactions(200, seed=3))
    async with Readback(kafka_bootstrap, names) as rb:
        await rb.until(lambda: set(inputs) <= set(rb.positions()), app, 40, "outputs of 2.0.0")
        assert {version(r) for r in rb.outputs} == {b"2.0.0"}
        await following(port, app)
        promote = subprocess.run([sys.executable, "-m", "daemon", "release", "promote", "fraud-scorer@1.0.0",
                                  "--channel", "active", "--reason", "faust integration test", "--config",
                                  str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert promote.returncode == 0, promote.stderr
        await produce_until_standby_answers(rb, app, kafka_bootstrap, names["input"], inputs, 11,
                                            "an output of fraud-scorer 1.0.0 after the promotion")
        last = await produce(kafka_bootstrap, names["input"], streams.transactions(200, seed=99))
        inputs.update(last)
        await rb.until(lambda: set(inputs) <= set(rb.positions()), app, 30, "an output for every input")
    report("promote", inputs, rb)
    assert {version(r) for r in rb.outputs if streams.source_position(r) in last} == {b"1.0.0"}
    assert "releases changed" in app.log()


async def test_a_poison_record_becomes_a_dead_letter(setup, kafka_bootstrap):
    names, _, app, _ = setup
    port = app.start().metrics_port
    good = streams.transactions(300, seed=5)
    value = orjson.loads(good[0][1])
    poison = [
        (b"card-p1", b"{not json"),
        (b"card-p2", orjson.dumps({**value, "card_id": "card-p2", "fault": "raise"})),
        (b"card-p3", orjson.dumps({**value, "card_id": "card-p3", "amount": -5.0})),
        (b"card-p4", orjson.dumps({"card_id": "card-p4", "amount": 1.0})),
    ]
    records = good[:150] + poison + good[150:]
    inputs = await produce(kafka_bootstrap, names["input"], records)
    async with Readback(kafka_bootstrap, names) as rb:
        await rb.until(lambda: set(inputs) <= set(rb.positions()), app, 40, "an output or dead letter per input")
    report("poison", inputs, rb)
    reasons = {H.as_dict(r.headers)[H.H_DLQ_REASON].decode(): r for r in rb.dead}
    assert set(reasons) == {"bad_json", "model_exception", "model_error", "schema"}
    assert reasons["bad_json"].value == b"{not json"  # the original bytes
    for reason, r in reasons.items():
        h = H.as_dict(r.headers)
        assert h[H.H_RELEASE_VERSION] == b"2.0.0" and h[H.H_DLQ_DETAIL], reason
        assert inputs[(int(h[H.H_SOURCE_PARTITION]), int(h[H.H_SOURCE_OFFSET]))] == r.value
    assert len({streams.source_position(r) for r in rb.outputs}) == len(good)
    assert "failed over" not in app.log(), "a poison record must cost a dead letter, not a failover"
    # the daemon's metric names, told apart by the integration label
    text = scrape(port)
    for reason in ("bad_json", "model_exception", "model_error", "schema"):
        assert any(line.startswith("failoverd_records_dead_lettered_total{") and 'integration="faust"' in line
                   and f'reason="{reason}"' in line and line.endswith(" 1.0") for line in text.splitlines()), reason
    assert any(line.startswith("failoverd_release_info{") and 'channel="active"' in line and 'version="2.0.0"' in line
               for line in text.splitlines())
    # per-card state went through the Table: a card's count rises with each of its records
    counts = collections.defaultdict(list)
    for r in sorted(rb.outputs, key=lambda r: streams.source_position(r)):
        out = orjson.loads(r.value)
        counts[(streams.source_position(r)[0], out["card_id"])].append(out["count"])
    assert any(len(c) > 1 for c in counts.values())
    assert all(c == sorted(c) and c[0] == 1 for c in counts.values()), "state did not follow each card"


async def test_failoverd_failover_reaches_the_running_app(setup, kafka_bootstrap):
    names, config, app, _ = setup
    port = app.start().metrics_port
    inputs = await produce(kafka_bootstrap, names["input"], streams.transactions(100, seed=7))
    async with Readback(kafka_bootstrap, names) as rb:
        await rb.until(lambda: set(inputs) <= set(rb.positions()), app, 40, "outputs of 2.0.0")
        await following(port, app)
        request = subprocess.run([sys.executable, "-m", "daemon", "failover", "--reason", "faust integration drill",
                                  "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert request.returncode == 0, request.stderr
        await produce_until_standby_answers(rb, app, kafka_bootstrap, names["input"], inputs, 21,
                                            "an output of the standby (1.0.0) after `failoverd failover`")
        await rb.until(lambda: set(inputs) <= set(rb.positions()), app, 30, "an output for every input")
    report("failover request", inputs, rb)
    assert 'failoverd_failovers_total{integration="faust",reason="manual"} 1.0' in scrape(port).splitlines()
