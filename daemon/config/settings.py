"""The whole configuration (:class:`Settings`) and the one table of topic roles.

:data:`TOPIC_ROLES` is where the daemon's topics are named: each role (as written in
config/topics.toml), the settings key that names its topic(s), and whether the role's topic must
be compacted. ``Settings.topics_by_role``, the "each topic has exactly one role" check and
daemon/topics all read it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from daemon.config.fields import MASK, Problem, invalid, show
from daemon.config.sections import (
    SECTIONS, AdminSettings, AppSettings, CheckpointSettings, DeadLetterSettings, FailoverSettings, InputsSettings,
    KafkaSettings, MetricsSettings, OutputSettings, RegistrySettings, StateSettings, WorkerSettings,
)
from daemon.config.sections import SchemaRegistrySettings, format_problems, producer_problems


@dataclasses.dataclass(frozen=True)
class TopicRole:
    """One role a topic plays for the daemon, and the settings key that names it."""

    role: str  # as in config/topics.toml
    section: str
    key: str
    compacted: bool  # a restore reads the latest record of every key: time- or size-based deletion loses it

    @property
    def field(self) -> str:
        """The dotted settings path, e.g. ``state.changelog_topic``."""
        return f"{self.section}.{self.key}"

    def topics(self, sections: object) -> tuple[str, ...]:
        """The topic name(s) of this role in ``sections`` (a Settings, or anything with the sections)."""
        value = getattr(getattr(sections, self.section), self.key)
        return value if isinstance(value, tuple) else (value,)


TOPIC_ROLES = (
    TopicRole("input", "inputs", "topics", compacted=False),
    TopicRole("output", "output", "topic", compacted=False),
    TopicRole("dead_letter", "dead_letter", "topic", compacted=False),
    TopicRole("changelog", "state", "changelog_topic", compacted=True),
    TopicRole("checkpoint", "checkpoint", "topic", compacted=True),
    TopicRole("control", "registry", "control_topic", compacted=True),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The whole configuration. ``source`` is the file it came from (None when built in code)."""

    source: Path | None
    kafka: KafkaSettings
    app: AppSettings
    inputs: InputsSettings
    output: OutputSettings
    dead_letter: DeadLetterSettings
    checkpoint: CheckpointSettings
    state: StateSettings
    registry: RegistrySettings
    worker: WorkerSettings
    failover: FailoverSettings
    admin: AdminSettings
    metrics: MetricsSettings
    schema_registry: SchemaRegistrySettings
    env_overrides: tuple[str, ...] = ()  # names of the FAILOVERD_* variables that were applied
    bindings: dict[str, Path] = dataclasses.field(default_factory=dict)
    """``[bindings]``: this environment's file or directory for each binding a bundle may declare
    (name -> absolute path; docs/bundles.md#bindings). A free-form table, so not in SECTIONS."""

    def __post_init__(self) -> None:
        problems = topic_role_problems(self) + format_problems(self) + producer_problems(self)
        if problems:
            raise invalid(problems, str(self.source) if self.source else "")

    def topics_by_role(self) -> dict[str, tuple[str, ...]]:
        """Every topic the daemon uses, by role (the roles of config/topics.toml)."""
        return {r.role: r.topics(self) for r in TOPIC_ROLES}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The effective configuration as plain data (paths as strings, lists); secrets masked."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            values: dict[str, Any] = {}
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if f.metadata.get("secret") and value is not None:
                    value = MASK
                elif isinstance(value, Path):
                    value = str(value)
                elif isinstance(value, tuple):
                    value = list(value)
                values[f.name] = value
            out[name] = values
        if self.bindings:
            out["bindings"] = {name: str(path) for name, path in sorted(self.bindings.items())}
        return out


def topic_role_problems(sections: object) -> list[Problem]:
    """No topic may have two roles (``sections``: a Settings, or anything with its sections)."""
    seen: dict[str, str] = {}
    problems = []
    for role in TOPIC_ROLES:
        for topic in role.topics(sections):
            if topic in seen and seen[topic] != role.field:
                problems.append(Problem(role.field, topic, f"expected a topic of its own: {show(topic)} is already "
                                                           f"{seen[topic]}; each topic has exactly one role"))
            seen.setdefault(topic, role.field)
    return problems
