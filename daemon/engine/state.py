"""Versioned per-partition state: a local SQLite store backed by a compacted changelog topic.

One store per input partition (``<state dir>/<topic>/<partition>.sqlite``). Keys are
namespaced by release name and state-schema version (``ns``), so a release never reads state
written by an incompatible transform. Writes of the open checkpoint interval stay in memory
(``pending``) and reach SQLite only after the Kafka transaction that carries their changelog
records commits, together with the changelog position; an aborted interval is simply dropped.
SQLite (stdlib, transactional, one file per partition, no native dependency to build) is
plenty for the per-key lookups a batch needs: one ``IN (...)`` query per batch.

Changelog record: key = ``input topic \\0 ns \\0 key`` (one changelog topic serves every input
topic; partition = the input partition); value = state JSON bytes (None = tombstone);
header ``fd.checkpoint`` = the checkpoint sequence number it belongs to.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SEP = b"\x00"


def changelog_key(topic: str, ns: str, key: bytes) -> bytes:
    return topic.encode() + SEP + ns.encode() + SEP + key


def split_changelog_key(raw: bytes) -> tuple[str, str, bytes] | None:
    topic, sep1, rest = raw.partition(SEP)
    ns, sep2, key = rest.partition(SEP)
    if not (sep1 and sep2):
        return None
    return topic.decode("utf-8", "replace"), ns.decode("utf-8", "replace"), key


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,"
                        " PRIMARY KEY (ns, key)) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self.pending: dict[tuple[str, bytes], bytes | None] = {}

    # ---- position ---------------------------------------------------------------------------
    def position(self) -> int:
        """Changelog offset from which restore must read (everything before is applied)."""
        row = self.db.execute("SELECT v FROM meta WHERE k='changelog_position'").fetchone()
        return int(row[0]) if row else 0

    # ---- reads --------------------------------------------------------------------------------
    def get_many(self, ns: str, keys: list[bytes]) -> dict[bytes, bytes | None]:
        out: dict[bytes, bytes | None] = {}
        missing = []
        for k in keys:
            hit = self.pending.get((ns, k), ...)
            if hit is not ...:
                out[k] = hit
            else:
                missing.append(k)
        for i in range(0, len(missing), 900):
            chunk = missing[i:i + 900]
            q = f"SELECT key, value FROM kv WHERE ns=? AND key IN ({','.join('?' * len(chunk))})"
            for k, v in self.db.execute(q, (ns, *chunk)):
                out[bytes(k)] = bytes(v)
        for k in missing:
            out.setdefault(k, None)
        return out

    def get(self, ns: str, key: bytes) -> bytes | None:
        return self.get_many(ns, [key])[key]

    def items(self, ns: str) -> dict[bytes, bytes]:
        """Every committed key of a namespace (for tests and inspection)."""
        return {bytes(k): bytes(v) for k, v in self.db.execute("SELECT key, value FROM kv WHERE ns=?", (ns,))}

    # ---- writes -------------------------------------------------------------------------------
    def put(self, ns: str, key: bytes, value: bytes | None) -> None:
        self.pending[(ns, key)] = value

    def discard_pending(self) -> None:
        self.pending.clear()

    def commit(self, changelog_position: int | None) -> None:
        """Apply the pending writes (their transaction committed) and move the position."""
        db = self.db
        db.execute("BEGIN")
        try:
            puts = [(ns, k, v) for (ns, k), v in self.pending.items() if v is not None]
            dels = [(ns, k) for (ns, k), v in self.pending.items() if v is None]
            if puts:
                db.executemany("INSERT OR REPLACE INTO kv (ns, key, value) VALUES (?, ?, ?)", puts)
            if dels:
                db.executemany("DELETE FROM kv WHERE ns=? AND key=?", dels)
            if changelog_position is not None:
                db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('changelog_position', ?)",
                           (str(changelog_position),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.pending.clear()

    def apply_changelog(self, topic: str, records: list[tuple[bytes, bytes | None]], position: int) -> int:
        """Apply restored changelog records of ``topic`` (committed in Kafka); returns how many applied."""
        applied = 0
        db = self.db
        db.execute("BEGIN")
        try:
            for raw_key, value in records:
                parts = split_changelog_key(raw_key)
                if parts is None or parts[0] != topic:
                    continue
                _, ns, key = parts
                if value is None:
                    db.execute("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))
                else:
                    db.execute("INSERT OR REPLACE INTO kv (ns, key, value) VALUES (?, ?, ?)", (ns, key, value))
                applied += 1
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('changelog_position', ?)", (str(position),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return applied

    def close(self) -> None:
        self.pending.clear()
        self.db.close()
