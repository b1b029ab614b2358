"""Kafka topics as code: ``config/topics.toml`` compared with, and applied to, a cluster.

    spec = topics.load_topics("config/topics.toml")
    topics.refuse_unsafe(spec, settings)            # TopicPlanError before touching the cluster
    async with topics.admin_client(settings.kafka) as admin:
        cluster = await topics.read_cluster(admin, spec.names())
        plan = topics.make_plan(spec, cluster)     # changes (fixable) + blockers (not fixable)
        await topics.execute(admin, plan)          # validate all, then change

The package, in that order: ``spec`` (the file), ``safety`` (the rules checked before the
cluster is touched), ``cluster`` (what the cluster has), ``plan`` (the changes, and doing them).
Everything public is re-exported here.
"""

from daemon.topics.cluster import (
    DYNAMIC_TOPIC_CONFIG, SETTLE_TIMEOUT_S, UNKNOWN_TOPIC_OR_PARTITION, Cluster, ClusterTopic, admin_client,
    read_cluster,
)
from daemon.topics.plan import (
    AddPartitions, AlterConfig, Blocker, Change, CreateTopic, Plan, apply, execute, make_plan, plan_for,
    refuse_blockers,
)
from daemon.topics.safety import refuse_unsafe, unsafe_reasons
from daemon.topics.spec import (
    COMPACTED_ROLES, ROLE_FIELDS, ROLES, SAFETY_KEYS, TOPIC_KEYS, Safety, TopicsFile, TopicSpec, load_topics,
)

__all__ = [
    "COMPACTED_ROLES", "DYNAMIC_TOPIC_CONFIG", "ROLE_FIELDS", "ROLES", "SAFETY_KEYS", "SETTLE_TIMEOUT_S",
    "TOPIC_KEYS", "UNKNOWN_TOPIC_OR_PARTITION", "AddPartitions", "AlterConfig", "Blocker", "Change", "Cluster",
    "ClusterTopic", "CreateTopic", "Plan", "Safety", "TopicSpec", "TopicsFile", "admin_client", "apply", "execute",
    "load_topics", "make_plan", "plan_for", "read_cluster", "refuse_blockers", "refuse_unsafe", "unsafe_reasons",
]
