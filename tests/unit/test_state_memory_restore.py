"""The state store's restore writes (daemon/engine/state.py ``apply_changelog``) and the memory its
overlays and read caches may hold over every open store (``MEMORY_KEYS``)."""

from __future__ import annotations

import sqlite3

from daemon.engine.state import StateStore, changelog_key


def _committed_position(path) -> int:
    """The position another connection sees: what survives a crash now."""
    db = sqlite3.connect(str(path))
    try:
        row = db.execute("SELECT v FROM meta WHERE k='changelog_position'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def test_restore_chunks_apply_the_last_write_per_key_in_any_order_and_namespace(tmp_path):
    s = StateStore(tmp_path / "p.sqlite")
    recs = [(changelog_key("in", "m/s1", b"b"), b"1"), (changelog_key("in", "m/s2", b"b"), b"other-ns"),
            (changelog_key("in", "m/s1", b"a"), b"2"), (changelog_key("in", "m/s1", b"b"), b"3"),
            (changelog_key("other", "m/s1", b"c"), b"not ours"), (changelog_key("in", "m/s1", b"d"), b"4"),
            (changelog_key("in", "m/s1", b"d"), None), (None, b"no key"), (b"in\x00no-separator", b"x")]
    assert s.apply_changelog("in", recs, 9) == 6
    assert s.apply_changelog("in", [(changelog_key("in", "m/s1", b"a"), None)], 10) == 1  # deletes what an earlier chunk wrote
    s.end_restore()
    assert s.items("m/s1") == {b"b": b"3"} and s.items("m/s2") == {b"b": b"other-ns"} and s.position() == 10
    s.close()


def test_a_restore_commits_every_so_many_records_and_at_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(StateStore, "RESTORE_COMMIT_RECORDS", 100)
    path = tmp_path / "p.sqlite"
    s = StateStore(path)
    s.apply_changelog("in", [(changelog_key("in", "m/s1", b"k%d" % i), b"v") for i in range(60)], 60)
    assert s.position() == 60 and _committed_position(path) == 0  # not committed yet: a crash re-reads it
    s.apply_changelog("in", [(changelog_key("in", "m/s1", b"k%d" % i), b"v") for i in range(60, 120)], 120)
    assert _committed_position(path) == 120  # 120 records since the last commit: committed, with the position
    s.apply_changelog("in", [(changelog_key("in", "m/s1", b"x"), b"v")], 121)
    assert _committed_position(path) == 120
    s.end_restore()
    assert _committed_position(path) == 121
    # the store works as usual afterwards: writes, commit, flush
    s.put("m/s1", b"x", b"w")
    s.begin_commit()
    s.commit(130)
    s.flush()
    assert _committed_position(path) == 130 and s.get("m/s1", b"x") == b"w" and len(s.items("m/s1")) == 121
    s.close()


def test_flush_and_close_end_an_unfinished_restore(tmp_path):
    path = tmp_path / "p.sqlite"
    s = StateStore(path)
    s.apply_changelog("in", [(changelog_key("in", "m/s1", b"a"), b"1")], 5)
    s.close()  # e.g. the partition was revoked while restoring
    again = StateStore(path)
    assert again.position() == 5 and again.get("m/s1", b"a") == b"1"
    again.close()


def test_memory_of_every_store_together_stays_within_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(StateStore, "MEMORY_KEYS", 10_000)
    monkeypatch.setattr(StateStore, "CACHE_KEYS", 3_000)
    monkeypatch.setattr(StateStore, "FLUSH_KEYS", 500)
    monkeypatch.setattr(StateStore, "_open", type(StateStore._open)())  # only this test's stores count
    few = [StateStore(tmp_path / f"{i}.sqlite") for i in range(2)]
    assert few[0].cache_keys() == 3_000 and few[0].flush_keys() == 500  # a few stores: their own limits
    many = few + [StateStore(tmp_path / f"{i}.sqlite") for i in range(2, 20)]
    assert many[0].cache_keys() == 300 and many[0].flush_keys() == 50  # 20 stores share 10k keys
    for s in many:
        for start in range(0, 3_000, 500):  # reads of 3k distinct keys, batch by batch
            s.get_many("m/s1", [b"k%d" % i for i in range(start, start + 500)])
        for i in range(150):  # committed writes: the overlay flushes at its share
            s.put("m/s1", b"w%d" % i, b"v")
            s.begin_commit()
            s.commit(i + 1)
    held = sum(s.memory_keys() for s in many)
    assert all(len(s.cache) <= s.cache_keys() for s in many)
    assert held <= StateStore.MEMORY_KEYS, held
    for s in many[2:]:
        s.close()
    assert many[0].cache_keys() == 3_000  # closed stores give their share back
    for s in few:
        s.close()
