"""One assigned input partition: its transactional producer, state store and offsets.

The transactional id is ``{app}.{topic}.{partition}``: whichever instance owns the partition
initialises the producer with that id, which fences every earlier owner (aiokafka has no
KIP-447, so per-partition ids are what makes a woken zombie's commit fail).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition

from daemon.engine.state import StateStore


def transactional_id(app: str, topic: str, partition: int) -> str:
    return f"{app}.{topic}.{partition}"


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
    return Path(state_dir) / tp.topic / f"{tp.partition}.sqlite"
