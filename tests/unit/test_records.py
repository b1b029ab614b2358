"""The tolerant batch reader (daemon/engine/records.py) on real record-batch bytes built with
aiokafka's own batch builder: what aiokafka's C reader raises on becomes a marker record, and every
other record of the batch still comes out."""

from __future__ import annotations

import pytest
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from daemon.engine import records as R


class RawKey(str):
    """A header key whose wire bytes are not UTF-8 (what a non-Java/Python producer can send)."""

    def encode(self, *args, **kwargs) -> bytes:  # noqa: ARG002
        return b"\xff\xfebad"


def batch_bytes(n: int, bad: set[int] = frozenset(), base_offset: int = 0) -> bytes:
    b = _DefaultRecordBatchBuilderPy(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                     producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i in range(n):
        headers = [("ok", b"1")] + ([(RawKey("x"), b"v")] if i in bad else [])
        b.append(i, timestamp=1_700_000_000_000 + i, key=f"k{i}".encode(), value=f"v{i}".encode(), headers=headers)
    raw = bytearray(b.build())
    raw[0:8] = base_offset.to_bytes(8, "big", signed=True)
    return bytes(raw)


def read_all(records_cls, data: bytes) -> list:
    tp = TopicPartition("t", 0)
    pr = PartitionRecords(tp, records_cls(data), None, 0, None, None, True, 0)
    return list(pr)


def test_aiokafka_c_reader_raises_on_a_header_key_that_is_not_utf8():
    with pytest.raises(UnicodeDecodeError):
        read_all(MemoryRecords, batch_bytes(10, {4}))


def test_tolerant_reader_returns_every_record_and_marks_the_bad_one():
    before = R.STATS.markers
    data = batch_bytes(10, {4}) + batch_bytes(5, base_offset=10)
    got = read_all(R.TolerantMemoryRecords, data)
    assert [r.offset for r in got] == list(range(15))
    marked = [r for r in got if R.is_marker(r)]
    assert [r.offset for r in marked] == [4]
    bad = marked[0]
    assert bad.key == b"k4" and bad.value == b"v4"  # the raw bytes are recovered
    assert bad.headers[0] == ("ok", b"1")
    assert bad.headers[1][0] == "\\xff\\xfebad"
    assert b"not valid UTF-8" in bad.headers[-1][1]
    assert R.STATS.markers == before + 1
    assert all(not R.is_marker(r) and r.value == f"v{r.offset % 10}".encode() for r in got if r.offset != 4)


def test_tolerant_reader_is_identical_on_clean_batches():
    data = batch_bytes(50) + batch_bytes(20, base_offset=50)
    ref = read_all(MemoryRecords, data)
    got = read_all(R.TolerantMemoryRecords, data)
    assert [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in got] == \
           [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in ref]


def test_a_batch_failing_its_crc_becomes_one_marker_per_offset():
    data = bytearray(batch_bytes(6))
    data[-1] ^= 0xFF  # flip a bit in the last record
    with pytest.raises(Exception):
        read_all(MemoryRecords, bytes(data))
    got = read_all(R.TolerantMemoryRecords, bytes(data))
    assert [r.offset for r in got] == list(range(6))
    assert all(R.is_marker(r) and b"CRC" in r.headers[-1][1] for r in got)


def test_a_partial_trailing_batch_waits_for_the_next_fetch():
    data = batch_bytes(3) + batch_bytes(3, base_offset=3)[:20]
    assert [r.offset for r in read_all(R.TolerantMemoryRecords, data)] == [0, 1, 2]
