"""The topics file: ``config/topics.toml`` parsed and checked into a :class:`TopicsFile`.

The file declares every topic the daemon uses, each with a role (the roles of
:data:`daemon.config.TOPIC_ROLES`), a partition count, a replication factor and the topic configs
that matter. Problems are reported all at once, each naming the file, the topic, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.config import TOPIC_NAME, TOPIC_ROLES, closest, show
from daemon.errors import ConfigError

ROLES = tuple(r.role for r in TOPIC_ROLES)
COMPACTED_ROLES = tuple(r.role for r in TOPIC_ROLES if r.compacted)
TOPIC_KEYS = ("name", "role", "partitions", "replication_factor", "config")
SAFETY_KEYS = ("input_retention_checkpoint_multiple", "min_input_retention_ms")
# Where the daemon's configuration names the topic of each role (for messages).
ROLE_FIELDS = {r.role: r.field for r in TOPIC_ROLES}


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



def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = closest(word, options)
    return f" (did you mean {close}?)" if close else ""


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


def _parse_topic(i: int, entry: dict[str, Any], problems: list[str]) -> TopicSpec | None:
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
    return TopicSpec(name=str(name), role=str(role), partitions=entry["partitions"],
                     replication_factor=entry["replication_factor"], config=config)

