"""An unexpected error that escapes the loop commits nothing (issue: Nothing lost, point 6).

The engine runs in this process against the real broker; the fault is injected by replacing the
step that writes a batch's outputs (the batch's states are stored by then) with one that raises.
Before: ``Engine.close()`` still took a final checkpoint, committing those states without the
batch's offsets, so the replay after a restart applied the batch to its keys twice. Now the loop's
end on an error aborts; a real daemon started afterwards on the same state and group outputs every
input once, with per-card counts that run 1, 2, 3, ...
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from daemon.engine.engine import Engine
from daemon.engine.release import load_release
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _run_until_done


class Injected(RuntimeError):
    pass


async def test_an_error_escaping_the_loop_after_states_were_stored_commits_nothing(
        kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "escape", partitions=1)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"worker": {"max_batch_records": 100}})
    records = streams.transactions(1000, seed=41, n_cards=5)
    await kafkatools.produce(kafka_bootstrap, names["input"], records)

    settings = config.load(cfg)
    active = await load_release(example_bundles["v1"], channel="active", mode="inprocess",
                                unpack_dir=Path(settings.state.directory) / "bundles", predict_timeout=5,
                                start_timeout=60)
    engine = Engine(settings, active=active)
    emitted = 0
    real_emit = engine._emit

    async def emit(batch):
        nonlocal emitted
        emitted += 1
        if emitted == 4:  # a few batches in: earlier ones are written, this one's states are stored
            raise Injected("a bug in the output step")
        await real_emit(batch)

    engine._emit = emit
    await engine.start()
    with pytest.raises(Injected):
        await engine.run()
    fatal = engine.fatal

    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "d.log").start()
    try:
        await _run_until_done(kafka_bootstrap, names, len(records), [d])
        assert d.terminate() == 0
    finally:
        if d.alive():
            d.kill9()
    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    streams.assert_counts_chain(outputs)
    assert isinstance(fatal, Injected)  # the daemon exits 1 on it: a supervisor restarts it
