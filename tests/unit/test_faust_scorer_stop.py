"""The faust integration stopped while its releases load: no model process outlives the stop.

faust cancels the integration's task at shutdown, which may come while the release's worker is
still loading; the load ran on (shielded, so every caller waits for the one start), and the
worker it started after the stop was never closed. No broker: the releases load from files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import textwrap

from daemon.integrations.faust import FaustScorer
from tests import kafkatools
from tests.hostile import harness as h


class _App:
    """What FaustScorer needs of a faust app: ``task`` (the integration registers its loader)."""

    def task(self, fn):
        return fn


async def test_a_stop_while_the_release_loads_leaves_no_model_process(tmp_path):
    loading = tmp_path / "model-is-loading"
    bundle = h.build_bundle(tmp_path, name="counter", version=h.GOOD_VERSION, source=h.model_source(
        init=textwrap.dedent(f"""
            open({str(loading)!r}, 'w').close()
            time.sleep(10**6)
            """)))
    scorer = FaustScorer.from_bundles(_App(), bundle, unpack_dir=tmp_path / "unpacked")
    starting = asyncio.ensure_future(scorer.start())
    await kafkatools.wait_for(lambda: loading.exists(), timeout=60, what="the model's constructor to run")
    out = subprocess.run(["pgrep", "-f", f"daemon.engine.worker_main {bundle}"], capture_output=True, text=True)
    pids = [int(x) for x in out.stdout.split()]
    assert pids, "the loading worker was not found"
    try:
        await scorer.stop()
        # each worker leads a session of its own: none of it may be left (zombies aside)
        left = lambda: [q for p in pids for q in h.session_processes(p, include_leader=True)]  # noqa: E731
        await kafkatools.wait_for(lambda: not left(), timeout=3,
                                  what=f"the loading worker {pids} to be gone after the stop")
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, 9)  # the test failed: leave nothing behind
