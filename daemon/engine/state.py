"""Versioned per-partition state: a local SQLite store backed by a compacted changelog topic.

One store per input partition (``<state dir>/<topic>/<partition>.sqlite``). Keys are
namespaced by release name and state-schema version (``ns``), so a release never reads state
written by an incompatible transform. Writes of the open checkpoint interval stay in memory
(``pending``) and reach SQLite only after the Kafka transaction that carries their changelog
records commits, together with the changelog position; an aborted interval is simply dropped.
SQLite (stdlib, transactional, one file per partition, no native dependency to build) is
plenty for the per-key lookups a batch needs: one ``IN (...)`` query per batch.

Committed writes first land in an in-memory overlay that reaches SQLite (with the changelog
position it corresponds to, in one SQLite transaction) every few seconds or thousands of keys:
the local store is a cache of the changelog, so after a crash it is simply older and restore
reads a little more changelog. That write runs in a background thread with its own SQLite
connection (10k keys take ~70 ms, which would otherwise stall the event loop); while it runs,
the values it writes stay readable from memory. Recently read values are cached as well.

Changelog record: key = ``input topic \\0 ns \\0 key`` (one changelog topic serves every input
topic; partition = the input partition); value = state JSON bytes (None = tombstone);
header ``fd.checkpoint`` = the input offset of the checkpoint it belongs to.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time
from pathlib import Path

SEP = b"\x00"

# One thread writes every store's overlay, one store after another: SQLite work is short and
# mostly outside the GIL; what matters is that it is not on the event loop.
_FLUSHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state-flush")


def changelog_key(topic: str, ns: str, key: bytes) -> bytes:
    return topic.encode() + SEP + ns.encode() + SEP + key


def split_changelog_key(raw: bytes) -> tuple[str, str, bytes] | None:
    topic, sep1, rest = raw.partition(SEP)
    ns, sep2, key = rest.partition(SEP)
    if not (sep1 and sep2):
        return None
    return topic.decode("utf-8", "replace"), ns.decode("utf-8", "replace"), key


Changes = dict[tuple[str, bytes], bytes | None]
"""(namespace, key) -> new value (None: deleted)."""


class StateStore:
    FLUSH_SECONDS = 5.0
    FLUSH_KEYS = 50_000
    CACHE_KEYS = 200_000

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = self._connect()
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
                        " PRIMARY KEY (ns, key)) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self.pending: dict[tuple[str, bytes], bytes | None] = {}
        self.committing: dict[tuple[str, bytes], bytes | None] = {}
        """Writes of an interval whose checkpoint is being committed (taken by :meth:`begin_commit`)."""
        self.overlay: dict[tuple[str, bytes], bytes | None] = {}
        self.overlay_position: int | None = None
        self.flushing: dict[tuple[str, bytes], bytes | None] = {}
        """The overlay the background flush is writing (readable until it is done)."""
        self.flushing_position: int | None = None
        self._flush_job: concurrent.futures.Future[None] | None = None
        self._writer: sqlite3.Connection | None = None  # the background flush's own connection
        self.cache: dict[tuple[str, bytes], bytes | None] = {}
        self.last_flush = 0.0  # the first commit reaches SQLite at once: a position exists from the start

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the background writer
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    # ---- position ---------------------------------------------------------------------------
    def position(self) -> int:
        """Changelog offset from which restore must read (everything before is applied)."""
        if self.overlay_position is not None:
            return self.overlay_position
        if self.flushing_position is not None:
            return self.flushing_position
        row = self.db.execute("SELECT v FROM meta WHERE k='changelog_position'").fetchone()
        return int(row[0]) if row else 0

    # ---- reads --------------------------------------------------------------------------------
    def get_many(self, ns: str, keys: list[bytes]) -> dict[bytes, bytes | None]:
        out: dict[bytes, bytes | None] = {}
        missing = []
        cache = self.cache
        # newest first: the open interval, the one committing, committed (in memory, being
        # flushed), then what was read or flushed before; empty layers are skipped
        layers = [d for d in (self.pending, self.committing, self.overlay, self.flushing, cache) if d]
        for k in keys:
            nk = (ns, k)
            for layer in layers:
                hit = layer.get(nk, ...)
                if hit is not ...:
                    out[k] = hit
                    break
            else:
                missing.append(k)
        if missing:
            if len(cache) + len(missing) > self.CACHE_KEYS:
                cache.clear()
            for i in range(0, len(missing), 900):
                chunk = missing[i:i + 900]
                q = f"SELECT key, value FROM kv WHERE ns=? AND key IN ({','.join('?' * len(chunk))})"
                for k, v in self.db.execute(q, (ns, *chunk)):
                    out[bytes(k)] = bytes(v)
            for k in missing:
                cache[(ns, k)] = out.setdefault(k, None)
        return out

    def get(self, ns: str, key: bytes) -> bytes | None:
        return self.get_many(ns, [key])[key]

    def items(self, ns: str) -> dict[bytes, bytes]:
        """Every committed key of a namespace (for tests and inspection)."""
        self.flush()
        return {bytes(k): bytes(v) for k, v in self.db.execute("SELECT key, value FROM kv WHERE ns=?", (ns,))}

    # ---- writes -------------------------------------------------------------------------------
    def put(self, ns: str, key: bytes, value: bytes | None) -> None:
        self.pending[(ns, key)] = value

    @property
    def dirty(self) -> bool:
        """Writes not committed yet (open interval or a commit in flight)."""
        return bool(self.pending or self.committing)

    def discard_pending(self) -> None:
        """Forget every uncommitted write (a rewind to the last checkpoint)."""
        self.pending.clear()
        self.committing.clear()

    def begin_commit(self) -> dict[tuple[str, bytes], bytes | None]:
        """Close the interval: its writes move aside (still readable) while their checkpoint commits,
        and new writes start the next interval. Returns the closed interval's writes."""
        if self.committing:
            self.committing.update(self.pending)  # an earlier commit did not finish: one interval
        else:
            self.committing = self.pending
        self.pending = {}
        return self.committing

    def commit(self, changelog_position: int | None) -> None:
        """The closed interval's transaction committed: keep its writes (overlay) and move the
        position; they reach SQLite with the next flush (in the background)."""
        self.overlay.update(self.committing)
        self.committing = {}
        if changelog_position is not None:
            self.overlay_position = changelog_position
        self._reap_flush()
        if self._flush_job is None and (len(self.overlay) >= self.FLUSH_KEYS
                                        or time.monotonic() - self.last_flush >= self.FLUSH_SECONDS):
            self._start_flush()

    def _start_flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.overlay and self.overlay_position is None:
            return
        self.flushing, self.overlay = self.overlay, {}
        self.flushing_position, self.overlay_position = self.overlay_position, None
        self._flush_job = _FLUSHER.submit(self._write_in_background, self.flushing, self.flushing_position)

    def _write_in_background(self, changes: Changes, position: int | None) -> None:
        if self._writer is None:
            self._writer = self._connect()
        self._write(self._writer, changes, position)

    def _reap_flush(self, wait: bool = False) -> None:
        """Act on a finished background flush (``wait``: wait for it): its values join the read
        cache; if it failed, they go back to the overlay and the error is raised."""
        job = self._flush_job
        if job is None or not (wait or job.done()):
            return
        self._flush_job = None
        flushed, position = self.flushing, self.flushing_position
        self.flushing, self.flushing_position = {}, None
        try:
            job.result()
        except BaseException:
            self.overlay = {**flushed, **self.overlay}
            if self.overlay_position is None:
                self.overlay_position = position
            raise
        self._remember(flushed)

    def flush(self) -> None:
        """Write the overlay and its changelog position to SQLite now (after a background flush
        in progress), in one transaction."""
        self._reap_flush(wait=True)
        self.last_flush = time.monotonic()
        if not self.overlay and self.overlay_position is None:
            return
        self._write(self.db, self.overlay, self.overlay_position)
        self._remember(self.overlay)
        self.overlay = {}
        self.overlay_position = None

    @staticmethod
    def _write(db: sqlite3.Connection, changes: Changes, position: int | None) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            puts = [(ns, k, v) for (ns, k), v in changes.items() if v is not None]
            dels = [(ns, k) for (ns, k), v in changes.items() if v is None]
            if puts:
                db.executemany("INSERT OR REPLACE INTO kv (ns, key, value) VALUES (?, ?, ?)", puts)
            if dels:
                db.executemany("DELETE FROM kv WHERE ns=? AND key=?", dels)
            if position is not None:
                db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('changelog_position', ?)", (str(position),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _remember(self, written: Changes) -> None:
        for nk, v in written.items():
            if nk in self.cache or len(self.cache) < self.CACHE_KEYS:
                self.cache[nk] = v

    def apply_changelog(self, topic: str, records: list[tuple[bytes, bytes | None]], position: int) -> int:
        """Apply restored changelog records of ``topic`` (committed in Kafka); returns how many applied."""
        self.flush()
        self.cache.clear()
        applied = 0
        db = self.db
        db.execute("BEGIN")
        try:
            latest: dict[tuple[str, bytes], bytes | None] = {}
            for raw_key, value in records:
                parts = split_changelog_key(raw_key)
                if parts is None or parts[0] != topic:
                    continue
                latest[(parts[1], parts[2])] = value  # compaction within the batch: the last write wins
                applied += 1
            db.executemany("INSERT OR REPLACE INTO kv (ns, key, value) VALUES (?, ?, ?)",
                           [(ns, k, v) for (ns, k), v in latest.items() if v is not None])
            db.executemany("DELETE FROM kv WHERE ns=? AND key=?",
                           [(ns, k) for (ns, k), v in latest.items() if v is None])
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('changelog_position', ?)", (str(position),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return applied

    def close(self) -> None:
        """Flush what committed and close (pending, uncommitted writes are dropped)."""
        self.discard_pending()
        try:
            self.flush()
        finally:
            if self._flush_job is not None:  # flush() raised on it: let it end before closing
                concurrent.futures.wait([self._flush_job])
            if self._writer is not None:
                self._writer.close()
            self.db.close()
