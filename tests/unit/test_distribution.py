"""Fetching bundles by digest (daemon/distribution): only bytes that match the digest are stored,
a bad source is skipped for the next one, and the admin API serves archives to a token."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from daemon import control
from daemon.admin import AdminServer
from daemon.distribution import peers
from daemon.distribution.fetch import Fetcher
from daemon.distribution.sources import FetchError, SourceError
from daemon.registry import Registry
from tests.unit.test_registry import _archive


class BytesSource:
    """A source that delivers fixed bytes (possibly wrong): what an untrusted peer can do."""

    def __init__(self, name: str, data: bytes | None) -> None:
        self.name, self.data, self.asked = name, data, 0

    async def fetch(self, digest: str, dest: Path) -> int:
        self.asked += 1
        if self.data is None:
            raise SourceError(f"{self.name}: unreachable")
        dest.write_bytes(self.data)
        return len(self.data)


@pytest.fixture
def two(tmp_path):
    """(digest, archive bytes, digest of another bundle, its bytes)."""
    a, b = _archive(tmp_path, "1.0.0"), _archive(tmp_path, "2.0.0")
    reg = Registry(tmp_path / "origin")
    return reg.add(a), a.read_bytes(), reg.add(b), b.read_bytes()


async def test_wrong_and_truncated_bytes_are_refused_and_the_next_source_is_used(tmp_path, two):
    digest, good, _other, other_bytes = two
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    sources = [BytesSource("down", None), BytesSource("other bundle", other_bytes),
               BytesSource("truncated", good[: len(good) // 2]), BytesSource("flipped", bytes(flipped)),
               BytesSource("good", good)]
    reg = Registry(tmp_path / "here")
    fetcher = Fetcher(reg, lambda d: sources)
    path = await fetcher.ensure(digest)
    assert path == reg.bundle_path(digest) and path.read_bytes() == good
    assert [s.asked for s in sources] == [1, 1, 1, 1, 1]
    assert reg.store.digests() == [digest]  # nothing else was stored
    assert list((tmp_path / "here" / "incoming").iterdir()) == []
    assert reg.open(digest).digest == digest
    # reused: no source is asked again
    assert await fetcher.ensure(digest) == path and sources[-1].asked == 1


async def test_no_good_source_is_a_fetch_error_naming_each_source(tmp_path, two):
    digest, good, _other, other_bytes = two
    reg = Registry(tmp_path / "here")
    fetcher = Fetcher(reg, lambda d: [BytesSource("peer-x", other_bytes), BytesSource("peer-y", None)])
    with pytest.raises(FetchError, match="peer-x: refused.*peer-y: unreachable"):
        await fetcher.ensure(digest)
    assert reg.store.digests() == []
    assert fetcher.status()["failed"][0]["digest"] == digest
    with pytest.raises(FetchError, match="no source is configured"):
        await Fetcher(reg, lambda d: []).ensure(digest)
    # a registry path not held yet stands for its digest (the standby keeper's loader fetches it)
    missing = reg.bundle_path(digest, missing_ok=True)
    assert fetcher.digest_of(missing) == digest and not missing.exists()


async def test_admin_serves_held_archives_to_a_token_with_ranges(tmp_path, two):
    digest, good, other, _ = two
    origin = Registry(tmp_path / "origin")
    server = AdminServer("127.0.0.1:0", controller=None, token="admin-tok",  # type: ignore[arg-type]
                         bundles=origin.store.path, read_token="read-tok")
    async with server, aiohttp.ClientSession() as http:
        url = f"{server.url}/bundles/{digest}"
        async with http.get(url) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with http.get(url, headers={"Authorization": "Bearer read-tok", "Range": "bytes=10-19"}) as r:
            assert r.status == 206 and await r.read() == good[10:20]
        async with http.get(f"{server.url}/bundles/{'0' * 64}", headers={"Authorization": "Bearer admin-tok"}) as r:
            assert r.status == 404
        async with http.post(url, headers={"Authorization": "Bearer admin-tok"}) as r:
            assert r.status == 405  # read-only
        # a peer fetches it end to end, into a registry of its own
        here = Registry(tmp_path / "here")
        path = await Fetcher(here, lambda d: [peers.PeerSource(server.url, "read-tok")]).ensure(digest)
        assert path.read_bytes() == good
        with pytest.raises(FetchError, match="HTTP 401"):
            await Fetcher(here, lambda d: [peers.PeerSource(server.url, "wrong")]).ensure(other)


def test_release_events_may_name_holders(tmp_path):
    event = {"type": "release", "id": "x", "time": "t", "epoch": 1.0, "channel": "active", "name": "n",
             "version": "1", "digest": "d" * 64, "who": "w", "why": "y", "kind": "promote"}
    control.check_event(event)  # older events, without holders, stay valid
    control.check_event(dict(event, holders=["http://10.0.0.1:8080"]))
    with pytest.raises(control.InvalidEvent, match="holders"):
        control.check_event(dict(event, holders="http://10.0.0.1:8080"))
    peers.forget_all()
    Registry(tmp_path / "r").apply_events([dict(event, holders=["http://h1:8080"]),
                                           dict(event, id="y", holders=["http://h2:8080/"])])
    assert peers.holders("d" * 64) == ["http://h2:8080", "http://h1:8080"]
    peers.forget_all()


def _cli(*args: str):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_push_and_pull_keep_the_digest_and_the_release_log_records_the_source(tmp_path, two):
    digest, good, _other, _ = two
    staging, prod, store = tmp_path / "origin", tmp_path / "prod", tmp_path / "objects"
    # staging -> an object store (fsspec's local-file backend, behind the same interface as s3://)
    pushed = _cli("bundle", "push", digest[:12], "--to", f"file://{store}", "--registry", str(staging), "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert (store / f"{digest}.fdb").read_bytes() == good
    # object store -> production registry, verified by digest on the way in
    pulled = _cli("bundle", "pull", digest, "--from", f"file://{store}", "--registry", str(prod))
    assert pulled.returncode == 0, pulled.stderr
    reg = Registry(prod)
    assert reg.store.digests() == [digest]
    release = reg.promote(digest, "active", "from staging")
    assert release.source == f"object store file://{store}"
    assert Registry(prod).history()[-1].source == release.source
    # a registry directory works too, and a tampered object is refused, never stored
    again = _cli("bundle", "push", digest, "--to", str(tmp_path / "prod2"), "--registry", str(staging))
    assert again.returncode == 0, again.stderr
    assert Registry(tmp_path / "prod2").source_of(digest) == f"registry {staging}"
    (store / f"{digest}.fdb").write_bytes(good[:-100])
    bad = _cli("bundle", "pull", digest, "--from", f"file://{store}", "--registry", str(tmp_path / "prod3"))
    assert bad.returncode != 0 and "refused" in bad.stderr, bad.stderr
    assert Registry(tmp_path / "prod3").store.digests() == []
