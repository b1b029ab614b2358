"""The object-store bundle source against a real S3-compatible server (issue #18): moto's
standalone server, a separate process on a loopback port, reached over HTTP by s3fs (fsspec's
s3:// backend) in the CLI and in the daemon, configured only through the standard AWS variables
(``AWS_ENDPOINT_URL_S3`` and credentials), as an operator with MinIO or Ceph would.

``release promote --bundle`` uploads the archive once; an instance with an empty registry and no
reachable peer fetches it from the store by digest, verifies it and serves; wrong bytes stored
under a digest's key are refused by digest, counted, and never run (standby unavailable)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import boto3  # the test extra (pyproject.toml) brings boto3, s3fs and moto[server]: no silent skip
import pytest

from daemon.registry import Registry
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, free_port, make_topics, write_config
from tests.integration.test_coordination import active_versions, cli
from tests.integration.test_distribution import metric, status_of
from tests.integration.test_engine import Feeder, _count_committed

BUCKET = "failoverd-bundles"
PREFIX = "fraud/prod"
STORE = f"s3://{BUCKET}/{PREFIX}"


class S3Server:
    """``python -m moto.server`` on a free loopback port, with a versioned bucket (so a test can
    count the writes to a key). The daemons and the CLI find it through AWS_ENDPOINT_URL_S3."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.env = {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"moto server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                self.client.list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - connection refused until it listens
                if time.monotonic() > deadline:
                    raise AssertionError(f"moto server not answering on {self.endpoint} after {timeout}s: {exc}")
                time.sleep(0.1)

    def keys(self) -> set[str]:
        return {o["Key"] for o in self.client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", [])}

    def versions(self, key: str) -> list[dict]:
        doc = self.client.list_object_versions(Bucket=BUCKET, Prefix=key)
        return [v for v in doc.get("Versions", []) if v["Key"] == key]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = S3Server(tmp_path / "moto.log")
    try:
        server.wait_ready()
        server.client.create_bucket(Bucket=BUCKET)
        server.client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        for k, v in server.env.items():  # the CLI and the daemons (subprocesses) inherit them
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        yield server
    finally:
        server.stop()


async def test_bundles_go_through_an_s3_store_by_digest(kafka_bootstrap, tmp_path, example_bundles, s3):
    names = await make_topics(kafka_bootstrap, "dist-s3", partitions=2)
    group, app = kafkatools.unique("g"), kafkatools.unique("app")

    def config(n: str):
        return write_config(tmp_path / f"{n}.toml", bootstrap=kafka_bootstrap, names=names,
                            state_dir=tmp_path / f"s{n}", registry=tmp_path / f"registry-{n}", group=group, app=app,
                            extra={"registry": {"bundle_store": STORE}})

    cfg_a, cfg_b = config("a"), config("b")
    d1 = Registry(tmp_path / "scratch").add(example_bundles["v1"])
    d2 = Registry(tmp_path / "scratch").add(example_bundles["v2"])
    key1, key2 = f"{PREFIX}/{d1}.fdb", f"{PREFIX}/{d2}.fdb"

    # promote on a (its daemon never runs): the archive goes to the store once
    promote = ("release", "promote", "fraud-scorer@1.0.0", "--bundle", str(example_bundles["v1"]), "--channel",
               "active", "--reason", "first", "--config", str(cfg_a))
    assert f"uploaded {STORE}/{d1}.fdb" in cli(*promote).stdout
    assert f"already in {STORE}/{d1}.fdb" in cli(*promote).stdout
    assert s3.keys() == {key1}  # no temporary object left behind
    assert len(s3.versions(key1)) == 1  # the second promote wrote nothing (the bucket is versioned)
    assert s3.client.get_object(Bucket=BUCKET, Key=key1)["Body"].read() == example_bundles["v1"].read_bytes()

    # b: an empty registry, no static peers; the holder the event names (a) is not running
    records = streams.transactions(4000, seed=81, n_cards=40)
    b = DaemonProc(cfg_b, log=tmp_path / "b.log").start()
    feeder = Feeder(kafka_bootstrap, names["input"], records, per_batch=100, pause=0.1)
    feed = asyncio.create_task(feeder.run())
    try:
        await kafkatools.wait_for(lambda: b.check() and b.get("/readyz")[0] == 200, timeout=90, what="b ready")
        assert active_versions([b]) == {"1.0.0"}
        reg_b = Registry(tmp_path / "registry-b")
        assert reg_b.store.digests() == [d1]
        assert reg_b.source_of(d1) == f"object store {STORE}"
        assert metric(b, 'failoverd_bundle_fetches_total{result="ok"}') == 1
        assert metric(b, 'failoverd_bundle_fetches_total{result="refused"}') == 0

        # wrong bytes under 2.0.0's key (same length, one byte flipped): the promotion finds the key
        # taken and does not upload; b is told to load 2.0.0 as its standby, refuses the object by
        # digest, and keeps serving 1.0.0 alone, saying the standby is unavailable
        bad = bytearray(example_bundles["v2"].read_bytes())
        bad[len(bad) // 2] ^= 0xFF
        s3.client.put_object(Bucket=BUCKET, Key=key2, Body=bytes(bad))
        out = cli("release", "promote", "fraud-scorer@2.0.0", "--bundle", str(example_bundles["v2"]), "--channel",
                  "standby", "--reason", "canary", "--config", str(cfg_a)).stdout
        assert f"already in {STORE}/{d2}.fdb" in out, out

        def unavailable() -> dict | None:
            b.check()
            sb = status_of(b).get("standby") or {}
            return sb if sb.get("state") == "unavailable" and "refused" in (sb.get("error") or "") else None

        sb = await kafkatools.wait_for(unavailable, timeout=60, what="b: standby 2.0.0 unavailable, refused")
        assert d2[:12] in sb["error"], sb
        code, body = b.get("/readyz")
        assert code == 200 and b"standby unavailable" in body, body
        assert metric(b, 'failoverd_bundle_fetches_total{result="refused"}') >= 1
        assert d2 not in reg_b.store.digests()  # never stored, so never unpacked or run
        assert not any((tmp_path / "registry-b" / "incoming").iterdir())
        assert not status_of(b).get("standby_ready")
        assert "bundle download refused" in b.log()
        assert active_versions([b]) == {"1.0.0"}

        await feed
        await kafkatools.wait_for(lambda: b.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=90, interval=0.5, what="every input accounted for")
        assert b.terminate() == 0
    finally:
        feed.cancel()
        if b.alive():
            b.kill9()
    await streams.verified(kafka_bootstrap, names)
    assert Registry(tmp_path / "registry-b").status()["standby"].digest == d2  # the event did arrive
