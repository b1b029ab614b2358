"""Rate- and latency-based failure signals over sliding windows (pure logic, unit-tested).

Each signal needs ``min_samples`` observations before it can fire, so one bad batch at start-up
does not fail a release over.
"""

from __future__ import annotations

import collections
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Verdict:
    reason: str
    detail: str


class SlidingRate:
    """Share of bad samples among the last ``window`` samples."""

    def __init__(self, window: int) -> None:
        self.samples: collections.deque[int] = collections.deque(maxlen=window)
        self.bad = 0

    def add(self, bad: bool, n: int = 1) -> None:
        for _ in range(n):
            if len(self.samples) == self.samples.maxlen:
                self.bad -= self.samples[0]
            self.samples.append(1 if bad else 0)
            self.bad += 1 if bad else 0

    def add_counts(self, bad: int, total: int) -> None:
        if total > (self.samples.maxlen or 0):
            ratio = bad / total
            total = self.samples.maxlen or 0
            bad = round(ratio * total)
        self.add(True, bad)
        self.add(False, total - bad)

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def rate(self) -> float:
        return self.bad / len(self.samples) if self.samples else 0.0

    def reset(self) -> None:
        self.samples.clear()
        self.bad = 0


class SlidingQuantile:
    def __init__(self, window: int) -> None:
        self.samples: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    @property
    def count(self) -> int:
        return len(self.samples)

    def reset(self) -> None:
        self.samples.clear()


class HealthMonitor:
    """Watches the active release: exception rate, p99 predict latency, invalid-output rate."""

    def __init__(self, *, window: int, min_samples: int, error_rate: float, latency_p99_s: float,
                 invalid_rate: float) -> None:
        self.min_samples = min_samples
        self.error_rate = error_rate
        self.latency_p99_s = latency_p99_s
        self.invalid_rate = invalid_rate
        self.exceptions = SlidingRate(window)
        self.latency = SlidingQuantile(window)
        self.invalid = SlidingRate(window)
        self.record_failures = SlidingRate(window)
        """Records that made predict fail on their own (isolated by splitting: model_exception)."""

    def batch_ok(self, predict_seconds: float, records: int, invalid_outputs: int,
                 failed_records: int = 0) -> Verdict | None:
        """``failed_records``: records dead-lettered as model_exception (each failed predict alone).
        A release that fails on most records fails over even when every batch holds one record
        (isolation would otherwise dead-letter them one by one forever)."""
        self.exceptions.add(False)
        self.latency.add(predict_seconds)
        if records:
            self.invalid.add_counts(invalid_outputs, records)
            self.record_failures.add_counts(failed_records, records)
        return self.check()

    def batch_failed(self) -> Verdict | None:
        self.exceptions.add(True)
        return self.check()

    def check(self) -> Verdict | None:
        if self.exceptions.count >= self.min_samples and self.exceptions.rate >= self.error_rate:
            return Verdict("exception_rate", f"{self.exceptions.rate:.0%} of the last {self.exceptions.count} "
                                             f"batches raised (threshold {self.error_rate:.0%})")
        failures = self.record_failures
        if failures.count >= self.min_samples and failures.rate >= self.error_rate:
            return Verdict("exception_rate", f"predict failed on {failures.rate:.0%} of the last {failures.count} "
                                             f"records (threshold {self.error_rate:.0%})")
        if self.latency.count >= self.min_samples:
            p99 = self.latency.quantile(0.99)
            if p99 > self.latency_p99_s:
                return Verdict("latency_slo", f"p99 predict latency {p99 * 1000:.0f} ms over the last "
                                              f"{self.latency.count} batches exceeds {self.latency_p99_s * 1000:.0f} ms")
        if self.invalid.count >= self.min_samples and self.invalid.rate >= self.invalid_rate:
            return Verdict("output_invalid", f"{self.invalid.rate:.0%} of the last {self.invalid.count} outputs "
                                             f"failed the output schema (threshold {self.invalid_rate:.0%})")
        return None

    def reset(self) -> None:
        self.exceptions.reset()
        self.latency.reset()
        self.invalid.reset()
        self.record_failures.reset()
