"""The proof of per-release environments (issue #13, point 2), against the real broker.

Two releases whose locks pin conflicting versions of a compiled package -- numpy 1.26.4 and
numpy 2.1.3 -- built with ``--with-wheels``, run at the same time as active and standby in one
daemon, fail over (the numpy-1.26.4 worker dies) and roll back (``failoverd release rollback``)
between each other; every output carries the ``numpy.__version__`` its release imported (and a
numpy scalar, encoded by the worker runtime), and the daemon's own environment has neither
version (the test extra installs a current numpy; the test checks it is neither pin).

Needs pypi.org once (the two numpy wheels, ~35 MB): the built archives are cached in
``.local/test-cache/numpy-proof/`` (and pip's own cache), so reruns do not download again.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from daemon.engine import headers as H
from daemon.registry import Registry
from tests import bundlesmith, kafkatools, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed
from tests.integration.test_failover import FAST_FAILOVER

PINS = {"1.0.0": "1.26.4", "2.0.0": "2.1.3"}
CACHE = ROOT / ".local" / "test-cache" / "numpy-proof"

MODEL = """\
import importlib.util
import os

import numpy

from daemon.model import Prediction

DAEMON_DEPS = ("aiokafka", "aiohttp", "prometheus_client")


class Probe:
    def __init__(self, context):
        self.seen = [m for m in DAEMON_DEPS if importlib.util.find_spec(m) is not None]

    def predict(self, batch):
        if any(r.value.get("crash_on") == numpy.__version__ for r in batch):
            os._exit(17)  # this release dies; the other one, with the other numpy, takes over
        xs = numpy.asarray([r.value["x"] for r in batch], dtype=numpy.float64)
        ys = numpy.square(xs)  # vectorized over the batch
        # numpy scalars as they come (encoded by the worker runtime's orjson, whatever the numpy)
        return [Prediction({"y": y, "numpy": numpy.__version__, "daemon_deps": self.seen}, None)
                for y in ys]
