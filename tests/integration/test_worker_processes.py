"""``[worker] processes = 2`` against the real broker: a keyed, stateful model over 4 partitions.

Every input exactly once under read_committed, each card's counts 1, 2, 3... in source order (the
state of a key never leaves its process, and the carry between pipelined batches lands where the
key's state is), each key answered by one process of the release; then one process of the active
release killed with SIGKILL while records wait: the whole release fails over to the standby (also
two processes), none of the failed release's processes is left, and it is still exactly once.
"""

from __future__ import annotations

import collections
import re
import subprocess
from pathlib import Path

import orjson
import pytest

from daemon.engine.pool import member_of
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.hostile import harness
from tests.integration.test_failover import assert_switched_once, release_of

MODEL = '''\
"""Counts records per card; says which process answered. A little numpy-free work per record."""
import os

from daemon.model import Prediction


class Model:
    def __init__(self, context):
        self.pid = os.getpid()

    def predict(self, batch):
        out = []
        for r in batch:
            n = (r.state or {}).get("count", 0) + 1
            out.append(Prediction({"card_id": r.value["card_id"], "count": n, "seq": r.value.get("seq"),
                                   "score": 0.5, "pid": self.pid}, {"count": n}))
        return out
'''

TOTAL = 6000


def pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("processes")
    return {v: harness.build_bundle(tmp, name="pcount", version=v, source=MODEL) for v in ("1.0.0", "2.0.0")}


async def test_two_processes_exactly_once_and_a_killed_process_fails_the_release_over(kafka_bootstrap, tmp_path,
                                                                                      bundles):
    names = await make_topics(kafka_bootstrap, "procs", partitions=4)
    group = kafkatools.unique("g-procs")
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       group=group, app=kafkatools.unique("app-procs"),
                       extra={"failover": {"standby_mode": "warm", **harness.FAST_FAILOVER},
                              "worker": {"processes": 2, "predict_timeout_ms": 3000}})
    active, standby = bundles["2.0.0"], bundles["1.0.0"]
    d = DaemonProc(cfg, "--active-bundle", str(active), "--standby-bundle", str(standby),
                   log=tmp_path / "daemon.log").start()
    run = harness.Run(kafka_bootstrap, names, group, d, harness.Sent(), tmp_path)
    records = streams.transactions(TOTAL, seed=17, n_cards=40)
    try:
        # both releases up, two processes each
        await kafkatools.wait_for(lambda: d.check() and len(pgrep(f"worker_main {active}")) == 2
                                  and len(pgrep(f"worker_main {standby}")) == 2,
                                  timeout=90, what="two worker processes per release")
        first = TOTAL // 3
        await harness.produce(kafka_bootstrap, names["input"], records[:first], run.sent)
        await run.wait_committed(timeout=90)
        await run.wait_standby_ready()

        # SIGKILL one process of the active release (not the one /status names) while records wait
        victims = pgrep(f"worker_main {active}")
        assert len(victims) == 2, victims
        code, body = d.get("/status")
        named = orjson.loads(body)["active"] if code == 200 else {}
        assert sorted(named.get("pids", [])) == sorted(victims), (named, victims)  # /status names the whole pool
        victim = next(p for p in victims if p != named["pid"])
        await harness.produce(kafka_bootstrap, names["input"], records[first:2 * first], run.sent)
        subprocess.run(["kill", "-9", str(victim)], check=True)
        await harness.produce(kafka_bootstrap, names["input"], records[2 * first:], run.sent)
        await run.wait_committed(timeout=120)

        log = d.log()
        assert re.search(r"FAILOVER .*reason=worker_crashed", log), harness.tail(log)
        await kafkatools.wait_for(lambda: not pgrep(f"worker_main {active}"), timeout=10,
                                  what="no process of the failed release left")
        outputs, dead = await harness.read_results(run)
        assert not dead, [harness.reason_of(r) for r in dead[:5]]
        harness.assert_each_input_once(run.sent, outputs, dead)
        harness.assert_outputs_answer_their_inputs(run.sent, outputs)
        streams.assert_counts_chain(outputs)  # per (partition, card): 1, 2, 3... across the failover
        assert_switched_once(outputs, before="2.0.0", after="1.0.0")

        # each release spread the keys over its two processes, each key on one of them
        by_release: dict[str, dict[str, set[int]]] = collections.defaultdict(lambda: collections.defaultdict(set))
        for r in outputs:
            out = orjson.loads(r.value)
            by_release[release_of(r)][out["card_id"]].add(out["pid"])
        for version, cards in by_release.items():
            assert all(len(pids) == 1 for pids in cards.values()), (version, cards)
            by_member: dict[int, set[int]] = collections.defaultdict(set)
            for card, pids in cards.items():
                by_member[member_of(card.encode(), 2)] |= pids
            # the key's hash names its process: one process per hash value, two different ones
            assert sorted(by_member) == [0, 1] and all(len(p) == 1 for p in by_member.values()), (version, by_member)
            assert by_member[0] != by_member[1], (version, by_member)
        run.stop()
    finally:
        if d.alive():
            d.kill9()
