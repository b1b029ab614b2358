"""Static checks of deploy/kubernetes/ and of the Kafka ACLs docs/operations.md grants.

    schemas     every manifest against the Kubernetes OpenAPI schemas of pinned versions, offline
                (PyPI kubernetes-validate ships them; strict: an unknown field is an error)
    CRD         the ServiceMonitor (Prometheus Operator) has no schema there: checked for what the
                operator needs, against the metrics Service it selects
    wiring      what no schema sees: probes reach the port the admin API binds, the grace period
                outlasts the daemon's shutdown deadline, selectors select the pods, every
                FAILOVERD_* variable is a real configuration key, the ConfigMap passes
                `failoverd config check`, every path the daemon writes is on a writable volume
    ACLs        the kafka-acls.sh commands of docs/operations.md grant what the daemon uses: its
                transactional ids (daemon.engine.partition), the dead-letter replay's
                (daemon.deadletters), the group, the topics of the ConfigMap's configuration
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from daemon import config
from tests.unit.test_deploy_static import ROOT, dockerfile_env, dockerfile_instructions, load_alerts

K8S = ROOT / "deploy" / "kubernetes"
OPERATIONS = ROOT / "docs" / "operations.md"
# The oldest Kubernetes these manifests are meant for, and a recent one. kubernetes-validate ships
# the schemas of many versions; these two are pinned so that a package upgrade does not change
# what is checked.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
DAEMON_MEMORY_MIB = 256
"""What the daemon itself may use (about 150 MB measured: docs/BENCHMARKS.md, peak RSS)."""
WORKERS_AT_ONCE = 3
"""Active and standby, and a third while one of them is replaced (docs/operations.md)."""


# ---- loading ---------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in documents(p)]


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in all_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes, found {len(found)}"
    return found[0]


def statefulset() -> dict:
    return one("StatefulSet", "failoverd")


def pod_spec() -> dict:
    return statefulset()["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod_spec()["containers"]
    return c


def configmap_toml() -> str:
    return one("ConfigMap", "failoverd-config")["data"]["failoverd.toml"]


def configmap_settings_raw() -> dict:
    return tomllib.loads(configmap_toml())


def pod_env(c: dict | None = None) -> dict[str, str]:
    """The container's environment as the kubelet makes it: fieldRef metadata.name is the first
    pod's name, a secretKeyRef a placeholder naming its key."""
    out = {}
    for e in (c or container()).get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", e
            out[e["name"]] = "failoverd-0"
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = f"secret-{ref['name']}-{ref['key']}"
        else:
            raise AssertionError(f"unexpected env source {e}")
    return out


def effective_settings(tmp_path: Path) -> config.Settings:
    """The configuration the daemon in the pod loads: the ConfigMap's file, the image's ENV, the pod's env."""
    path = tmp_path / "failoverd.toml"
    path.write_text(configmap_toml())
    return config.load(path, env={**dockerfile_env(), **pod_env()})


def mounts(c: dict | None = None) -> dict[str, dict]:
    """mountPath -> the volume (or claim template) behind it, with the mount's readOnly."""
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    volumes.update({t["metadata"]["name"]: {"name": t["metadata"]["name"], "persistentVolumeClaim": {"template": t}}
                    for t in statefulset()["spec"].get("volumeClaimTemplates", [])})
    out = {}
    for m in (c or container())["volumeMounts"]:
        assert m["name"] in volumes, f"volumeMount {m['name']!r} names no volume"
        out[m["mountPath"]] = dict(volumes[m["name"]], readOnly=m.get("readOnly", False))
    return out


def mount_of(path: str | Path, c: dict | None = None) -> tuple[str, dict]:
    """The deepest mount holding ``path``."""
    p = PurePosixPath(str(path))
    best = max((m for m in mounts(c) if p == PurePosixPath(m) or PurePosixPath(m) in p.parents),
               key=lambda m: len(m), default=None)
    assert best is not None, f"{path} is on no volume (the root filesystem is read-only)"
    return best, mounts(c)[best]


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return number


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector["matchLabels"].items() <= labels.items()


# ---- kustomization and schemas ---------------------------------------------------------------
def test_kustomization_lists_every_manifest_but_the_toolbox():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    assert sorted(listed + ["toolbox.yaml"]) == [p.name for p in manifest_files()]
    (image,) = k["images"]
    assert image["name"] == container()["image"].split(":")[0]
    kinds = sorted(d["kind"] for name in listed for d in documents(K8S / name))
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "StatefulSet", "Service", "Service",
                            "PodDisruptionBudget", "ServiceMonitor"])


