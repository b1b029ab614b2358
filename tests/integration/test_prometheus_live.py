"""A real Prometheus (Debian's package) scrapes a running daemon; every dashboard query returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, free_port, make_topics, write_config
from tests.integration.test_engine import _count_committed
from tests.integration.test_failover import FAST_FAILOVER, with_faults
from tests.unit.test_deploy_static import concrete, dashboard_queries


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def _scraped(base: str, expr: str) -> bool:
    try:
        return bool(_query(base, f"count_over_time({expr}[1m]) >= 2"))
    except OSError:
        return False


async def test_every_dashboard_query_returns_data_from_a_live_daemon(kafka_bootstrap, tmp_path, example_bundles):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed: run deploy/ci-system-deps.sh (Debian package prometheus)")
    names = await make_topics(kafka_bootstrap, "prom", partitions=2)
    metrics_port, prom_port = free_port(), free_port()
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"), metrics_port=metrics_port,
                       extra={"failover": {"standby_mode": "hot", **FAST_FAILOVER},
                              "worker": {"predict_timeout_ms": 1500}})
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: failoverd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=open(tmp_path / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v2"]), "--standby-bundle", str(example_bundles["v1"]),
                   log=tmp_path / "d.log").start()
    base = f"http://127.0.0.1:{prom_port}"
    try:
        records = streams.transactions(3000, seed=8)
        records = with_faults(records, "crash", 2000)
        records.insert(100, (b"card-bad", b"{oops"))
        await kafkatools.produce(kafka_bootstrap, names["input"], records[:1500])
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, 1500), timeout=60,
                                  what="first half processed")
        # Prometheus must have seen the failover counter at 0 before the fault, as in production
        await kafkatools.wait_for(lambda: _scraped(base, 'failoverd_failovers_total{reason="worker_crashed"}'),
                                  timeout=60, interval=0.5, what="prometheus scraping the daemon")
        await kafkatools.produce(kafka_bootstrap, names["input"], records[1500:])
        await kafkatools.wait_for(lambda: d.check() and _count_committed(kafka_bootstrap, names, len(records)),
                                  timeout=90, what="all processed, through a failover")
        queries = [(where, concrete(expr)) for where, expr in dashboard_queries()]
        missing: list = []

        def all_have_data() -> bool:
            missing.clear()
            for where, expr in queries:
                try:
                    if not _query(base, expr):
                        missing.append((where, expr))
                except OSError:
                    missing.append((where, "prometheus not answering"))
            return not missing

        try:
            await kafkatools.wait_for(all_have_data, timeout=60, interval=1.0, what="every dashboard query to return data")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; queries without data: {missing}") from None
    finally:
        if d.alive():
            d.kill9()
        prom.terminate()
        prom.wait(10)