"""
INPUT = {"type": "object", "required": ["x"], "properties": {"x": {"type": "number"}}}
OUTPUT = {"type": "object", "required": ["y", "numpy"]}


def probe_bundles(tmp: Path) -> dict[str, Path]:
    """version -> archive of numpy-probe pinning PINS[version], built --with-wheels (cached)."""
    from daemon.bundle import build

    out = {}
    for version, pin in PINS.items():
        files = bundlesmith.source_files(name="numpy-probe", version=version, entrypoint="model:Probe", model=MODEL,
                                         input_schema=INPUT, output_schema=OUTPUT, lock=f"numpy=={pin}\n")
        key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        cached = CACHE / key
        found = sorted(cached.glob("*.fdb")) if cached.is_dir() else []
        if found:
            out[version] = found[0]
            continue
        if not bundlesmith.pypi_reachable():
            pytest.skip("pypi.org is not reachable and the numpy-probe bundles are not cached: the proof "
                        "needs the numpy 1.26.4 and 2.1.3 wheels once")
        out[version] = build(bundlesmith.write_source(tmp / f"src-{version}", files), cached, with_wheels=True).path
    return out


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def status(d: DaemonProc) -> dict:
    code, body = d.get("/status")
    return json.loads(body) if code == 200 else {}


def channels(d: DaemonProc) -> tuple:
    s = status(d)
    return tuple((s.get(c) or {}).get("version") for c in ("active", "standby"))


async def test_conflicting_numpy_pins_run_side_by_side_fail_over_and_roll_back(kafka_bootstrap, tmp_path):
    if importlib.util.find_spec("numpy") is None:
        own = None
    else:
        import numpy

        own = numpy.__version__
    assert own not in PINS.values(), f"the daemon's own numpy {own} must differ from both pins for this proof"
    bundles = probe_bundles(tmp_path)
    names = await make_topics(kafka_bootstrap, "npenv", partitions=2)
    registry_dir = tmp_path / "registry"
    registry = Registry(registry_dir)
    for path in bundles.values():
        registry.add(path)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       registry=registry_dir, group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": {"standby_mode": "warm", **FAST_FAILOVER},
                              "worker": {"predict_timeout_ms": 10000}})
    # promote checks (builds) each release's environment first
    cli("release", "promote", "numpy-probe@1.0.0", "--channel", "active", "--reason", "np1", "--config", str(cfg),
        "--no-publish")
    cli("release", "promote", "numpy-probe@2.0.0", "--channel", "standby", "--reason", "np2", "--config", str(cfg),
        "--no-publish")
    envs = sorted(p.name for p in (tmp_path / "s" / "envs").iterdir() if p.name[0] != "." and "runtime" not in p.name)
    assert len(envs) == 2, envs

    def produce(n: int, start: int, **extra):
        return kafkatools.produce(kafka_bootstrap, names["input"],
                                  [(f"k{i % 7}".encode(), orjson.dumps({"x": i, **extra})) for i in range(start, start + n)])

    d = DaemonProc(cfg, log=tmp_path / "d.log").start()
    try:
        await kafkatools.wait_for(lambda: d.check() and channels(d) == ("1.0.0", "2.0.0"), timeout=90,
                                  what="numpy 1.26.4 active and numpy 2.1.3 standby, both loaded")
        await produce(100, 0)
        await kafkatools.wait_for(lambda: _count_committed(kafka_bootstrap, names, 100), timeout=60,
                                  what="100 outputs from the numpy-1.26.4 release")
        # fail over: the 1.26.4 release's worker dies on this record; the 2.1.3 one answers it
        await produce(1, 100, crash_on=PINS["1.0.0"])
        await produce(99, 101)
        await kafkatools.wait_for(lambda: d.check() and channels(d)[0] == "2.0.0"
                                  and _count_committed(kafka_bootstrap, names, 200), timeout=60,
                                  what="failover to numpy 2.1.3 and 100 more outputs")
        await kafkatools.wait_for(lambda: registry.status()["active"].version == "2.0.0", timeout=30,
                                  what="the failover recorded in the release log")
        # roll back to the numpy-1.26.4 release (its environment is cached: no rebuild)
        cli("release", "rollback", "--to", "numpy-probe@1.0.0", "--reason", "back to numpy 1.26",
            "--config", str(cfg))
        await kafkatools.wait_for(lambda: d.check() and channels(d)[0] == "1.0.0", timeout=60,
                                  what="rollback to numpy 1.26.4")
        await produce(100, 200)
        await kafkatools.wait_for(lambda: _count_committed(kafka_bootstrap, names, 300), timeout=60,
                                  what="100 outputs after the rollback")
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    assert "release environment built" not in d.log()  # promote built both; the daemon reused them

    inputs, outputs, dead = await streams.verified(kafka_bootstrap, names)
    assert not dead
    by_part = collections.defaultdict(list)
    for r in outputs:
        release = H.as_dict(r.headers)[H.H_RELEASE_VERSION].decode()
        v = orjson.loads(r.value)
        assert v["numpy"] == PINS[release], (release, v)  # each output: the numpy its release imported
        assert v["daemon_deps"] == [], v  # none of the daemon's packages reach a release
        assert v["y"] == float(orjson.loads(inputs[streams.source_position(r)])["x"]) ** 2
        by_part[streams.source_position(r)[0]].append((streams.source_position(r)[1], release))
    runs = set()
    for seq in by_part.values():
        order = [rel for _, rel in sorted(seq)]
        runs.add(tuple(rel for i, rel in enumerate(order) if i == 0 or order[i - 1] != rel))
    assert runs <= {("1.0.0", "2.0.0", "1.0.0"), ("1.0.0", "2.0.0"), ("2.0.0", "1.0.0")}, runs
    assert {H.as_dict(r.headers)[H.H_RELEASE_VERSION].decode() for r in outputs} == {"1.0.0", "2.0.0"}


async def test_a_standby_whose_environment_cannot_be_built_is_unavailable_not_fatal(kafka_bootstrap, tmp_path,
                                                                                    example_bundles):
    """Its lock pins a package no index has (the daemon's uv sees an empty local index): the
    active serves every input exactly once, the standby is unavailable, the log names the package."""
    from daemon.bundle import build
    from tests.unit.test_bundle import make_source

    standby = build(make_source(tmp_path / "src", **{"requirements.lock": "nosuchpkg-failoverd==1.0\n"}),
                    tmp_path / "dist").path
    (tmp_path / "empty-index").mkdir()
    names = await make_topics(kafka_bootstrap, "npenv-bad", partitions=2)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"),
                       extra={"failover": {"standby_mode": "warm", **FAST_FAILOVER}})
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), "--standby-bundle", str(standby),
                   log=tmp_path / "d.log",
                   env={"UV_NO_INDEX": "1", "UV_FIND_LINKS": str(tmp_path / "empty-index")}).start()
    try:
        records = streams.transactions(300, seed=3, n_cards=20)
        await kafkatools.produce(kafka_bootstrap, names["input"], records)
        await kafkatools.wait_for(lambda: d.check() and "nosuchpkg-failoverd" in d.log()
                                  and _count_committed(kafka_bootstrap, names, len(records)), timeout=60,
                                  what="every input served by the active, the standby's failure logged")
        assert (status(d).get("standby") or {}).get("version") is None  # not loaded
        assert d.terminate() == 0, d.log()[-3000:]
    finally:
        if d.alive():
            d.kill9()
    await streams.verified(kafka_bootstrap, names)
    assert not [p for p in (tmp_path / "s" / "envs").iterdir() if p.name[0] != "."]  # nothing looks ready
