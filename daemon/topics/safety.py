"""The safety rules of a topics plan, checked before the cluster is touched.

Two rules make a plan unsafe, and it is refused before anything is changed:

* an ``input`` topic's ``retention.ms`` must cover the replay window: at least
  ``safety.input_retention_checkpoint_multiple`` x ``checkpoint.interval_ms``, and never less than
  ``safety.min_input_retention_ms`` (``-1``, keep forever, is fine);
* ``changelog``, ``checkpoint`` and ``control`` topics must be ``cleanup.policy = "compact"``.

Besides, every topic the daemon's configuration names must be declared with its role, a changelog
needs as many partitions as the widest input, and ``min.insync.replicas`` must not exceed the
replication factor.
"""

from __future__ import annotations

from daemon.config import Settings
from daemon.errors import TopicPlanError
from daemon.topics.spec import COMPACTED_ROLES, ROLE_FIELDS, TopicsFile, TopicSpec


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

