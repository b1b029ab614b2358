"""What the cluster has: partitions, replication factor and configs of the declared topics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, for_code

from daemon import clients
from daemon.config import KafkaSettings
from daemon.errors import TopicPlanError

DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs config_source of a topic-level override
UNKNOWN_TOPIC_OR_PARTITION = 3
SETTLE_TIMEOUT_S = 30.0  # how long apply waits for the cluster to show what it just did


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
    admin = clients.admin(kafka)
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


Configs = dict[str, str | None]


async def _describe_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, tuple[Configs, Configs]]:
    """Per topic: (every config's current value, the topic-level overrides)."""
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    out: dict[str, tuple[Configs, Configs]] = {}
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

