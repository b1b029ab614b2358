"""Kafka topics as code: ``config/topics.toml`` compared with, and applied to, a cluster.

    spec = topics.load_topics("config/topics.toml")
    topics.refuse_unsafe(spec, settings)            # TopicPlanError before touching the cluster
    async with topics.admin_client(settings.kafka) as admin:
        cluster = await topics.read_cluster(admin, spec.names())
        plan = topics.make_plan(spec, cluster)     # changes (fixable) + blockers (not fixable)
        await topics.execute(admin, plan)          # validate all, then change

The file declares every topic the daemon uses, each with a role, a partition count, a replication
factor and the topic configs that matter. Only declared configs are compared. A plan creates
missing topics, adds partitions and alters drifted configs; it never deletes, never shrinks
partitions and never changes a replication factor (those are *blockers*, reported, not done).

Two rules make a plan unsafe, and it is refused before anything is changed:

* an ``input`` topic's ``retention.ms`` must cover the replay window: at least
  ``safety.input_retention_checkpoint_multiple`` x ``checkpoint.interval_ms``, and never less than
  ``safety.min_input_retention_ms`` (``-1``, keep forever, is fine);
* ``changelog``, ``checkpoint`` and ``control`` topics must be ``cleanup.policy = "compact"``.

aiokafka 0.14 speaks the legacy AlterConfigs API, which *replaces* a topic's dynamic configs with
the set sent. :func:`execute` therefore sends the topic's current dynamic overrides merged with the
declared values, so configs the file does not declare are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import time
import tomllib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import AlterConfigsRequest

from daemon.config import TOPIC_NAME, KafkaSettings, Settings, show
from daemon.errors import ConfigError, TopicPlanError

ROLES = ("input", "output", "dead_letter", "changelog", "checkpoint", "control")
COMPACTED_ROLES = ("changelog", "checkpoint", "control")
TOPIC_KEYS = ("name", "role", "partitions", "replication_factor", "config")
SAFETY_KEYS = ("input_retention_checkpoint_multiple", "min_input_retention_ms")
# Where the daemon's configuration names the topic of each role (for messages).
ROLE_FIELDS = {
    "input": "inputs.topics", "output": "output.topic", "dead_letter": "dead_letter.topic",
    "changelog": "state.changelog_topic", "checkpoint": "checkpoint.topic", "control": "registry.control_topic",
}
DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs config_source of a topic-level override
UNKNOWN_TOPIC_OR_PARTITION = 3
TOPIC_ALREADY_EXISTS = 36
SETTLE_TIMEOUT_S = 30.0  # how long apply waits for the cluster to show what it just did


# ---- the file ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Safety:
    input_retention_checkpoint_multiple: int = 1000
    min_input_retention_ms: int = 3_600_000


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    name: str
    role: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)

    def describe(self) -> str:
        configs = ", ".join(f"{k}={v}" for k, v in self.config.items()) or "broker defaults"
        return (f"{self.partitions} partition{'s' if self.partitions != 1 else ''}, "
                f"replication factor {self.replication_factor}, configs {configs}")


@dataclasses.dataclass(frozen=True)
class TopicsFile:
    source: Path
    safety: Safety
    topics: tuple[TopicSpec, ...]

    def names(self) -> list[str]:
        return [t.name for t in self.topics]


def load_topics(path: str | Path) -> TopicsFile:
    """Parse and validate a topics file; ConfigError names the file, topic, key and the fix."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: topics file not found (working directory {Path.cwd()}); "
                          "pass --topics with the path of an existing file, e.g. config/topics.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the topics file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

    problems: list[str] = []
    for key in data:
        if key not in ("safety", "topic"):
            problems.append(f"{key} is unknown: expected [safety] and [[topic]] entries{_did_you_mean(key, ('safety', 'topic'))}")
    safety = _parse_safety(data.get("safety", {}), problems)
    entries = data.get("topic", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        problems.append("topic must be an array of tables: write each topic as a [[topic]] block")
        entries = []
    if not entries and not problems:
        problems.append("declares no topics: add a [[topic]] block per topic")
    specs: list[TopicSpec] = []
    for i, entry in enumerate(entries):
        spec = _parse_topic(i, entry, problems)
        if spec is not None:
            specs.append(spec)
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            problems.append(f'topic "{spec.name}" is declared more than once: expected one [[topic]] per name')
        seen.add(spec.name)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return TopicsFile(source=path, safety=safety, topics=tuple(specs))


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _parse_safety(table: Any, problems: list[str]) -> Safety:
    if not isinstance(table, dict):
        problems.append("safety must be a table: write it as [safety]")
        return Safety()
    values: dict[str, int] = {}
    for key, value in table.items():
        if key not in SAFETY_KEYS:
            problems.append(f"safety.{key} is an unknown key{_did_you_mean(key, SAFETY_KEYS)}; "
                            f"valid keys: {', '.join(SAFETY_KEYS)}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"safety.{key} = {show(value)} is invalid: expected an integer >= 0")
        else:
            values[key] = value
    return Safety(**values)


def _parse_topic(i: int, entry: dict, problems: list[str]) -> TopicSpec | None:
    name = entry.get("name")
    where = f'topic "{name}"' if isinstance(name, str) and name else f"topic[{i}]"
    before = len(problems)
    for key in entry:
        if key not in TOPIC_KEYS:
            problems.append(f"{where}.{key} is an unknown key{_did_you_mean(key, TOPIC_KEYS)}; "
                            f"valid keys: {', '.join(TOPIC_KEYS)}")
    for key in ("name", "role", "partitions", "replication_factor"):
        if key not in entry:
            problems.append(f"{where}.{key} is missing")
    if "name" in entry and (not isinstance(name, str) or not TOPIC_NAME.fullmatch(name) or name in (".", "..")):
        problems.append(f"{where}.name = {show(name)} is invalid: expected a Kafka topic name, "
                        "1-249 characters of a-z A-Z 0-9 . _ -")
    role = entry.get("role")
    if "role" in entry and role not in ROLES:
        hint = _did_you_mean(str(role), ROLES)
        problems.append(f"{where}.role = {show(role)} is invalid: expected one of {', '.join(ROLES)}{hint}")
    for key in ("partitions", "replication_factor"):
        value = entry.get(key)
        if key in entry and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{where}.{key} = {show(value)} is invalid: expected an integer >= 1")
    raw_config = entry.get("config", {})
    config: dict[str, str] = {}
    if not isinstance(raw_config, dict):
        problems.append(f'{where}.config = {show(raw_config)} is invalid: expected a table of topic configs, '
                        'e.g. config = { "retention.ms" = "604800000" }')
    else:
        for key, value in raw_config.items():
            if isinstance(value, bool):
                config[key] = "true" if value else "false"
            elif isinstance(value, (int, str)):
                config[key] = str(value).strip()
            else:
                problems.append(f'{where}.config."{key}" = {show(value)} is invalid: expected a string '
                                '(Kafka stores topic configs as strings), e.g. "604800000"')
    if len(problems) > before:
        return None
    return TopicSpec(name=name, role=role, partitions=entry["partitions"],
                     replication_factor=entry["replication_factor"], config=config)


# ---- safety: refused before the cluster is touched ------------------------------------------------

def refuse_unsafe(spec: TopicsFile, settings: Settings) -> None:
    """Raise TopicPlanError listing every reason the plan is unsafe (nothing has been changed)."""
    reasons = unsafe_reasons(spec, settings)
    if reasons:
        raise TopicPlanError(f"refusing the topics plan of {spec.source}; nothing was changed:\n"
                             + "\n".join(f"  - {r}" for r in reasons))


def unsafe_reasons(spec: TopicsFile, settings: Settings) -> list[str]:
    reasons: list[str] = []
    config_file = settings.source or "the configuration"
    declared = {t.name: t for t in spec.topics}
    for role, names in settings.topics_by_role().items():
        for name in names:
            topic = declared.get(name)
            if topic is None:
                reasons.append(f'"{name}" is the daemon\'s {role} topic ({ROLE_FIELDS[role]} in {config_file}) '
                               f'but {spec.source} does not declare it: add a [[topic]] with name = "{name}", '
                               f'role = "{role}"')
            elif topic.role != role:
                reasons.append(f'"{name}" is declared with role = "{topic.role}" but it is the daemon\'s {role} '
                               f'topic ({ROLE_FIELDS[role]} in {config_file}): set role = "{role}"')
    window_ms = spec.safety.input_retention_checkpoint_multiple * settings.checkpoint.interval_ms
    floor_ms = max(window_ms, spec.safety.min_input_retention_ms)
    why_floor = (f"the larger of safety.input_retention_checkpoint_multiple "
                 f"({spec.safety.input_retention_checkpoint_multiple}) x checkpoint.interval_ms "
                 f"({settings.checkpoint.interval_ms}) = {window_ms} ms and safety.min_input_retention_ms "
                 f"({spec.safety.min_input_retention_ms} ms)")
    for topic in spec.topics:
        if topic.role == "input":
            reasons += _input_retention_reasons(topic, floor_ms, why_floor)
        if topic.role in COMPACTED_ROLES:
            policy = topic.config.get("cleanup.policy")
            if policy != "compact":
                said = f'cleanup.policy = "{policy}"' if policy is not None else \
                    "cleanup.policy is not declared (the broker default is delete)"
                reasons.append(f'"{topic.name}" (role {topic.role}): {said}; {topic.role} topics must be '
                               'cleanup.policy = "compact": a restore reads the latest record of every key, and '
                               'time- or size-based deletion would silently lose it')
        if topic.role == "changelog":
            widest = max((t.partitions for t in spec.topics if t.role == "input"), default=0)
            if topic.partitions < widest:
                reasons.append(f'"{topic.name}" (role changelog) has {topic.partitions} partitions but an input topic '
                               f'has {widest}: input partition p keeps its state in changelog partition p, so the '
                               f'changelog needs at least as many partitions as the widest input topic')
        min_isr = topic.config.get("min.insync.replicas")
        if min_isr is not None and min_isr.isdigit() and int(min_isr) > topic.replication_factor:
            reasons.append(f'"{topic.name}": min.insync.replicas = {min_isr} is larger than replication_factor = '
                           f'{topic.replication_factor}: every acks=all write (all transactional writes) would fail')
    return reasons


def _input_retention_reasons(topic: TopicSpec, floor_ms: int, why_floor: str) -> list[str]:
    value = topic.config.get("retention.ms")
    prefix = f'"{topic.name}" (role input): '
    replay = ("after a failure failoverd replays the input from the last checkpoint, so those records must "
              "still exist when they are needed")
    if value is None:
        return [prefix + f"retention.ms is not declared, so the replay window would depend on the broker "
                         f"default; {replay}. Declare retention.ms >= {floor_ms} ({why_floor}), or -1"]
    try:
        retention = int(value)
    except ValueError:
        return [prefix + f'retention.ms = "{value}" is not an integer number of milliseconds']
    if retention == -1 or retention >= floor_ms:
        return []
    return [prefix + f"retention.ms = {retention} is shorter than the replay window safety limit of {floor_ms} ms "
                     f"({why_floor}); {replay}. Set retention.ms >= {floor_ms}, or -1 to keep records forever"]


# ---- the cluster ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClusterTopic:
    name: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str | None] = dataclasses.field(hash=False)  # every config, current value
    dynamic: Mapping[str, str | None] = dataclasses.field(hash=False)  # topic-level overrides only


@dataclasses.dataclass(frozen=True)
class Cluster:
    bootstrap: str
    brokers: int
    topics: Mapping[str, ClusterTopic] = dataclasses.field(hash=False)  # declared topics that exist


class _NotReady(Exception):
    """The cluster's metadata is still catching up (e.g. a topic created a moment ago)."""


@contextlib.asynccontextmanager
async def admin_client(kafka: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client; TopicPlanError when the cluster cannot be reached."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise TopicPlanError(f"cannot reach Kafka at {','.join(kafka.bootstrap_servers)}: {exc}; is the broker "
                             "up (failoverd kafka status) and kafka.bootstrap_servers right?") from None
    try:
        yield admin
    finally:
        await admin.close()


async def read_cluster(admin: AIOKafkaAdminClient, names: list[str], bootstrap: str = "",
                       timeout: float = SETTLE_TIMEOUT_S) -> Cluster:
    """Partitions, replication factor and configs of those of ``names`` that exist."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await _read_cluster_once(admin, names, bootstrap)
        except _NotReady as exc:
            if time.monotonic() > deadline:
                raise TopicPlanError(f"the cluster did not answer consistently for {timeout:.0f}s: {exc}") from None
            await asyncio.sleep(0.2)


async def _read_cluster_once(admin: AIOKafkaAdminClient, names: list[str], bootstrap: str) -> Cluster:
    brokers = len((await admin.describe_cluster())["brokers"])
    # All topics, not the named ones: a metadata request naming a missing topic auto-creates it on
    # clusters with auto.create.topics.enable=true.
    metadata = {t["topic"]: t for t in await admin.describe_topics()}
    wanted = [n for n in names if n in metadata]
    topics: dict[str, ClusterTopic] = {}
    for name in wanted:
        meta = metadata[name]
        if meta["error_code"]:
            raise _NotReady(f"metadata of {name}: {for_code(meta['error_code']).__name__}")
    configs = await _describe_configs(admin, wanted) if wanted else {}
    for name in wanted:
        partitions = metadata[name]["partitions"]
        replication = max((len(p["replicas"]) for p in partitions), default=0)
        values, dynamic = configs[name]
        topics[name] = ClusterTopic(name=name, partitions=len(partitions), replication_factor=replication,
                                    configs=values, dynamic=dynamic)
    return Cluster(bootstrap=bootstrap, brokers=brokers, topics=topics)


async def _describe_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, tuple[dict, dict]]:
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    out: dict[str, tuple[dict, dict]] = {}
    for response in responses:
        for error_code, error_message, _type, name, entries in response.resources:
            if error_code == UNKNOWN_TOPIC_OR_PARTITION:
                raise _NotReady(f"configs of {name}: unknown topic")
            if error_code:
                raise TopicPlanError(f"cannot describe the configs of topic {name}: "
                                     f"{for_code(error_code).__name__}: {error_message}")
            values: dict[str, str | None] = {}
            dynamic: dict[str, str | None] = {}
            for entry in entries:
                key, value = entry[0], entry[1]
                values[key] = value
                if response.API_VERSION == 0:
                    is_dynamic = not entry[3]  # v0: is_default
                else:
                    is_dynamic = entry[3] == DYNAMIC_TOPIC_CONFIG  # v1+: config_source
                if is_dynamic:
                    dynamic[key] = value
            out[name] = (values, dynamic)
    return out


# ---- the plan ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CreateTopic:
    spec: TopicSpec

    @property
    def topic(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        return f"create {self.spec.name}: {self.spec.describe()}"

    def difference(self) -> str:
        return f"{self.spec.name}: missing from the cluster (declared: {self.spec.describe()})"


@dataclasses.dataclass(frozen=True)
class AddPartitions:
    topic: str
    current: int
    wanted: int

    def describe(self) -> str:
        return f"increase partitions of {self.topic} from {self.current} to {self.wanted}"

    def difference(self) -> str:
        return f"{self.topic}: partitions: file {self.wanted}, cluster {self.current}"


@dataclasses.dataclass(frozen=True)
class AlterConfig:
    topic: str
    key: str
    current: str | None
    wanted: str
    current_is_default: bool

    def _current(self) -> str:
        if self.current is None:
            return "(not set)"
        return f"{self.current} (default)" if self.current_is_default else self.current

    def describe(self) -> str:
        return f"alter config of {self.topic}: {self.key}: {self._current()} -> {self.wanted}"

    def difference(self) -> str:
        return f"{self.topic}: config {self.key}: file {self.wanted}, cluster {self._current()}"


@dataclasses.dataclass(frozen=True)
class Blocker:
    """A difference apply will not fix: shrinking partitions, changing a replication factor ..."""

    topic: str
    text: str

    def difference(self) -> str:
        return f"{self.topic}: {self.text}"


Change = CreateTopic | AddPartitions | AlterConfig


@dataclasses.dataclass(frozen=True)
class Plan:
    spec: TopicsFile
    cluster: Cluster
    changes: tuple[Change, ...]
    blockers: tuple[Blocker, ...]
    notes: tuple[str, ...]

    @property
    def differences(self) -> list[str]:
        return [c.difference() for c in self.changes] + [b.difference() for b in self.blockers]


def make_plan(spec: TopicsFile, cluster: Cluster) -> Plan:
    changes: list[Change] = []
    blockers: list[Blocker] = []
    notes: list[str] = []
    for topic in spec.topics:
        current = cluster.topics.get(topic.name)
        if current is None:
            if topic.replication_factor > cluster.brokers:
                blockers.append(Blocker(topic.name, f"replication_factor = {topic.replication_factor} but the "
                                                    f"cluster has {cluster.brokers} broker(s): a topic cannot have "
                                                    "more replicas than brokers; lower replication_factor"))
            changes.append(CreateTopic(topic))
            continue
        if topic.partitions > current.partitions:
            changes.append(AddPartitions(topic.name, current.partitions, topic.partitions))
            if topic.role in ("input", "changelog"):
                notes.append(f"adding partitions to {topic.name} (role {topic.role}) moves keys to other partitions: "
                             "records of a key land in a new partition, away from that key's state")
        elif topic.partitions < current.partitions:
            blockers.append(Blocker(topic.name, f"partitions: file {topic.partitions}, cluster {current.partitions}; "
                                                "Kafka cannot decrease partitions: set partitions >= "
                                                f"{current.partitions} in the file, or recreate the topic by hand"))
        if topic.replication_factor != current.replication_factor:
            blockers.append(Blocker(topic.name, f"replication factor: file {topic.replication_factor}, cluster "
                                                f"{current.replication_factor}; changing it needs a partition "
                                                "reassignment (kafka-reassign-partitions.sh), which failoverd does not do"))
        for key, wanted in topic.config.items():
            value = current.configs.get(key)
            if value != wanted:
                changes.append(AlterConfig(topic.name, key, value, wanted, key not in current.dynamic))
        if any(isinstance(c, AlterConfig) and c.topic == topic.name for c in changes):
            hidden = sorted(k for k, v in current.dynamic.items() if v is None and k not in topic.config)
            if hidden:
                blockers.append(Blocker(topic.name, f"has sensitive topic configs ({', '.join(hidden)}) whose values "
                                                    "Kafka does not return; altering configs would erase them: "
                                                    "declare them in the file"))
    return Plan(spec=spec, cluster=cluster, changes=tuple(changes), blockers=tuple(blockers), notes=tuple(notes))


# ---- doing it ------------------------------------------------------------------------------------

def refuse_blockers(plan: Plan) -> None:
    if plan.blockers:
        raise TopicPlanError("the cluster differs from the file in ways apply does not fix; nothing was changed:\n"
                             + "\n".join(f"  - {b.difference()}" for b in plan.blockers))


async def execute(admin: AIOKafkaAdminClient, plan: Plan) -> None:
    """Carry out ``plan.changes``. Everything the broker can validate is validated before any change."""
    refuse_blockers(plan)
    creates = [c.spec for c in plan.changes if isinstance(c, CreateTopic)]
    partitions = {c.topic: NewPartitions(c.wanted) for c in plan.changes if isinstance(c, AddPartitions)}
    altered = sorted({c.topic for c in plan.changes if isinstance(c, AlterConfig)})
    declared = {t.name: t for t in plan.spec.topics}
    alter_resources = [
        (ConfigResourceType.TOPIC, name,
         # AlterConfigs replaces all dynamic configs: keep the topic's other overrides.
         list({**plan.cluster.topics[name].dynamic, **declared[name].config}.items()))
        for name in altered
    ]

    # 1. validate everything, change nothing
    if creates:
        await _create(admin, creates, validate_only=True)
    if partitions:
        await _add_partitions(admin, partitions, validate_only=True)
    if alter_resources:
        await _alter(admin, alter_resources, validate_only=True)
    # 2. change
    if creates:
        await _create(admin, creates, validate_only=False)
    if partitions:
        await _add_partitions(admin, partitions, validate_only=False)
    if alter_resources:
        await _alter(admin, alter_resources, validate_only=False)


async def _create(admin: AIOKafkaAdminClient, specs: list[TopicSpec], *, validate_only: bool) -> None:
    response = await admin.create_topics(
        [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config)) for s in specs],
        validate_only=validate_only)
    errors = [(topic, code, rest[0] if rest else "") for topic, code, *rest in response.topic_errors if code]
    if errors:
        lines = [f"  - {topic}: {for_code(code).__name__}: {message}" for topic, code, message in errors]
        done = "nothing was changed" if validate_only else "the other topics of this step were created"
        raise TopicPlanError(f"the broker refused to create topics ({done}):\n" + "\n".join(lines))


async def _add_partitions(admin: AIOKafkaAdminClient, partitions: dict[str, NewPartitions], *,
                          validate_only: bool) -> None:
    try:
        await admin.create_partitions(partitions, validate_only=validate_only)
    except KafkaError as exc:
        raise TopicPlanError(f"the broker refused to add partitions: {exc}") from None


async def _alter(admin: AIOKafkaAdminClient, resources: list, *, validate_only: bool) -> None:
    # aiokafka's alter_configs() has no validate_only; send the same request with it set.
    request = AlterConfigsRequest(resources=resources, validate_only=validate_only)
    response = await admin._send_request(request)  # noqa: SLF001 - see above
    errors = [(name, code, message) for code, message, _type, name in response.resources if code]
    if errors:
        lines = [f"  - {name}: {for_code(code).__name__}: {message}" for name, code, message in errors]
        raise TopicPlanError("the broker refused to alter topic configs:\n" + "\n".join(lines))


async def plan_for(spec: TopicsFile, settings: Settings) -> Plan:
    """Read the cluster named by ``settings.kafka`` and compare it with ``spec`` (after the safety rules)."""
    refuse_unsafe(spec, settings)
    async with admin_client(settings.kafka) as admin:
        cluster = await read_cluster(admin, spec.names(), ",".join(settings.kafka.bootstrap_servers))
        return make_plan(spec, cluster)


async def apply(spec: TopicsFile, settings: Settings, *, dry_run: bool = False, report=print) -> Plan:
    """Print the plan through ``report``; unless ``dry_run``, carry it out and wait until the cluster shows it."""
    refuse_unsafe(spec, settings)
    bootstrap = ",".join(settings.kafka.bootstrap_servers)
    async with admin_client(settings.kafka) as admin:
        cluster = await read_cluster(admin, spec.names(), bootstrap)
        plan = make_plan(spec, cluster)
        refuse_blockers(plan)
        if not plan.changes:
            report(f"nothing to do: the {len(spec.topics)} topics of {spec.source} match the cluster at {bootstrap}")
            return plan
        report(f"plan for {bootstrap} ({cluster.brokers} broker{'s' if cluster.brokers != 1 else ''}) "
               f"from {spec.source}:")
        for change in plan.changes:
            report(f"  {change.describe()}")
        for note in plan.notes:
            report(f"  note: {note}")
        if dry_run:
            report(f"dry run: nothing changed ({len(plan.changes)} change{'s' if len(plan.changes) != 1 else ''} "
                   "planned)")
            return plan
        await execute(admin, plan)
        await _settle(admin, spec, bootstrap)
        report(f"applied {len(plan.changes)} change{'s' if len(plan.changes) != 1 else ''}; "
               f"the cluster now matches {spec.source}")
        return plan


async def _settle(admin: AIOKafkaAdminClient, spec: TopicsFile, bootstrap: str) -> None:
    """Wait until the cluster's metadata shows every change (so a second apply finds nothing to do)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        plan = make_plan(spec, await read_cluster(admin, spec.names(), bootstrap))
        if not plan.changes and not plan.blockers:
            return
        if time.monotonic() > deadline:
            raise TopicPlanError(f"applied, but after {SETTLE_TIMEOUT_S:.0f}s the cluster still differs:\n"
                                 + "\n".join(f"  - {d}" for d in plan.differences))
        await asyncio.sleep(0.2)
