"""When to checkpoint, and what a checkpoint record says.

A checkpoint is one Kafka transaction per input partition: outputs, dead letters, the state
changelog of the interval, this record, and the consumer offset. Commit = checkpoint.
The record (compacted, key ``group/topic/partition``) says where the partition stands.
"""

from __future__ import annotations

import dataclasses
import time

from typing import Any

import orjson


@dataclasses.dataclass
class CheckpointPolicy:
    interval_ms: int
    interval_records: int
    last: float = dataclasses.field(default_factory=time.monotonic)
    records: int = 0

    def add(self, n: int) -> None:
        self.records += n

    def due(self, now: float | None = None) -> bool:
        if self.records <= 0:
            return False
        if self.records >= self.interval_records:
            return True
        return ((now or time.monotonic()) - self.last) * 1000 >= self.interval_ms

    def time_left(self, now: float | None = None) -> float:
        """Seconds until the time trigger fires (how long a fetch may wait)."""
        return max(0.0, self.interval_ms / 1000 - ((now or time.monotonic()) - self.last))

    def reset(self) -> None:
        self.last = time.monotonic()
        self.records = 0


def record_key(group: str, topic: str, partition: int) -> bytes:
    return f"{group}/{topic}/{partition}".encode()


def record_value(*, group: str, topic: str, partition: int, offset: int, changelog_records: int,
                 release: dict[str, Any], instance: str, records: int) -> bytes:
    """The checkpoint record: the input offset it commits (``offset``), how many input records and
    state changelog records the interval carried, and which release processed it."""
    return orjson.dumps({
        "group": group, "topic": topic, "partition": partition,
        "offset": offset, "changelog_records": changelog_records,
        "release": {k: release.get(k) for k in ("name", "version", "digest", "state_schema_version")},
        "instance": instance, "records": records, "time": time.time(),
    })
