"""The standby keeper's retry/backoff logic and the policy on release switches from the control
topic, with fakes of the loader and the engine (no broker, no model process). The guarantees
themselves (the active serves alone, exactly once; a reloaded standby takes over) are tested
against the real broker in tests/integration/test_standby_unavailable.py."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest

from daemon import metrics as m
from daemon.failover.policy import FailoverPolicy
from daemon.failover.standby import StandbyKeeper
from tests.unit.test_failover_logic import Clock


class FakeWorker:
    def __init__(self, pid: int, healthy: bool = True) -> None:
        self.pid, self.healthy, self.dead, self.closed, self.label = pid, healthy, False, False, "standby"
        self.returncode = None

    async def health(self) -> bool:
        return self.healthy

    async def close(self, timeout: float = 5.0) -> None:
        self.closed = True

    def kill(self) -> None:
        self.dead = True


class FakeRelease:
    def __init__(self, path: Path, pid: int, digest: str = "d-standby", healthy: bool = True) -> None:
        self.bundle_path, self.digest, self.ref, self.channel = Path(path), digest, f"rel@{digest}", "standby"
        self.worker = FakeWorker(pid, healthy)

    def describe(self) -> dict:
        return {"name": "rel", "version": self.digest, "digest": self.digest, "pid": self.worker.pid}


class FakeEngine:
    """The engine's control surface (daemon.engine.control.EngineControl) over plain attributes."""

    def __init__(self, active=None, standby=None) -> None:
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.closing = False
        self.active, self.standby = active, standby
        self.paused, self.pending_change, self.pending_failure = False, None, None
        self.instance_id, self.failed_at, self.last_replay = "test", 0.0, 0
        self.published = 0
        self.hooks: list = []

    @property
    def releases(self):
        from daemon.engine.control import Releases

        return Releases(self.active, self.standby)

    @property
    def is_paused(self) -> bool:
        return self.paused

    def publish_release_info(self) -> None:
        self.published += 1

    def switch_active(self, release) -> None:
        release.channel = "active"
        self.active = release

    def install_standby(self, release):
        old, self.standby = self.standby, release
        if release is not None:
            release.channel = "standby"
        self.publish_release_info()
        return old

    def drop_standby(self, release) -> bool:
        if self.standby is not release:
            return False
        self.install_standby(None)
        return True

    def pause(self, why: str) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def request_failover(self, failure) -> bool:
        if self.pending_failure is not None:
            return False
        self.pending_failure = failure
        return True

    def request_change(self, change, *, replace: bool = True) -> bool:
        if not replace and self.pending_change is not None:
            return False
        self.pending_change = change
        return True

    def mark_activated(self, release) -> None:
        pass

    def checkpoint_soon(self) -> None:
        pass

    def committed_offsets(self) -> dict:
        return {}

    def release_started(self, digest: str):
        return None

    def on_checkpoint(self, hook) -> None:
        self.hooks.append(hook)


class FlakyLoader:
    """Fails ``fail`` times, then loads; records the keeper's backoff at each call."""

    def __init__(self, fail: int, keeper_ref: list, healthy: bool = True) -> None:
        self.fail, self.calls, self.keeper_ref, self.healthy = fail, [], keeper_ref, healthy
        self.loaded: list[FakeRelease] = []

    async def __call__(self, path: Path, channel: str) -> FakeRelease:
        self.calls.append((Path(path), channel, self.keeper_ref[0].delay))
        if len(self.calls) <= self.fail:
            raise RuntimeError(f"constructor raised (try {len(self.calls)})")
        rel = FakeRelease(path, pid=100 + len(self.calls), healthy=self.healthy)
        self.loaded.append(rel)
        return rel


def keeper_with(loader_fail: int, path: Path | None = Path("/b/standby.fdb"), **kw):
    ref: list = []
    loader = FlakyLoader(loader_fail, ref, healthy=kw.pop("healthy", True))
    installed: list = []

    async def on_installed(engine, release) -> None:
        assert engine.lock.locked()  # installed and announced in one critical section
        installed.append(release)

    keeper = StandbyKeeper(loader=loader, path=path, on_installed=on_installed,
                           initial_delay=kw.pop("initial_delay", 0.01), max_delay=kw.pop("max_delay", 0.04),
                           poll=0.005, **kw)
    ref.append(keeper)
    return keeper, loader, installed


