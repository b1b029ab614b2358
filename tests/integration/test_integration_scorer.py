"""daemon/integrations/scoring.py without a framework: real model workers of the example bundles.

The signals that need no kill: a release that raises on every batch fails over on the exception
rate (the batch it failed is scored again by the standby: every item has an answer from one
release), and the anti-flap policy keeps a live release scoring when there is nowhere to go.
"""

from __future__ import annotations

import orjson

from daemon.engine.batch import DLQ, NO_STATE, OK
from daemon.integrations.scoring import Options, Scorer
from tests import streams


def items(n: int, seed: int, fault: str | None = None, at: int = 0) -> list[tuple[bytes, bytes, int]]:
    out = []
    for i, (k, v) in enumerate(streams.transactions(n, seed=seed)):
        if fault and i == at:
            v = orjson.dumps({**orjson.loads(v), "fault": fault})
        out.append((k, v, NO_STATE))
    return out


def no_state(_rel) -> list:
    return []


async def test_exception_rate_fails_over_and_rescores_the_failed_batch(example_bundles, tmp_path):
    options = Options(unpack_dir=tmp_path / "unpacked", min_samples=3, error_window=10, error_rate=0.5,
                      cooldown_s=0.0)
    scorer = Scorer(options, active=example_bundles["v2"], standby=example_bundles["v1"], integration="test")
    await scorer.start()
    try:
        first = await scorer.score(items(20, 1), no_state)
        assert first.release.version == "2.0.0" and all(r[0] == OK for r in first.results)
        # "raise_all": 2.0.0 raises on this batch and on every batch after it
        broken = items(20, 2, fault="raise_all", at=0)
        answer = await scorer.score(broken, no_state)
        assert answer.release.version == "1.0.0"
        assert len(answer.results) == 20 and all(r[0] == OK for r in answer.results)
        assert [f["reason"] for f in scorer.failovers] == ["exception_rate"]
        assert scorer.active is not None and scorer.active.channel == "active" and scorer.standby is None
    finally:
        await scorer.stop()


async def test_a_verdict_without_a_standby_leaves_the_active_scoring(example_bundles, tmp_path):
    options = Options(unpack_dir=tmp_path / "unpacked", min_samples=2, error_window=10, invalid_rate=0.5)
    scorer = Scorer(options, active=example_bundles["v2"], integration="test")
    await scorer.start()
    try:
        for seed in range(4):  # every record's output fails the output schema: output_invalid verdicts
            batch = [(k, orjson.dumps({**orjson.loads(v), "fault": "bad_output"}), s) for k, v, s in items(5, seed)]
            answer = await scorer.score(batch, no_state)
            assert [r[1] for r in answer.results if r[0] == DLQ] == ["output_schema"] * 5
        assert scorer.failovers == [] and scorer.active is not None and scorer.active.version == "2.0.0"
    finally:
        await scorer.stop()
