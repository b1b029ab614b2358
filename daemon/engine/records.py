"""Fetched record batches that never stop the consumer.

aiokafka parses fetched batches in C and raises on anything it cannot parse: a header key that is
not UTF-8, a compression codec that is not installed, a CRC mismatch, a record whose lengths do not
add up. The exception escapes ``getmany()``, the records fetched before it are dropped, and every
later call fetches the same batch and raises again: one record stops the partition for good.

:func:`install` replaces the ``MemoryRecords`` class the fetcher builds per fetched partition
(``aiokafka.consumer.fetcher.MemoryRecords``; checked against aiokafka 0.14, pinned in
pyproject.toml) with :class:`TolerantMemoryRecords`. It cuts the fetched bytes into batches the same
way and lets aiokafka's C parser read each batch, so the hot path costs one generator step per
record. Only when the C parser raises is the batch read again in Python, record by record:

- a record that can be read is returned as usual (the records before the bad one are not lost);
- a record that cannot be read is returned as a *marker record*: its offset, key, value and
  headers as far as they could be read (header keys decoded with backslash escapes), plus a last
  header :data:`MARK` whose value says what was wrong. The engine turns it into a dead letter with
  reason ``undecodable`` inside the same exactly-once accounting as any other record;
- when nothing of the batch can be read (CRC mismatch, missing codec), every offset of the batch
  becomes a marker record without key or value.

:data:`STATS` counts the marker records made, so the engine looks for them only after one was.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchPy
from aiokafka.record.legacy_records import LegacyRecordBatch
from aiokafka.record.util import decode_varint

MARK = "fd.undecodable"
"""The last header of a marker record; its value is the reason the record could not be read."""


class _Stats:
    __slots__ = ("markers",)

    def __init__(self) -> None:
        self.markers = 0


STATS = _Stats()

_LENGTH_OFFSET = 8  # base offset (int64), then the batch length (int32)
_LOG_OVERHEAD = 12
_MAGIC_OFFSET = 16  # ... partition leader epoch (int32), then magic (int8)
_LENGTH = struct.Struct(">i")


class TolerantMemoryRecords:
    """Drop-in for aiokafka's ``MemoryRecords`` (the methods the fetcher calls)."""

    __slots__ = ("_buffer", "_pos", "_next")

    def __init__(self, data: bytes) -> None:
        self._buffer = data
        self._pos = 0
        self._next: memoryview | None = None
        self._cache_next()

    def size_in_bytes(self) -> int:
        return len(self._buffer)

    def _cache_next(self) -> None:
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < _LOG_OVERHEAD:
            self._next = None  # a partial batch at the end of a fetch: fetched again next time
            return
        end = pos + _LOG_OVERHEAD + _LENGTH.unpack_from(buffer, pos + _LENGTH_OFFSET)[0]
        if end > len(buffer) or end <= pos + _LOG_OVERHEAD:
            self._next = None
            return
        self._next = memoryview(buffer)[pos:end]
        self._pos = end

    def has_next(self) -> bool:
        return self._next is not None

    def next_batch(self) -> Any:
        raw = self._next
        if raw is None:
            return None
        self._cache_next()
        magic = raw[_MAGIC_OFFSET]
        if magic >= 2:
            return _TolerantBatch(raw)
        return LegacyRecordBatch(raw, magic)  # pre-0.11 message sets: as aiokafka reads them