async def run_until(engine, keeper, cond, timeout: float = 5.0) -> None:
    task = asyncio.create_task(keeper.run(engine))
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.002)
    finally:
        engine.stopping.set()
        await asyncio.wait_for(task, 2)


async def test_retries_with_doubling_backoff_capped_then_installs():
    engine = FakeEngine()
    keeper, loader, installed = keeper_with(loader_fail=4)
    before = m.STANDBY_LOAD_FAILURES._value.get()
    await run_until(engine, keeper, lambda: engine.standby is not None)
    # the delay each retry waited: 0.01, 0.02, 0.04, then capped at 0.04
    assert [d for _, _, d in loader.calls] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert all(ch == "standby" for _, ch, _ in loader.calls)
    assert m.STANDBY_LOAD_FAILURES._value.get() - before == 4
    assert installed == [engine.standby] and engine.published == 1
    assert keeper.failures == 0 and keeper.error is None and keeper.pending(engine) is None


async def test_pending_reports_the_error_and_next_retry_while_failing():
    engine = FakeEngine()
    keeper, loader, _ = keeper_with(loader_fail=100, initial_delay=30, max_delay=60)
    await run_until(engine, keeper, lambda: keeper.failures == 1)
    p = keeper.pending(engine)
    assert p["error"] == "constructor raised (try 1)" and p["failures"] == 1 and not p["loading"]
    assert 29 <= p["next_retry_in_s"] <= 30 and p["next_retry_at"] is not None
    assert engine.standby is None and len(loader.calls) == 1  # waits for its backoff, no busy retry


async def test_unhealthy_candidate_is_closed_and_counts_as_a_failure():
    engine = FakeEngine()
    keeper, loader, installed = keeper_with(loader_fail=0, healthy=False, initial_delay=30)
    await run_until(engine, keeper, lambda: keeper.failures == 1)
    assert engine.standby is None and not installed
    assert loader.loaded[0].worker.closed and "failed its health check" in keeper.error


async def test_dead_standby_is_dropped_and_reloaded():
    engine = FakeEngine()
    keeper, loader, installed = keeper_with(loader_fail=0)
    await run_until(engine, keeper, lambda: engine.standby is not None)
    first = engine.standby
    engine.stopping.clear()
    first.worker.dead = True  # what the engine's _watch_standby does for a worker that exited
    await run_until(engine, keeper, lambda: engine.standby is not None and engine.standby is not first)
    assert first.worker.closed and engine.standby.worker.pid != first.worker.pid
    assert installed == [first, engine.standby]


async def test_standby_dying_right_after_loading_backs_off():
    engine = FakeEngine()
    keeper, loader, _ = keeper_with(loader_fail=0, initial_delay=30, max_delay=60)
    await run_until(engine, keeper, lambda: engine.standby is not None)
    engine.stopping.clear()
    engine.standby.worker.dead = True
    await run_until(engine, keeper, lambda: engine.standby is None and keeper.failures == 1)
    assert "standby worker rel@d-standby" in keeper.error and keeper.pending(engine)["next_retry_in_s"] > 25
    assert len(loader.calls) == 1  # not reloaded in a tight loop


async def test_new_target_replaces_a_failing_one_at_once_and_keeps_the_old_standby_meanwhile():
    old = FakeRelease(Path("/b/old.fdb"), pid=7)
    engine = FakeEngine(standby=old)
    keeper, loader, installed = keeper_with(loader_fail=1, path=Path("/b/new.fdb"), initial_delay=30)
    await run_until(engine, keeper, lambda: keeper.failures == 1)
    assert engine.standby is old and not old.worker.closed  # still a standby while the new one fails
    engine.stopping.clear()
    keeper.path = Path("/b/newer.fdb")  # a promotion: no waiting for the old target's backoff
    assert keeper.failures == 0 and keeper.error is None
    await run_until(engine, keeper, lambda: engine.standby is not old)
    assert engine.standby.bundle_path == Path("/b/newer.fdb") and old.worker.closed


async def test_nothing_installed_into_a_stopping_engine():
    engine = FakeEngine()
    gate = asyncio.Event()

    async def slow_loader(path, channel):
        await gate.wait()
        return FakeRelease(path, pid=1)

    keeper = StandbyKeeper(loader=slow_loader, path=Path("/b/s.fdb"), poll=0.005)
    task = asyncio.create_task(keeper.run(engine))
    await asyncio.sleep(0.02)
    engine.closing = True
    gate.set()
    await asyncio.wait_for(task, 2)
    assert engine.standby is None


