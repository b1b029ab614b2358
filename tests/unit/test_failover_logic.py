"""Pure logic of failure detection and the anti-flapping policy (no broker)."""

from __future__ import annotations

from daemon.failover.policy import FailoverPolicy
from daemon.failover.signals import HealthMonitor, SlidingQuantile, SlidingRate


def monitor(**kw) -> HealthMonitor:
    args = dict(window=10, min_samples=5, error_rate=0.5, latency_p99_s=0.2, invalid_rate=0.5)
    args.update(kw)
    return HealthMonitor(**args)


def test_sliding_rate_forgets_old_samples():
    r = SlidingRate(4)
    for bad in (True, True, False, False, False, False):
        r.add(bad)
    assert r.count == 4 and r.rate == 0.0
    r.add(True)
    assert r.rate == 0.25


def test_sliding_rate_counts_a_large_batch_proportionally():
    r = SlidingRate(10)
    r.add_counts(bad=500, total=1000)
    assert r.count == 10 and r.rate == 0.5


def test_quantile():
    q = SlidingQuantile(100)
    for v in range(1, 101):
        q.add(v / 100)
    assert q.quantile(0.99) == 0.99 and q.quantile(0.5) == 0.5


def test_exception_rate_needs_min_samples_before_firing():
    m = monitor()
    for _ in range(4):
        assert m.batch_failed() is None  # 4 < min_samples
    verdict = m.batch_failed()
    assert verdict is not None and verdict.reason == "exception_rate"


def test_exception_rate_below_threshold_does_not_fire():
    m = monitor()
    for i in range(10):
        v = m.batch_failed() if i % 3 == 0 else m.batch_ok(0.01, 10, 0)
        assert v is None


def test_latency_slo_fires_on_p99():
    m = monitor()
    for _ in range(4):
        assert m.batch_ok(0.01, 10, 0) is None
    verdict = m.batch_ok(0.5, 10, 0)
    assert verdict is not None and verdict.reason == "latency_slo" and "500 ms" in verdict.detail


def test_invalid_output_rate():
    m = monitor()
    assert m.batch_ok(0.01, 4, 1) is None  # 4 samples, under min
    verdict = m.batch_ok(0.01, 6, 5)
    assert verdict is not None and verdict.reason == "output_invalid"


def test_reset_clears_every_window():
    m = monitor()
    for _ in range(5):
        m.batch_failed()
    m.reset()
    assert m.check() is None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_cooldown_blocks_then_allows():
    clock = Clock()
    p = FailoverPolicy(cooldown_s=5, max_failovers=10, window_s=60, clock=clock)
    assert p.check() is None
    p.record()
    clock.t += 1
    assert "cool-down" in p.check() and not p.capped()
    assert 3.9 < p.cooldown_left() <= 4.0
    clock.t += 4.5
    assert p.check() is None


def test_cap_per_window_and_expiry():
    clock = Clock()
    p = FailoverPolicy(cooldown_s=0, max_failovers=3, window_s=60, clock=clock)
    for _ in range(3):
        assert p.check() is None
        p.record()
        clock.t += 1
    assert "cap reached" in p.check() and p.capped()
    clock.t += 60
    assert p.check() is None


def test_records_failing_alone_fail_the_release_over_even_one_per_batch():
    """Isolation dead-letters a record that makes predict fail; a release that fails on most records
    must still fail over when each batch holds a single record (no batch ever fails as a whole)."""
    m = monitor()
    verdicts = [m.batch_ok(0.01, records=1, invalid_outputs=0, failed_records=1) for _ in range(5)]
    assert verdicts[:4] == [None] * 4
    assert verdicts[4] is not None and verdicts[4].reason == "exception_rate"
    assert "of the last 5 records" in verdicts[4].detail


def test_a_few_poison_records_among_many_do_not_fail_the_release_over():
    m = monitor()
    assert all(m.batch_ok(0.01, records=100, invalid_outputs=0, failed_records=2) is None for _ in range(50))
