"""The plan: the changes that make the cluster match the file, and carrying them out.

A plan creates missing topics, adds partitions and alters drifted configs; it never deletes,
never shrinks partitions and never changes a replication factor (those are *blockers*, reported,
not done). Only declared configs are compared.

aiokafka 0.14 speaks the legacy AlterConfigs API, which *replaces* a topic's dynamic configs with
the set sent. :func:`execute` therefore sends the topic's current dynamic overrides merged with the
declared values, so configs the file does not declare are kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResourceType
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.admin import AlterConfigsRequest

from daemon import clients
from daemon.config import Settings
from daemon.errors import TopicPlanError
from daemon.topics.cluster import SETTLE_TIMEOUT_S, Cluster, admin_client, read_cluster
from daemon.topics.safety import refuse_unsafe
from daemon.topics.spec import TopicsFile, TopicSpec


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

    # the same steps twice: first validate everything and change nothing, then change
    for validate_only in (True, False):
        if creates:
            await _create(admin, creates, validate_only=validate_only)
        if partitions:
            await _add_partitions(admin, partitions, validate_only=validate_only)
        if alter_resources:
            await _alter(admin, alter_resources, validate_only=validate_only)


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


async def _alter(admin: AIOKafkaAdminClient, resources: list[tuple[int, str, list[tuple[str, str | None]]]], *,
                 validate_only: bool) -> None:
    # aiokafka's alter_configs() has no validate_only; send the same request with it set.
    request = AlterConfigsRequest(resources=resources, validate_only=validate_only)
    response = await clients.send_request(admin, request)
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


async def apply(spec: TopicsFile, settings: Settings, *, dry_run: bool = False,
                report: Callable[[str], Any] = print) -> Plan:
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
