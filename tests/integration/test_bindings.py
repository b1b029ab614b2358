"""Per-environment bindings end to end (issue #18): a bundle declaring a binding is built once, moves
from registry A to registry B unchanged (``bundle push``), is refused in B by a configuration that
does not bind it, and runs in B against B's own table: every output names the bundle digest and
the binding's content digest, and reflects B's table."""

from __future__ import annotations

import json
import subprocess
import sys

from daemon.bundle.build import build
from daemon.engine import headers as H
from daemon.registry import Registry
from tests import kafkatools, streams
from tests.conftest import ROOT
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_coordination import cli
from tests.unit.test_bindings import bound_source, sha, table


async def test_a_bundle_moves_between_registries_and_runs_against_each_environments_binding(
        kafka_bootstrap, tmp_path):
    names = await make_topics(kafka_bootstrap, "bind", partitions=2)
    built = build(bound_source(tmp_path / "src"), tmp_path / "dist")
    csv_a, csv_b = table(tmp_path / "a.csv", "region-A"), table(tmp_path / "b.csv", "region-B")
    group, app = kafkatools.unique("g"), kafkatools.unique("app")

    def config(n: str, registry: str, bound: str | None):
        extra = {"bindings": {"reference_table": str(bound)}} if bound else {}
        return write_config(tmp_path / f"{n}.toml", bootstrap=kafka_bootstrap, names=names,
                            state_dir=tmp_path / f"s{n}", registry=tmp_path / f"registry-{registry}", group=group,
                            app=app, extra=extra)

    cfg_a, cfg_b, cfg_unbound = config("a", "a", csv_a), config("b", "b", csv_b), config("u", "b", None)
    cli("release", "promote", "fraud-bound@1.0.0", "--bundle", str(built.path), "--channel", "active",
        "--reason", "staging", "--config", str(cfg_a))
    cli("bundle", "push", "fraud-bound@1.0.0", "--to", str(tmp_path / "registry-b"), "--config", str(cfg_a))

    refused = subprocess.run([sys.executable, "-m", "daemon", "release", "promote", "fraud-bound@1.0.0",
                              "--channel", "active", "--reason", "prod", "--config", str(cfg_unbound)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "binding 'reference_table'" in refused.stderr and "not bound in this environment" in refused.stderr
    assert "fix: add reference_table = " in refused.stderr
    assert Registry(tmp_path / "registry-b").history() == []

    promoted = json.loads(cli("release", "promote", "fraud-bound@1.0.0", "--channel", "active", "--reason", "prod",
                              "--config", str(cfg_b), "--json").stdout)["release"]
    assert promoted["digest"] == built.digest  # the same bundle as in A
    assert promoted["bindings"] == {"reference_table": sha(csv_b)}
    assert Registry(tmp_path / "registry-a").history()[-1].bindings == {"reference_table": sha(csv_a)}

    records = streams.transactions(200, seed=18, n_cards=20)
    await kafkatools.produce(kafka_bootstrap, names["input"], records)
    d = DaemonProc(cfg_b, log=tmp_path / "b.log").start()
    try:
        outputs = await kafkatools.read_committed(kafka_bootstrap, names["output"], expect=len(records), timeout=60)
        assert d.terminate() == 0
    finally:
        if d.alive():
            d.kill9()
    assert len(outputs) == len(records)
    for r in outputs:
        h = H.as_dict(r.headers)
        assert h[H.H_RELEASE_DIGEST] == built.digest.encode()
        assert h[H.H_BINDING_PREFIX + "reference_table"] == sha(csv_b).encode()
        assert json.loads(r.value)["region"] == "region-B"
    await streams.verified(kafka_bootstrap, names)

    # the same registry in an environment that does not bind it: the daemon refuses to start the release
    u = DaemonProc(cfg_unbound, log=tmp_path / "u.log").start()
    try:
        await kafkatools.wait_for(lambda: not u.alive(), timeout=60, what="the unbound daemon to exit")
    finally:
        if u.alive():
            u.kill9()
    assert u.proc.returncode != 0
    assert "binding 'reference_table'" in u.log() and "is not bound in this environment" in u.log()
