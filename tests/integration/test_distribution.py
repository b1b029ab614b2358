"""Releases reach every instance with no shared directory (issue #18): each instance has its own
registry, a promotion through one of them names it as a holder, the others fetch the bundle by
digest from its admin API; a peer that serves corrupted bytes is refused by digest and the next
source is used."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading

from daemon.registry import Registry
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_coordination import active_versions, cli
from tests.integration.test_engine import Feeder, _count_committed


class CorruptPeer:
    """Answers every GET /bundles/<digest> with 200 and damaged bytes (a real archive, one byte in
    the middle flipped): only the digest check can tell."""

    def __init__(self, archive) -> None:
        data = bytearray(archive.read_bytes())
        data[len(data) // 2] ^= 0xFF
        body, hits = bytes(data), []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.hits = hits
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def status_of(d) -> dict:
    code, body = d.get("/status")
    return json.loads(body) if code == 200 else {}


def metric(d, name: str) -> float:
    code, body = d.get("/metrics")
    total = 0.0
    for line in body.decode().splitlines() if code == 200 else []:
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_promotion_reaches_instances_with_their_own_registries(kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "dist", partitions=3)  # one each for a, b, c
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    token = tmp_path / "token"
    token.write_text("s3cret-read-token\n")
    token.chmod(0o600)
    bad = CorruptPeer(example_bundles["v1"])

    def config(n: str, **registry):
        return write_config(tmp_path / f"{n}.toml", bootstrap=kafka_bootstrap, names=names,
                            state_dir=tmp_path / f"s{n}", registry=tmp_path / f"registry-{n}", group=group, app=app,
                            extra={"admin": {"token_file": str(token)}, "registry": registry})

    cfg_a, cfg_b, cfg_c = config("a"), config("b"), config("c", peers=[bad.url])
    cli("release", "promote", "fraud-scorer@1.0.0", "--bundle", str(example_bundles["v1"]), "--channel", "active",
        "--reason", "first", "--config", str(cfg_a))
    records = streams.transactions(6000, seed=18, n_cards=40)
    daemons = [DaemonProc(cfg_a, log=tmp_path / "a.log").start()]
    feeder = Feeder(kafka_bootstrap, names["input"], records, per_batch=100, pause=0.1)
    feed = asyncio.create_task(feeder.run())
    try:
        await kafkatools.wait_for(lambda: daemons[0].check() and daemons[0].get("/readyz")[0] == 200, timeout=60,
                                  what="a ready")
        # b joins with an empty registry: it fetches 1.0.0 from a (the holder the release event names)
        daemons.append(DaemonProc(cfg_b, log=tmp_path / "b.log").start())
        await kafkatools.wait_for(lambda: all(d.check() for d in daemons) and
                                  all(d.get("/readyz")[0] == 200 for d in daemons), timeout=60, what="a and b ready")
        assert active_versions(daemons) == {"1.0.0"}

        # a new release through a: b fetches it as its standby, then both switch
        cli("release", "promote", "fraud-scorer@2.0.0", "--bundle", str(example_bundles["v2"]), "--channel",
            "standby", "--reason", "canary", "--config", str(cfg_a))
        await kafkatools.wait_for(lambda: all(status_of(d).get("standby_ready") for d in daemons), timeout=60,
                                  what="2.0.0 loaded as standby on a and b")
        cli("release", "promote", "fraud-scorer@2.0.0", "--channel", "active", "--reason", "go", "--config",
            str(cfg_a))
        await kafkatools.wait_for(lambda: active_versions(daemons) == {"2.0.0"}, timeout=30, what="a, b on 2.0.0")
        cli("release", "promote", "fraud-scorer@1.0.0", "--channel", "standby", "--reason", "safety net",
            "--config", str(cfg_a))

        # c starts afterwards, its first peer serves corrupted bytes: refused by digest, a serves instead
        daemons.append(DaemonProc(cfg_c, log=tmp_path / "c.log").start())
        c = daemons[2]
        await kafkatools.wait_for(lambda: c.check() and c.get("/readyz")[0] == 200 and
                                  status_of(c).get("standby_ready"), timeout=60, what="c ready with its standby")
        assert active_versions(daemons) == {"2.0.0"}
        assert status_of(c)["standby"]["version"] == "1.0.0"
        assert len(bad.hits) >= 2, bad.hits  # asked first, for the active and the standby
        assert metric(c, 'failoverd_bundle_fetches_total{result="refused"}') >= 2
        assert metric(c, 'failoverd_bundle_fetches_total{result="ok"}') == 2
        held = set(Registry(tmp_path / "registry-c").store.digests())
        assert held == {Registry(tmp_path / "registry-a").resolve(r) for r in ("fraud-scorer@1.0.0",
                                                                               "fraud-scorer@2.0.0")}
        assert not any((tmp_path / "registry-c" / "incoming").iterdir())  # refused downloads were deleted

        # the bundle endpoint is read-only and needs a token
        import urllib.error
        import urllib.request

        digest = sorted(held)[0]
        try:
            urllib.request.urlopen(c.admin_url + f"/bundles/{digest}", timeout=5)
            raise AssertionError("GET /bundles without a token was served")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401

        await feed
        await kafkatools.wait_for(lambda: all(d.check() for d in daemons) and
                                  _count_committed(kafka_bootstrap, names, len(records)), timeout=90,
                                  interval=0.5, what="every input accounted for")
        for d in daemons:
            assert d.terminate() == 0
    finally:
        feed.cancel()
        bad.close()
        for d in daemons:
            if d.alive():
                d.kill9()
    await streams.verified(kafka_bootstrap, names)


async def holding_events(bootstrap: str, topic: str) -> list[dict]:
    from daemon.control import ControlReader

    async with ControlReader(bootstrap, topic, timeout=10) as reader:
        return [e.value for e in reader.events if e.type == "holding" and e.value is not None]


async def test_an_instance_that_fetched_a_bundle_serves_it_after_the_promoting_host_is_gone(
        kafka_bootstrap, tmp_path, example_bundles):
    """a promotes; b (empty registry) fetches from a and announces it holds the bundle; a stops;
    c (empty registry, no static peers, no object store) fetches from b, found through b's
    ``holding`` event on the control topic, which no release log records."""
    names = await make_topics(kafka_bootstrap, "hold", partitions=2)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")
    token = tmp_path / "token"
    token.write_text("s3cret-read-token\n")
    token.chmod(0o600)

    def config(n: str):
        return write_config(tmp_path / f"{n}.toml", bootstrap=kafka_bootstrap, names=names,
                            state_dir=tmp_path / f"s{n}", registry=tmp_path / f"registry-{n}", group=group, app=app,
                            extra={"registry": {"read_token_file": str(token)}})

    cfg_a, cfg_b, cfg_c = config("a"), config("b"), config("c")
    cli("release", "promote", "fraud-scorer@1.0.0", "--bundle", str(example_bundles["v1"]), "--channel", "active",
        "--reason", "first", "--config", str(cfg_a))
    digest = Registry(tmp_path / "registry-a").resolve("fraud-scorer@1.0.0")
    records = streams.transactions(5000, seed=180, n_cards=40)
    a = DaemonProc(cfg_a, log=tmp_path / "a.log").start()
    daemons = [a]
    feeder = Feeder(kafka_bootstrap, names["input"], records, per_batch=100, pause=0.1)
    feed = asyncio.create_task(feeder.run())
    try:
        await kafkatools.wait_for(lambda: a.check() and a.get("/readyz")[0] == 200, timeout=60, what="a ready")
        b = DaemonProc(cfg_b, log=tmp_path / "b.log").start()
        daemons.append(b)
        await kafkatools.wait_for(lambda: b.check() and b.get("/readyz")[0] == 200, timeout=60, what="b ready")
        assert Registry(tmp_path / "registry-b").source_of(digest) == f"peer {a.admin_url}"

        async def announced() -> list[dict]:
            return [e for e in await holding_events(kafka_bootstrap, names["control"])
                    if e["digest"] == digest and e["holders"] == [b.admin_url]]

        await kafkatools.wait_for(announced, timeout=30, interval=0.5, what="b's holding event")

        assert a.terminate() == 0  # the promoting host goes away
        c = DaemonProc(cfg_c, log=tmp_path / "c.log").start()
        daemons.append(c)
        await kafkatools.wait_for(lambda: b.check() and c.check() and c.get("/readyz")[0] == 200, timeout=60,
                                  what="c ready")
        assert active_versions([b, c]) == {"1.0.0"}
        reg_c = Registry(tmp_path / "registry-c")
        assert reg_c.store.digests() == [digest]
        assert reg_c.source_of(digest) == f"peer {b.admin_url}"  # b first: the newest holder
        assert metric(c, 'failoverd_bundle_fetches_total{result="ok"}') == 1
        assert metric(c, 'failoverd_bundle_fetches_total{result="failed"}') == 0
        # c announced too; holding events are not releases: c's log has the one promotion, and no
        # instance skipped a control record
        await kafkatools.wait_for(lambda: _holders_of(kafka_bootstrap, names, digest), timeout=30, interval=0.5,
                                  what="c's holding event")
        assert [(r.kind, r.channel, r.version) for r in reg_c.history()] == [("promote", "active", "1.0.0")]
        history = cli("release", "history", "--config", str(cfg_c)).stdout
        assert history.count("fraud-scorer@1.0.0") == 1, history
        for d in (b, c):
            assert metric(d, "failoverd_control_events_skipped_total") == 0

        await feed
        await kafkatools.wait_for(lambda: b.check() and c.check() and
                                  _count_committed(kafka_bootstrap, names, len(records)), timeout=90, interval=0.5,
                                  what="every input accounted for")
        for d in (b, c):
            assert d.terminate() == 0
    finally:
        feed.cancel()
        for d in daemons:
            if d.alive():
                d.kill9()
    await streams.verified(kafka_bootstrap, names)


async def _holders_of(bootstrap: str, names: dict, digest: str) -> set[str]:
    """The admin URLs that announced holding ``digest``, once two have (b and c); empty before."""
    held = {h for e in await holding_events(bootstrap, names["control"]) if e["digest"] == digest
            for h in e["holders"]}
    return held if len(held) == 2 else set()