class _TolerantBatch:
    """A v2 record batch read by aiokafka's C parser, re-read in Python only if that fails."""

    __slots__ = ("_raw", "_c", "_corrupt")

    def __init__(self, raw: memoryview) -> None:
        self._raw = raw
        self._c = DefaultRecordBatch(raw)
        self._corrupt: str | None = None

    def __getattr__(self, name: str) -> Any:  # base_offset, producer_id, is_control_batch, next_offset, ...
        return getattr(self._c, name)

    def validate_crc(self) -> bool:
        if not self._c.validate_crc():
            self._corrupt = "the record batch fails its CRC check"
        return True  # the fetcher would raise; the batch's offsets become marker records instead

    def __next__(self) -> Any:  # the fetcher reads a control batch's one record this way
        return next(self._c)

    def __iter__(self) -> Iterator[Any]:
        if self._corrupt is not None:
            return self._markers(0, self._corrupt)
        return self._records()

    def _records(self) -> Iterator[Any]:
        n = 0
        try:
            for record in self._c:
                yield record
                n += 1
        except Exception as exc:  # noqa: BLE001 - whatever the C parser cannot read is re-read below
            yield from self._salvage(n, f"{type(exc).__name__}: {exc}")

    def _salvage(self, done: int, why: str) -> Iterator[Any]:
        """Re-read the batch in Python after the C parser failed on record ``done``."""
        try:
            py = _DefaultRecordBatchPy(self._raw)
            py._maybe_uncompress()  # a missing codec raises here
            buffer, pos, count = py._buffer, py._pos, py._header_data[12]
        except Exception as exc:  # noqa: BLE001
            yield from self._markers(done, f"{why}; the batch cannot be read: {type(exc).__name__}: {exc}")
            return
        base = self._c.base_offset
        log_append = bool(self._c.attributes & 0x08)
        first_ts, max_ts = py.first_timestamp, py.max_timestamp
        for index in range(count):
            try:
                length, body = decode_varint(buffer, pos)
            except Exception:  # noqa: BLE001 - the rest of the batch cannot be delimited
                yield from self._markers(done, f"{why}; record {index} of the batch cannot be delimited",
                                         first=base + index)
                return
            end = body + length
            if index >= done:
                yield _read_record(buffer, body, end, base, index, first_ts, max_ts, log_append, why)
            pos = end

    def _markers(self, done: int, why: str, first: int | None = None) -> Iterator[_Record]:
        """One marker record per offset of the batch from ``first`` (or the ``done``-th) on."""
        c = self._c
        start = first if first is not None else c.base_offset + done
        for offset in range(start, c.next_offset):
            STATS.markers += 1
            yield _Record(offset, c.max_timestamp, 0, None, None, [(MARK, why.encode()[:1000])])


def _read_record(buffer: Any, pos: int, end: int, base: int, index: int, first_ts: int, max_ts: int,
                 log_append: bool, why: str) -> "_Record":
    """One record, read without trusting it: a record that reads cleanly is returned as is; one
    that does not becomes a marker record with what could be read."""
    offset, timestamp = base + index, max_ts
    key: bytes | None = None
    value: bytes | None = None
    headers: list[tuple[str, bytes | None]] = []
    problem: str | None = None
    try:
        _attrs, pos = decode_varint(buffer, pos)
        ts_delta, pos = decode_varint(buffer, pos)
        timestamp = max_ts if log_append else first_ts + ts_delta
        offset_delta, pos = decode_varint(buffer, pos)
        offset = base + offset_delta
        key, pos = _read_bytes(buffer, pos)
        value, pos = _read_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        if count < 0:
            raise ValueError(f"negative header count {count}")
        for _ in range(count):
            raw_key, pos = _read_bytes(buffer, pos)
            if raw_key is None:
                raise ValueError("a header key is null")
            h_value, pos = _read_bytes(buffer, pos)
            try:
                h_key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                h_key = raw_key.decode("utf-8", "backslashreplace")
                problem = problem or f"header key {h_key!r} is not valid UTF-8"
            headers.append((h_key, h_value))
        if pos != end:
            raise ValueError(f"record of {end - pos} bytes more than its fields")
    except Exception as exc:  # noqa: BLE001 - a record we cannot read is still accounted for
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return _Record(offset, timestamp, 1 if log_append else 0, key, value, headers)
    STATS.markers += 1
    return _Record(offset, timestamp, 1 if log_append else 0, key, value,
                   [*headers, (MARK, f"{problem} (client: {why})".encode("utf-8", "replace")[:1000])])


def _read_bytes(buffer: Any, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buffer):
        raise ValueError(f"a field of {size} bytes runs past the end of the batch")
    return bytes(buffer[pos:pos + size]), pos + size


class _Record:
    """What the fetcher reads of a record (aiokafka's DefaultRecord interface)."""

    __slots__ = ("offset", "timestamp", "timestamp_type", "key", "value", "headers")
    checksum = None

    def __init__(self, offset: int, timestamp: int, timestamp_type: int, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes | None]]) -> None:
        self.offset, self.timestamp, self.timestamp_type = offset, timestamp, timestamp_type
        self.key, self.value, self.headers = key, value, headers


def is_marker(record: Any) -> bool:
    headers = record.headers
    return bool(headers) and headers[-1][0] == MARK


def install() -> None:
    """Make every aiokafka consumer of this process read fetched batches tolerantly (idempotent)."""
    from aiokafka.consumer import fetcher

    fetcher.MemoryRecords = TolerantMemoryRecords
