"""Record batches as the local broker stored them: read straight from its log segment files.

aiokafka's consumer decompresses batches and says nothing of how they were written; the broker's
``kafka-dump-log.sh`` (DumpLogSegments) is not among the jars `failoverd kafka up` fetches. The
v2 batch header is small and fixed (Kafka's DefaultRecordBatch), so the test reads it here:

    baseOffset int64 | batchLength int32 | partitionLeaderEpoch int32 | magic int8 | crc uint32 |
    attributes int16 (bits 0-2 codec, bit 4 transactional, bit 5 control) | lastOffsetDelta int32 ...

The broker writes segments through the page cache, so what it acknowledged is readable at once.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


@dataclasses.dataclass(frozen=True)
class Batch:
    base_offset: int
    size: int  # bytes on disk, header included
    records: int
    codec: str
    transactional: bool
    control: bool  # a transaction marker (commit/abort), never compressed


def batches(data_dir: Path, topic: str, partition: int) -> list[Batch]:
    """Every record batch of one partition, in offset order."""
    out: list[Batch] = []
    for segment in sorted((data_dir / f"{topic}-{partition}").glob("*.log")):
        raw = segment.read_bytes()
        pos = 0
        while pos + 61 <= len(raw):  # 61: the v2 batch header
            base_offset, length = struct.unpack_from(">qi", raw, pos)
            if length <= 0 or pos + 12 + length > len(raw):
                break  # preallocated tail, or a batch still being written
            magic = raw[pos + 16]
            assert magic == 2, f"{segment}: batch at byte {pos} has magic {magic}, expected 2"
            (attributes,) = struct.unpack_from(">h", raw, pos + 21)
            (count,) = struct.unpack_from(">i", raw, pos + 57)
            out.append(Batch(base_offset, 12 + length, count, CODECS[attributes & 0x07],
                             bool(attributes & 0x10), bool(attributes & 0x20)))
            pos += 12 + length
    return out


def data_batches(data_dir: Path, topic: str, partitions: int) -> list[Batch]:
    """The batches holding records (transaction markers left out) of every partition."""
    return [b for p in range(partitions) for b in batches(data_dir, topic, p) if not b.control]