def schema_errors(doc: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version):
    checked = 0
    for path, doc in all_documents():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_servicemonitor_scrapes_the_metrics_service
        assert schema_errors(doc, version) is None, f"{path.name} {doc['kind']}: {schema_errors(doc, version)}"
        checked += 1
    assert checked == len(all_documents()) - 1


def test_schema_validation_catches_mistakes():
    """Strict validation is not vacuous: a misspelt field and a wrong type are refused."""
    version = KUBERNETES_VERSIONS[-1]
    sts = statefulset()
    sts["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    assert "terminationGracePeriodSecond" in schema_errors(sts, version)
    sts = statefulset()
    sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    assert "is not of type" in schema_errors(sts, version)
    sts = statefulset()
    del sts["spec"]["selector"]
    assert "'selector' is a required property" in schema_errors(sts, version)
    # The OpenAPI schemas do not enumerate string values: those are what the tests below check.
    pdb = one("PodDisruptionBudget")
    pdb["spec"]["unhealthyPodEvictionPolicy"] = "Sometimes"
    assert schema_errors(pdb, version) is None


# ---- the pod and the daemon ------------------------------------------------------------------
def test_probes_reach_the_admin_api_the_configmap_binds(tmp_path):
    c = container()
    raw_bind = configmap_settings_raw()["admin"]["bind"]
    host, _, port = raw_bind.rpartition(":")
    assert host == "0.0.0.0", f"[admin] bind = {raw_bind!r}: in a pod it must listen on 0.0.0.0 for the kubelet"
    assert effective_settings(tmp_path).admin.bind == raw_bind  # nothing (image ENV) overrides it differently
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert port_number(c, get["port"]) == int(port), f"{probe} asks port {get['port']}, the admin API binds {port}"
        paths[probe] = get["path"]
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    # the routes exist in the admin API
    from daemon.admin import AdminServer

    routes = {r.resource.canonical for r in AdminServer(raw_bind, controller=None)._make_app().router.routes()}
    assert {"/healthz", "/readyz"} <= routes


def test_liveness_does_not_restart_a_daemon_that_is_shutting_down_or_starting(tmp_path):
    from daemon.app import STOP_BACKSTOP_S

    c = container()
    live, start = c["livenessProbe"], c["startupProbe"]
    # After SIGTERM /healthz turns 503 once the engine stops; the daemon is gone by the backstop.
    assert live["periodSeconds"] * live["failureThreshold"] >= STOP_BACKSTOP_S
    # /healthz answers 200 only once Kafka answered, the group was joined and the active release
    # loaded (up to worker.start_timeout_ms): allow several times that before liveness takes over.
    start_timeout_s = effective_settings(tmp_path).worker.start_timeout_ms / 1000
    assert start["periodSeconds"] * start["failureThreshold"] >= 5 * start_timeout_s


def test_termination_grace_outlasts_the_shutdown_deadline():
    from daemon.app import STOP_BACKSTOP_S

    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > STOP_BACKSTOP_S, (f"terminationGracePeriodSeconds {grace} must exceed the daemon's shutdown "
                                     f"backstop {STOP_BACKSTOP_S} s, or the kubelet's SIGKILL cuts a final checkpoint")
    assert "preStop" not in container().get("lifecycle", {})  # it would eat into the grace period


def test_metrics_port_matches_the_configmap(tmp_path):
    c = container()
    assert port_number(c, "metrics") == effective_settings(tmp_path).metrics.port
    assert c["args"][-2:] == ["--config", "/etc/failoverd/failoverd.toml"]
    from daemon.cli import build_parser

    args = build_parser().parse_args(c["args"])
    assert (args.command, str(args.config), args.log_format) == ("run", "/etc/failoverd/failoverd.toml", "json")


def test_group_instance_id_is_the_pod_name(tmp_path):
    (e,) = [e for e in container()["env"] if e["name"] == config.env_var("kafka", "group_instance_id")]
    assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert effective_settings(tmp_path).kafka.group_instance_id == "failoverd-0"
    assert "group_instance_id" not in configmap_settings_raw()["kafka"]  # else every pod would share it


def env_overrides(c: dict) -> list[str]:
    return [e["name"] for e in c.get("env", []) if e["name"].startswith(config.ENV_PREFIX)
            and config.ENV_SEPARATOR in e["name"]]


@pytest.mark.parametrize("kind,name", [("StatefulSet", "failoverd"), ("Pod", "failoverd-toolbox")])
def test_env_overrides_name_real_config_keys(kind, name):
    doc = one(kind, name)
    spec = doc["spec"]["template"]["spec"] if kind == "StatefulSet" else doc["spec"]
    real = {config.env_var(section, f.name) for section, cls in config.SECTIONS.items()
            for f in dataclasses.fields(cls)}
    names = [n for c in spec["containers"] for n in env_overrides(c)]
    assert names, "no FAILOVERD_<SECTION>__<KEY> override at all?"
    for n in names:
        assert n in real, f"{kind} {name}: {n} names no configuration key (daemon.config.SECTIONS)"


def test_configmap_passes_config_check(tmp_path):
    """`failoverd config check` on the ConfigMap's file, with the environment of the pod."""
    path = tmp_path / "failoverd.toml"
    path.write_text(configmap_toml())
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env.update(dockerfile_env())
    env.update(pod_env())
    proc = subprocess.run([sys.executable, "-m", "daemon", "config", "check", str(path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout.splitlines()[0]
    bad = tmp_path / "bad.toml"
    bad.write_text(configmap_toml().replace("[worker]", "[workers]"))
    proc = subprocess.run([sys.executable, "-m", "daemon", "config", "check", str(bad)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "unknown section" in proc.stderr  # the check does check


def test_the_configmap_says_what_runs(tmp_path):
    """The image's ENV (FAILOVERD_STATE__DIRECTORY, ...) overrides the file: the ConfigMap must say
    the same, or an operator who edits it there changes nothing."""
    raw = configmap_settings_raw()
    s = effective_settings(tmp_path)
    image = {k: v for k, v in dockerfile_env().items() if config.ENV_SEPARATOR in k}
    assert image, "the image sets no FAILOVERD_<SECTION>__<KEY>?"
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            if config.env_var(section, f.name) in image:
                assert f.name in raw.get(section, {}), f"set {section}.{f.name} in the ConfigMap (the image sets it)"
                assert str(raw[section][f.name]) == str(getattr(getattr(s, section), f.name)), (
                    f"{section}.{f.name}: the ConfigMap says {raw[section][f.name]!r}, the image's "
                    f"{config.env_var(section, f.name)} makes it {getattr(getattr(s, section), f.name)!r}")


def test_every_path_the_daemon_writes_is_on_a_writable_volume(tmp_path):
    s = effective_settings(tmp_path)
    env = pod_env()
    writable = {
        "state.directory (state stores, bundles/, envs/)": s.state.directory,
        "registry.path": s.registry.path,
        "HOME": env["HOME"],
        "/tmp": "/tmp",
    }
    for what, path in writable.items():
        where, volume = mount_of(path)
        assert not volume["readOnly"], f"{what} {path} is on the read-only mount {where}"
    state_mount = mount_of(s.state.directory)[1]
    assert state_mount["persistentVolumeClaim"].get("template"), "state must be the pod's own volumeClaimTemplate"
    assert mount_of(s.registry.path)[1]["persistentVolumeClaim"]["claimName"] == "failoverd-registry"
    pvc = one("PersistentVolumeClaim", "failoverd-registry")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it
    # the toolbox writes the same registry
    (tool,) = one("Pod", "failoverd-toolbox")["spec"]["containers"]
    assert PurePosixPath(str(s.registry.path)) in {PurePosixPath(m["mountPath"]) for m in tool["volumeMounts"]}


def test_secrets_come_from_the_secret_the_docs_create(tmp_path):
    s = effective_settings(tmp_path)
    where, volume = mount_of(s.admin.token_file)
    secret = volume["secret"]
    assert volume["readOnly"]
    item = PurePosixPath(str(s.admin.token_file)).relative_to(where)
    keys = {i["key"] for i in secret["items"] if i["path"] == str(item)}
    assert keys == {"admin-token"}
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container()["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {("failoverd-secrets", "sasl-password")}
    assert s.kafka.sasl_plain_password == "secret-failoverd-secrets-sasl-password"
    assert "sasl_plain_password" not in configmap_settings_raw()["kafka"]  # never in the ConfigMap
    # the command in docs/operations.md creates that Secret with those keys
    text = OPERATIONS.read_text()
    m = re.search(r"kubectl create secret generic (\S+)((?:[^\n]*\\\n)*[^\n]*)", text)
    assert m, "docs/operations.md shows no `kubectl create secret generic` command"
    assert m.group(1) == secret["secretName"] == "failoverd-secrets"
    created = set(re.findall(r"--from-(?:file|literal)=([\w-]+)=", m.group(2)))
    assert created == {"admin-token", "sasl-password"}


@pytest.mark.parametrize("kind,name", [("StatefulSet", "failoverd"), ("Pod", "failoverd-toolbox")])
def test_security_context_is_restricted(kind, name):
    """What the Pod Security Standard "restricted" asks, plus a read-only root filesystem."""
    doc = one(kind, name)
    spec = doc["spec"]["template"]["spec"] if kind == "StatefulSet" else doc["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    if kind == "StatefulSet":
        assert spec["shareProcessNamespace"] is True  # PID 1 reaps what a model leaves behind
    user = [a for i, a in dockerfile_instructions((ROOT / "Dockerfile").read_text()) if i == "USER"][-1]
    assert str(pod["runAsUser"]) == user.split(":")[0] and str(pod["fsGroup"]) == user.split(":")[1]
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not sc.get("privileged")
    for v in spec["volumes"]:
        assert "hostPath" not in v
    assert not spec.get("hostNetwork") and not spec.get("hostPID")


MEMORY_UNITS = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}


def mib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert m, f"write memory as a binary quantity (Mi, Gi): {quantity!r}"
    return int(m.group(1)) * MEMORY_UNITS[m.group(2)]


def test_memory_limit_covers_the_daemon_and_its_workers(tmp_path):
    s = effective_settings(tmp_path)
    res = container()["resources"]
    limit, request = mib(res["limits"]["memory"]), mib(res["requests"]["memory"])
    assert s.worker.memory_mb > 0, "[worker] memory_mb = 0 leaves the workers unbounded inside the pod"
    need = DAEMON_MEMORY_MIB + WORKERS_AT_ONCE * s.worker.memory_mb
    assert limit >= need, (f"memory limit {res['limits']['memory']} < daemon {DAEMON_MEMORY_MIB} MiB + "
                           f"{WORKERS_AT_ONCE} workers x memory_mb {s.worker.memory_mb}: the pod's OOM kill would "
                           "come before the workers' own limit")
    assert request == limit  # memory is not compressible: no overcommit
    cpu_limit = res["limits"]["cpu"]
    assert pod_env()["OMP_NUM_THREADS"] == cpu_limit
    assert "OMP_NUM_THREADS" in s.worker.env_passthrough  # else the workers never see it


def test_replicas_fit_the_input_partitions(tmp_path):
    """More pods than input partitions leaves pods with nothing to do (never ready)."""
    s = effective_settings(tmp_path)
    topics = tomllib.loads((ROOT / "config" / "topics.toml").read_text())["topic"]
    partitions = sum(t["partitions"] for t in topics if t["name"] in s.inputs.topics and t["role"] == "input")
    assert partitions, "the ConfigMap's input topics are not declared in config/topics.toml"
    assert statefulset()["spec"]["replicas"] <= partitions


def test_selectors_select_the_pods():
    sts = statefulset()
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selects(sts["spec"]["selector"], labels)
    assert selects(one("PodDisruptionBudget")["spec"]["selector"], labels)
    headless = one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (headless, one("Service", "failoverd-metrics")):
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        assert svc["spec"]["publishNotReadyAddresses"] is True  # a paused (not ready) daemon stays reachable
        for p in svc["spec"]["ports"]:
            port_number(container(), p["targetPort"])  # a named port of the container
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and sts["spec"]["replicas"] > 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a paused pod must not block a drain


def test_servicemonitor_scrapes_the_metrics_service():
    sm = one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    services = [d for _, d in all_documents() if d["kind"] == "Service"]
    chosen = [s for s in services if selects(spec["selector"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in chosen] == ["failoverd-metrics"], "select exactly the metrics Service"
    (svc,) = chosen
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints to scrape"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                           "metricRelabelings"}, f"unexpected endpoint fields {set(ep)}"
        assert ep["port"] in ports, f"endpoint port {ep['port']!r} is not a port name of {svc['metadata']['name']}"
        assert port_number(container(), ports[ep["port"]]["targetPort"]) == port_number(container(), "metrics")
        assert ep.get("path", "/metrics") == "/metrics"

        def seconds(d: str) -> int:
            m = re.fullmatch(r"(\d+)(s|m)", d)
            assert m, f"not a Prometheus duration: {d!r}"
            return int(m.group(1)) * (60 if m.group(2) == "m" else 1)

        prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
        assert seconds(ep["interval"]) == seconds(prom["scrape_configs"][0]["scrape_interval"])
        assert seconds(ep["scrapeTimeout"]) < seconds(ep["interval"])
    # the job label the alerts select on: the value of the Service label named by jobLabel
    job = svc["metadata"]["labels"][spec["jobLabel"]]
    jobs = {m for a in load_alerts() for m in re.findall(r'job="([^"]+)"', a["expr"])}
    assert jobs == {job}


# ---- Kafka ACLs (docs/operations.md) ---------------------------------------------------------
# What each resource type accepts (Kafka's AclCommand / authorizer table).
ACL_OPERATIONS = {
    "topic": {"Read", "Write", "Create", "Delete", "Alter", "Describe", "DescribeConfigs", "AlterConfigs", "All"},
    "group": {"Read", "Describe", "Delete", "All"},
    "cluster": {"Create", "ClusterAction", "DescribeConfigs", "AlterConfigs", "IdempotentWrite", "Alter", "Describe",
                "All"},
    "transactional-id": {"Describe", "Write", "All"},
}


@dataclasses.dataclass(frozen=True)
class Grant:
    principal: str
    resource: str  # topic | group | cluster | transactional-id
    name: str
    pattern: str  # literal | prefixed
    operation: str


def acl_commands(text: str | None = None) -> list[list[str]]:
    """argv of each `kafka-acls.sh` command in the fenced blocks of docs/operations.md, with the
    shell variables the section defines substituted."""
    text = OPERATIONS.read_text() if text is None else text
    out, vars_ = [], {}
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S):
        logical = re.sub(r"\\\n\s*", " ", block)
        for line in logical.splitlines():
            line = line.split(" #")[0].strip()
            if m := re.fullmatch(r"([A-Z_]+)=(\S+)", line):
                vars_[m.group(1)] = shlex.split(m.group(2))[0]
            elif line.startswith("kafka-acls.sh "):
                line = re.sub(r'\$\{?([A-Z_]+)\}?', lambda m: vars_.get(m.group(1), m.group(0)), line)
                out.append(shlex.split(line)[1:])
    return out


def grants(argv: list[str]) -> list[Grant]:
    principals, ops, resources, pattern, action = [], [], [], "literal", None
    it = iter(argv)
    for a in it:
        if a in ("--add", "--remove", "--list"):
            action = a
        elif a == "--allow-principal":
            principals.append(next(it))
        elif a == "--operation":
            ops.append(next(it))
        elif a in ("--topic", "--group", "--transactional-id"):
            resources.append((a[2:], next(it)))
        elif a == "--cluster":
            resources.append(("cluster", "kafka-cluster"))
        elif a == "--resource-pattern-type":
            pattern = next(it)
        elif a in ("--bootstrap-server", "--command-config"):
            next(it)
        else:
            raise AssertionError(f"kafka-acls.sh option not understood by this test: {a}")
    assert action == "--add" and principals and ops and resources, argv
    for kind, _ in resources:
        bad = set(ops) - ACL_OPERATIONS[kind]
        assert not bad, f"{kind} does not take the operations {bad}: {' '.join(argv)}"
    return [Grant(p, kind, name, pattern, op) for p in principals for op in ops for kind, name in resources]


def granted(gs: list[Grant], principal: str, resource: str, name: str, op: str) -> bool:
    """Does a grant cover it (a literal name, a prefix, or *; All covers every operation)."""
    implied = {"Describe": {"Read", "Write", "Delete", "Alter"}, "DescribeConfigs": {"AlterConfigs"}}
    for g in gs:
        if g.principal != principal or g.resource != resource:
            continue
        if g.operation not in {op, "All", *implied.get(op, ())}:
            continue
        if g.name == "*" or (g.pattern == "literal" and g.name == name) or \
                (g.pattern == "prefixed" and name.startswith(g.name)):
            return True
    return False


def docs_grants() -> list[Grant]:
    commands = acl_commands()
    assert commands, "docs/operations.md shows no kafka-acls.sh command"
    return [g for argv in commands for g in grants(argv)]


def test_acls_grant_the_daemon_what_it_uses(tmp_path):
    from daemon.engine.partition import transactional_id

    s = effective_settings(tmp_path)
    gs = docs_grants()
    daemon = f"User:{s.kafka.sasl_plain_username}"
    need = [("group", s.kafka.group_id, "Read"), ("cluster", "kafka-cluster", "IdempotentWrite")]
    for topic in s.inputs.topics:
        need += [("topic", topic, "Read"), ("topic", topic, "Describe")]
        # every transactional id the engine can open for this topic
        for partition in (0, 7, 1023):
            tid = transactional_id(s.app.name, s.kafka.group_id, topic, partition)
            need += [("transactional-id", tid, "Write"), ("transactional-id", tid, "Describe")]
    written = [s.output.topic, s.dead_letter.topic, s.checkpoint.topic, s.state.changelog_topic]
    for topic in written:  # and engine/limits.py reads their max.message.bytes
        need += [("topic", topic, op) for op in ("Write", "Describe", "DescribeConfigs")]
    need += [("topic", s.state.changelog_topic, "Read")]  # state restore
    need += [("topic", s.registry.control_topic, op) for op in ("Read", "Write", "Describe")]
    missing = [n for n in need if not granted(gs, daemon, *n)]
    assert not missing, f"docs/operations.md does not grant {daemon}: {missing}"
    # and no more than the prefix: another app's ids stay out of reach
    assert not granted(gs, daemon, "transactional-id", f"other-{s.app.name}:g:t:0", "Write")
    assert not granted(gs, daemon, "topic", s.inputs.topics[0], "Write")  # the daemon never writes its inputs


def test_acls_grant_the_dead_letter_replay_its_transactional_id(tmp_path):
    from daemon.deadletters import transactional_id

    s = effective_settings(tmp_path)
    gs = docs_grants()
    operators = {g.principal for g in gs if g.resource == "transactional-id"
                 and granted(gs, g.principal, "transactional-id", transactional_id(s.dead_letter.topic), "Write")}
    assert operators, f"no principal may use {transactional_id(s.dead_letter.topic)!r} (failoverd dlq replay)"
    for p in operators:
        for n in [("transactional-id", transactional_id(s.dead_letter.topic), "Describe"),
                  ("topic", s.dead_letter.topic, "Read"), ("topic", s.dead_letter.topic, "Write"),
                  *[("topic", t, "Write") for t in s.inputs.topics]]:  # replays go back to the source
            assert granted(gs, p, *n), f"{p} replays dead letters but lacks {n}"


def test_acl_parser_catches_a_wrong_grant():
    with pytest.raises(AssertionError, match="does not take"):
        grants(["--bootstrap-server", "b:9092", "--add", "--allow-principal", "User:x", "--operation",
                "IdempotentWrite", "--topic", "t"])
    text = "```sh\nAPP=fd\nkafka-acls.sh --add --allow-principal User:x --operation Write \\\n" \
           "  --transactional-id \"$APP:\" --resource-pattern-type prefixed\n```\n"
    (argv,) = acl_commands(text)
    (g,) = grants(argv)
    assert g == Grant("User:x", "transactional-id", "fd:", "prefixed", "Write")
    assert granted([g], "User:x", "transactional-id", "fd:g:t:3", "Write")
    assert not granted([g], "User:x", "transactional-id", "fd.t.3", "Write")  # the old {app}.{topic}.{p} ids


def kubectl_exec_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each `kubectl exec ... -- failoverd ...` in docs/operations.md and the
    comments of deploy/kubernetes (test_docs.py reads only lines that start with `failoverd`)."""
    sources = [(OPERATIONS.name, OPERATIONS.read_text())]
    sources += [(p.name, "\n".join(line.lstrip("# ") for line in p.read_text().splitlines() if line.startswith("#")))
                for p in manifest_files()]
    out = []
    for where, text in sources:
        logical = re.sub(r"\\\n\s*", " ", text)
        for line in logical.splitlines():
            if m := re.search(r"kubectl exec .*? -- failoverd (.*)", line):
                rest = re.split(r"\s+#", m.group(1))[0]
                out.append((where, shlex.split(rest)))
    return out


def test_failoverd_commands_run_through_kubectl_exec_parse():
    from daemon.cli import build_parser

    found = kubectl_exec_commands()
    assert {w for w, _ in found} >= {"operations.md", "toolbox.yaml"}
    for where, argv in found:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `failoverd {' '.join(argv)}` does not parse", pytrace=False)