# ---- the policy on release switches from the control topic ---------------------------------
def test_wait_s_covers_cooldown_and_cap():
    clock = Clock()
    p = FailoverPolicy(cooldown_s=5, max_failovers=2, window_s=100, clock=clock)
    assert p.wait_s() == 0
    p.record()
    clock.t += 1
    assert p.wait_s() == pytest.approx(4)
    clock.t += 9
    p.record()
    assert p.wait_s() == pytest.approx(90)  # capped: until the first failover leaves the window
    clock.t += 91
    assert p.wait_s() == 0 and p.check() is None


def controller(cooldown_ms: int = 60000, max_failovers: int = 3):
    from daemon.failover.controller import FailoverController

    f = types.SimpleNamespace(standby_mode="warm", error_window=10, min_samples=5, error_rate_threshold=0.5,
                              latency_p99_slo_ms=1000, output_invalid_rate_threshold=0.5, cooldown_ms=cooldown_ms,
                              max_failovers=max_failovers, window_ms=600000, failback=False, failback_delay_ms=0)
    settings = types.SimpleNamespace(failover=f, registry=types.SimpleNamespace(path="/nonexistent"))

    async def loader(path, channel):
        raise AssertionError("not loaded in these tests")

    return FailoverController(settings, loader=loader, standby_path=None)


def engine_on_v2_with_v1_standby():
    active = FakeRelease(Path("/b/v2.fdb"), pid=2, digest="v2")
    active.channel = "active"
    standby = FakeRelease(Path("/b/v1.fdb"), pid=1, digest="v1")
    return FakeEngine(active=active, standby=standby)


async def failover_deferred_in_cooldown(cooldown_ms: int):
    """A controller that failed over a moment ago (in its cool-down) on an engine on v2 with v1 as
    standby, after another instance's failover to v1 reached it: (controller, engine, that change)."""
    c = controller(cooldown_ms=cooldown_ms)
    engine = engine_on_v2_with_v1_standby()
    c.attach(engine)
    c.policy.record()  # this instance failed over a moment ago
    change = {"active": "v1", "standby": "v1", "kind": "failover", "ref": "rel@v1"}
    await c.apply_change(engine, change)
    assert engine.active.digest == "v2", "switched inside the cool-down"
    return c, engine, change


async def test_switch_following_another_instances_failover_is_deferred_in_cooldown_not_dropped():
    c, engine, change = await failover_deferred_in_cooldown(150)
    assert any(e["kind"] == "deferred" for e in c.events)
    for _ in range(200):  # re-queued at the end of the cool-down
        if engine.pending_change is not None:
            break
        await asyncio.sleep(0.01)
    assert engine.pending_change is change
    engine.pending_change = None
    await c.apply_change(engine, change)
    assert engine.active.digest == "v1" and len(c.policy.history) == 2  # applied, and counted


async def test_operator_promote_is_not_held_by_the_policy_and_supersedes_a_deferred_switch():
    c, engine, _ = await failover_deferred_in_cooldown(100)
    # the operator promotes v1 to active: applied at once, not counted toward the cap
    await c.apply_change(engine, {"active": "v1", "standby": "v1", "kind": "promote", "channel": "active",
                                  "ref": "rel@v1"})
    assert engine.active.digest == "v1" and len(c.policy.history) == 1
    await asyncio.sleep(0.2)
    assert engine.pending_change is None  # the deferred switch is not re-queued: it was superseded


async def test_newer_change_cancels_the_requeue_of_a_deferred_one():
    c, engine, _ = await failover_deferred_in_cooldown(100)
    await c.apply_change(engine, {"active": "v2", "standby": "v1", "kind": "rollback", "ref": "rel@v2"})
    await asyncio.sleep(0.2)
    assert engine.pending_change is None and engine.active.digest == "v2"


async def test_first_attempt_is_signalled_whether_it_loads_or_fails():
    assert StandbyKeeper(loader=None, path=None).first_attempt.is_set()  # nothing to wait for
    for fail in (0, 1):
        engine = FakeEngine()
        keeper, _, _ = keeper_with(loader_fail=fail, initial_delay=30)
        assert not keeper.first_attempt.is_set()
        await run_until(engine, keeper, keeper.first_attempt.is_set)
        assert (engine.standby is not None) == (fail == 0)  # installed before the signal, when it loads
