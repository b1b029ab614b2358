"""One assigned input partition: its transactional producer, state store and offsets.

The transactional id is ``{app}:{group}:{topic}:{partition}``: whichever instance owns the
partition initialises the producer with that id, which fences every earlier owner (aiokafka has no
KIP-447, so per-partition ids are what makes a woken zombie's commit fail). The consumer group is
part of it, so two pipelines on one cluster never fence each other, even with the same app name
and input topic (two groups consuming one topic are two pipelines; one group is one pipeline).
``:`` cannot occur in an app name or a topic name, so the id names exactly one (app, group, topic,
partition), whatever characters the group id holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from daemon.engine.state import StateStore


def transactional_id(app: str, group: str, topic: str, partition: int) -> str:
    return f"{app}:{group}:{topic}:{partition}"


@dataclasses.dataclass(eq=False)
class Partition:
    tp: TopicPartition
    store: StateStore
    producer: AIOKafkaProducer | None
    committed: int
    """Input offset of the last checkpoint (where a replay starts)."""
    position: int = -1
    """Next input offset after the last processed record."""
    highest: int = -1
    """Highest ``position`` ever reached (to count replayed records after a rewind)."""
    fetched: int = -1
    """Next input offset after the last record handed to the model (runs ahead of ``position`` by
    the batches in flight or held)."""
    in_txn: bool = False
    uncommitted: int = 0
    acks: list[asyncio.Future[Any]] = dataclasses.field(default_factory=list)
    """Delivery futures of what was written into the open transaction (awaited before it commits)."""
    topic_b: bytes = b""
    partition_b: bytes = b""
    last_checkpoint_time: float = 0.0

    def __post_init__(self) -> None:
        if self.position < 0:
            self.position = self.committed
        self.highest = max(self.highest, self.position)
        self.fetched = max(self.fetched, self.position)
        self.topic_b = self.tp.topic.encode()
        self.partition_b = str(self.tp.partition).encode()


def store_path(state_dir: Path, tp: TopicPartition) -> Path:
    topic: str = tp.topic
    return Path(state_dir) / topic / f"{tp.partition}.sqlite"
