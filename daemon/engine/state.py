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
the values it writes stay readable from memory. Recently read values are cached as well. The
read caches and overlays of all stores of the process share one budget (:attr:`StateStore.MEMORY_KEYS`).

A restore (:mod:`daemon.engine.restore`) writes chunks of changelog records sorted by key and
commits every :attr:`StateStore.RESTORE_COMMIT_RECORDS`, with few WAL checkpoints
(:meth:`StateStore.apply_changelog`).

Changelog record: key = ``input topic \\0 ns \\0 key`` (one changelog topic serves every input
topic; partition = the input partition); value = state JSON bytes (None = tombstone);
header ``fd.checkpoint`` = the input offset of the checkpoint it belongs to.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import itertools
import operator
import sqlite3
import time
import weakref
from pathlib import Path

from daemon import metrics as m

SEP = b"\x00"
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)

# One thread writes every store's overlay, one store after another: SQLite work is short and
# mostly outside the GIL; what matters is that it is not on the event loop.
_FLUSHER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state-flush")


def release_free_memory() -> None:
    """Give the heap's free memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A restore's page caches and buffers are freed when it ends, but glibc keeps freed heap memory
    mapped: the process's RSS would stay at the restore's peak for good."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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
    """A store's overlay is flushed (in the background) once it holds this many keys..."""
    CACHE_KEYS = 200_000
    """...and its read cache holds at most this many;"""
    MEMORY_KEYS = 1_500_000
    """but the read caches, overlays and flushes in progress of every store of the process together
    stay within this many keys (about 150 bytes each with small keys and values; the open and the
    committing interval come on top): with many partitions each store's share is smaller
    (:meth:`cache_keys`: 3/5 of it, :meth:`flush_keys`: 1/10; ``failoverd_state_memory_keys``).
    Without it, memory grew with the number of partitions (200k cached keys per store: ~30 MB
    each). Up to 3 stores keep :attr:`CACHE_KEYS` and :attr:`FLUSH_KEYS`; 4 keep the cache and
    flush at 37.5k keys."""
    _open: weakref.WeakSet[StateStore] = weakref.WeakSet()
    """The stores of this process that are open (closed or garbage-collected ones leave)."""
    RESTORE_COMMIT_RECORDS = 100_000
    """Restored records per SQLite commit (see :meth:`apply_changelog`)."""
    RESTORE_WAL_PAGES = 16_384
    """SQLite's WAL auto-checkpoint while the store is restored (pages, 4 KiB each; SQLite's default
    is 1,000). Every checkpoint fsyncs, and a restore chunk of scattered keys dirties most of the
    table's pages: checkpointing every ~4 MB made a 250k-key restore several times slower on a
    busy disk. The WAL stays consistent without the checkpoints (synchronous=NORMAL is kept), and
    :meth:`end_restore` checkpoints it once."""

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
        self._restoring = False
        self._restore_uncommitted = 0
        self.last_flush = 0.0  # the first commit reaches SQLite at once: a position exists from the start
        StateStore._open.add(self)
        self._labels = (path.parent.name, path.stem)  # <state dir>/<topic>/<partition>.sqlite

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the background writer
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
        return db

    # ---- memory -------------------------------------------------------------------------------
    @classmethod
    def _share(cls) -> int:
        """Keys this store may hold in memory: its share of :attr:`MEMORY_KEYS`."""
        return cls.MEMORY_KEYS // max(1, len(cls._open))

    def cache_keys(self) -> int:
        """Most keys the read cache holds (:attr:`CACHE_KEYS`, less with many stores open)."""
        return max(1, min(self.CACHE_KEYS, self._share() * 3 // 5))

    def flush_keys(self) -> int:
        """Overlay size that starts a flush (:attr:`FLUSH_KEYS`, less with many stores open)."""
        return max(1, min(self.FLUSH_KEYS, self._share() // 10))  # overlay and flushing: up to 2x each

    def memory_keys(self) -> int:
        """Keys held in memory right now: read cache, overlay, the flush in progress, the open and
        the committing interval (what :attr:`MEMORY_KEYS` bounds, with the intervals on top)."""
        return len(self.cache) + len(self.overlay) + len(self.flushing) + len(self.pending) + len(self.committing)

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
            cap = self.cache_keys()
            if len(cache) + len(missing) > cap:
                cache.clear()
            for i in range(0, len(missing), 900):
                chunk = missing[i:i + 900]
                q = f"SELECT key, value FROM kv WHERE ns=? AND key IN ({','.join('?' * len(chunk))})"
                for k, v in self.db.execute(q, (ns, *chunk)):
                    out[bytes(k)] = bytes(v)
            room = cap - len(cache)  # a batch bigger than the cache is not all kept
            for n, k in enumerate(missing):
                if n < room:
                    cache[(ns, k)] = out.setdefault(k, None)
                else:
                    out.setdefault(k, None)
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
        flush_keys = self.flush_keys()
        # the overlay outran the flush in progress (twice its size): wait for it (holds the event
        # loop, rarely) rather than let memory grow past MEMORY_KEYS
        self._reap_flush(wait=len(self.overlay) >= 2 * flush_keys)
        if self._flush_job is None and (len(self.overlay) >= flush_keys
                                        or time.monotonic() - self.last_flush >= self.FLUSH_SECONDS):
            self._start_flush()
        m.STATE_MEMORY_KEYS.labels(*self._labels).set(self.memory_keys())

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
        self.end_restore()
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
            if nk in self.cache or len(self.cache) < self.cache_keys():
                self.cache[nk] = v

    def apply_changelog(self, topic: str, records: list[tuple[bytes, bytes | None]], position: int) -> int:
        """Apply restored changelog records of ``topic`` (committed in Kafka) and the changelog
        position they reach; returns how many applied. The first call starts the store's restore,
        :meth:`end_restore` (or :meth:`flush`, :meth:`close`) ends it.

        The records are written in key order (the last write of a key wins): a changelog is in
        write order, keys in no particular order, and SQLite inserts keys into its B-tree several
        times faster sorted than scattered. During the restore, SQLite commits (records and
        position together) every :attr:`RESTORE_COMMIT_RECORDS` records: each commit writes every
        page it dirtied to the WAL, and scattered keys dirty most pages of the table (see also
        :attr:`RESTORE_WAL_PAGES`; SQLite's page cache stays at its default 2 MB: a bigger one
        saved ~12% of the write's CPU, for memory that grows with the partitions). A crash in between
        loses only what was not committed yet (with its position): restore reads it again.
        May run in a thread of its own, while nothing else uses the store."""
        db = self.db
        if not self._restoring:
            self.flush()
            db.execute(f"PRAGMA wal_autocheckpoint={int(self.RESTORE_WAL_PAGES)}")
            self._restoring = True
            self._restore_uncommitted = 0
        self.cache.clear()
        prefix = topic.encode() + SEP
        cut = len(prefix)
        latest: dict[bytes, dict[bytes, bytes | None]] = {}  # namespace -> key -> last value
        applied = 0
        for raw_key, value in records:
            if not raw_key or not raw_key.startswith(prefix):
                continue  # another input topic's partition with this number shares the changelog partition
            i = raw_key.find(SEP, cut)
            if i < 0:
                continue
            ns_b = raw_key[cut:i]
            keys = latest.get(ns_b)
            if keys is None:
                keys = latest[ns_b] = {}
            keys[raw_key[i + 1:]] = value  # compaction within the batch: the last write wins
            applied += 1
        if not db.in_transaction:
            db.execute("BEGIN")
        try:
            for ns_b, keys in latest.items():
                ns = ns_b.decode("utf-8", "replace")
                changes = sorted(keys.items(), key=_FIRST)
                puts = changes if None not in keys.values() else [kv for kv in changes if kv[1] is not None]
                db.executemany("INSERT OR REPLACE INTO kv (ns, key, value) VALUES (?, ?, ?)",
                               zip(itertools.repeat(ns), map(_FIRST, puts), map(_SECOND, puts)))
                if len(puts) < len(changes):
                    db.executemany("DELETE FROM kv WHERE ns=? AND key=?",
                                   [(ns, k) for k, v in changes if v is None])
                self._restore_uncommitted += len(changes)
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('changelog_position', ?)", (str(position),))
            if self._restore_uncommitted >= self.RESTORE_COMMIT_RECORDS:
                db.execute("COMMIT")
                self._restore_uncommitted = 0
        except BaseException:
            db.execute("ROLLBACK")  # with the position: what was not committed is read again
            self._restore_uncommitted = 0
            raise
        return applied

    def end_restore(self) -> None:
        """The restore is over: the WAL is checkpointed into the database file (and truncated),
        the auto-checkpoint goes back to SQLite's default."""
        if self._restoring:
            self._restoring = False
            if self.db.in_transaction:
                self.db.execute("COMMIT")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.execute("PRAGMA wal_autocheckpoint=1000")

    def close(self) -> None:
        """Flush what committed and close (pending, uncommitted writes are dropped)."""
        StateStore._open.discard(self)
        m.STATE_MEMORY_KEYS.labels(*self._labels).set(0)
        self.discard_pending()
        try:
            self.flush()
        finally:
            if self._flush_job is not None:  # flush() raised on it: let it end before closing
                concurrent.futures.wait([self._flush_job])
            if self._writer is not None:
                self._writer.close()
            self.db.close()
