"""Holders beyond the promoting host (issue #18): an instance that fetched a bundle announces it
with a ``holding`` control event, which readers note as a source and nothing else acts on; and
the object store's edges (a missing backend, a missing object, a cut object replaced)."""

from __future__ import annotations

import pytest

from daemon import control
from daemon.distribution import peers
from daemon.distribution.fetch import Fetcher
from daemon.distribution.objectstore import ObjectStoreSource
from daemon.distribution.sources import FetchError, SourceError
from daemon.errors import ConfigError
from daemon.registry import Registry
from tests.unit.test_distribution import BytesSource
from tests.unit.test_registry import _archive

D = "d" * 64
RELEASE = {"type": "release", "id": "r1", "time": "t", "epoch": 1.0, "channel": "active", "name": "n",
           "version": "1", "digest": D, "who": "w", "why": "y", "kind": "promote", "holders": ["http://h1:8080"]}


@pytest.fixture(autouse=True)
def _clean_holders():
    peers.forget_all()
    yield
    peers.forget_all()


def test_holding_events_are_checked_like_every_event():
    event = dict(control.holding_event(D, "http://h2:8080"), id="h1")
    assert control.check_event(event) is event
    with pytest.raises(control.InvalidEvent) as exc:
        control.check_event({"type": "holding", "id": "h2", "digest": D})
    assert exc.value.reason == "missing_fields"
    for bad in ({"holders": []}, {"holders": ["http://h2:8080", 3]}, {"holders": "http://h2:8080"}, {"digest": ""}):
        with pytest.raises(control.InvalidEvent, match="holding event has ill-typed") as exc:
            control.check_event(dict(event, **bad))
        assert exc.value.reason == "bad_field"


def test_newer_announcements_come_first_and_reading_an_event_again_changes_nothing(tmp_path):
    holding = dict(control.holding_event(D, "http://h2:8080/"), id="h1")
    peers.note_event(RELEASE)
    peers.note_event(holding)
    assert peers.holders(D) == ["http://h2:8080", "http://h1:8080"]
    # the release log sync reads the release event again: its holder must not jump back in front
    added = Registry(tmp_path / "r").apply_events([RELEASE, holding])
    assert peers.holders(D) == ["http://h2:8080", "http://h1:8080"]
    assert [r.id for r in added] == ["r1"]  # a holding event is never a release
    assert [r.id for r in Registry(tmp_path / "r").history()] == ["r1"]


async def test_a_verified_fetch_is_announced_and_a_refused_one_is_not(tmp_path):
    reg_origin = Registry(tmp_path / "origin")
    good = _archive(tmp_path, "1.0.0")
    digest = reg_origin.add(good)
    other = _archive(tmp_path, "2.0.0")
    announced: list[str] = []

    async def on_fetched(d: str) -> None:
        announced.append(d)

    refusing = Fetcher(Registry(tmp_path / "a"), lambda d: [BytesSource("liar", other.read_bytes())],
                       on_fetched=on_fetched)
    with pytest.raises(FetchError):
        await refusing.ensure(digest)
    fetcher = Fetcher(Registry(tmp_path / "b"), lambda d: [BytesSource("good", good.read_bytes())],
                      on_fetched=on_fetched)
    await fetcher.ensure(digest)
    for task in list(fetcher._announcing):
        await task
    assert announced == [digest]
    await fetcher.ensure(digest)  # held: no fetch, no second announcement
    assert announced == [digest]


async def test_an_announcement_that_fails_does_not_fail_the_fetch(tmp_path):
    good = _archive(tmp_path, "1.0.0")
    digest = Registry(tmp_path / "origin").add(good)

    async def broken(d: str) -> None:
        raise RuntimeError("broker down")

    fetcher = Fetcher(Registry(tmp_path / "b"), lambda d: [BytesSource("good", good.read_bytes())], on_fetched=broken)
    path = await fetcher.ensure(digest)
    assert path.is_file()
    tasks = list(fetcher._announcing)
    for task in tasks:
        with pytest.raises(RuntimeError):
            await task


def test_an_object_store_without_its_backend_is_a_config_error_naming_the_fix():
    with pytest.raises(ConfigError, match="nosuch:// is not a scheme fsspec knows"):
        ObjectStoreSource("nosuch://bucket/prefix")


async def test_object_store_missing_object_and_a_cut_object_replaced(tmp_path):
    good = _archive(tmp_path, "1.0.0")
    digest = Registry(tmp_path / "origin").add(good)
    store = ObjectStoreSource(f"file://{tmp_path / 'store'}")
    with pytest.raises(SourceError, match="has no"):
        await store.fetch(digest, tmp_path / "x.part")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / f"{digest}.fdb").write_bytes(good.read_bytes()[:100])  # a cut upload
    assert store.upload(digest, good) is True
    assert (tmp_path / "store" / f"{digest}.fdb").read_bytes() == good.read_bytes()
    assert store.upload(digest, good) is False
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [f"{digest}.fdb"]
