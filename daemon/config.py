"""Configuration: one TOML file, overridable by environment variables, parsed into frozen settings.

    settings = config.load("config/failoverd.toml")      # env overrides from os.environ
    settings.kafka.client_kwargs()                        # -> AIOKafkaConsumer/Producer/AdminClient kwargs
    settings.checkpoint.interval_ms                       # -> 100

Rules (docs/configuration.md has the full list of keys):

* Every key lives in a section (``[kafka]``, ``[checkpoint]`` ...). Unknown sections and keys are
  errors, with the closest valid name suggested.
* ``FAILOVERD_<SECTION>__<KEY>`` (upper case, double underscore) overrides ``<section>.<key>``,
  e.g. ``FAILOVERD_CHECKPOINT__INTERVAL_MS=500``. The text is parsed according to the key's
  type: integers, ``true``/``false``/``1``/``0``, numbers, comma-separated lists, paths. An empty
  value unsets an optional key. Any variable of that shape that names no key is an error.
* Relative paths resolve against the current working directory at load time (``~`` expands).
* Every error is a :class:`~daemon.errors.ConfigError` naming the file, the field, the bad value,
  what was expected, and, for overrides, the environment variable. All problems of a file are
  reported at once, one per line.

Each section is a frozen dataclass. A field's type annotation says how its value is parsed;
its metadata (see :func:`_key`) says which values are valid. The same checks run when a section
is built directly in code, so an invalid ``Settings`` cannot exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

ENV_PREFIX = "FAILOVERD_"
ENV_SEPARATOR = "__"
MASK = "***"

TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
APP_NAME = re.compile(r"[a-zA-Z0-9._-]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


# ---- problems ------------------------------------------------------------------------------

_NO_VALUE = object()


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration.

    ``field`` is the dotted path (``checkpoint.interval_ms``, ``inputs.topics[1]``); ``value`` the
    offending value (already masked when secret) or ``_NO_VALUE``; ``expected`` what would be valid.
    """

    field: str
    value: Any
    expected: str
    verb: str = "is invalid"

    def render(self, origin: str = "") -> str:
        if self.value is _NO_VALUE:
            return f"{self.field}{origin} {self.verb}: {self.expected}"
        return f"{self.field} = {show(self.value)}{origin} {self.verb}: {self.expected}"


def show(value: Any) -> str:
    """A value as it would be written in TOML (strings quoted), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _invalid(problems: list[Problem], where: str = "") -> ConfigError:
    prefix = f"{where}: " if where else ""
    exc = ConfigError("\n".join(prefix + p.render() for p in problems))
    exc.problems = problems  # type: ignore[attr-defined]
    return exc


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


# ---- field metadata and checks ---------------------------------------------------------------

def _key(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
         gt: float | None = None, choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None,
         pattern_text: str = "", check: Callable[[Any], str | None] | None = None, secret: bool = False,
         path: bool = False, example: Any = None) -> Any:
    """A settings field: ``default`` plus what makes a value valid.

    ``min``/``max`` inclusive, ``gt`` exclusive lower bound; ``choices`` an enum; ``pattern`` a
    full-match regex (also applied to each element of a tuple); ``check`` returns an error text or
    None; ``secret`` masks the value in :meth:`Settings.to_dict` and messages; ``path`` resolves a
    ``str`` field as a path; ``example`` is shown when a required key is missing.
    """
    meta = {"min": min, "max": max, "gt": gt, "choices": choices, "pattern": pattern,
            "pattern_text": pattern_text, "check": check, "secret": secret, "path": path,
            "example": example}
    return dataclasses.field(default=default, metadata=meta)


def _kind(hint: Any) -> tuple[type, bool]:
    """(base type, optional) of an annotation: ``str | None`` -> (str, True); tuple[str, ...] -> (tuple, False)."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple, optional
    return hint, optional


def _expected(base: type, meta: Mapping[str, Any]) -> str:
    """What a valid value of this field looks like, in words."""
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    if base is bool:
        return "true or false"
    if base in (int, float):
        noun = "an integer" if base is int else "a number"
        bounds = []
        if meta["gt"] is not None:
            bounds.append(f"> {meta['gt']}")
        if meta["min"] is not None:
            bounds.append(f">= {meta['min']}")
        if meta["max"] is not None:
            bounds.append(f"<= {meta['max']}")
        return noun + (" " + " and ".join(bounds) if bounds else "")
    if base is tuple:
        what = f" ({meta['pattern_text']})" if meta["pattern_text"] else ""
        return f"a non-empty list of strings{what}, or one comma-separated string"
    if base is Path or meta["path"]:
        return "a file system path (string)"
    if meta["pattern_text"]:
        return meta["pattern_text"]
    return "a non-empty string"


def _check_value(name: str, value: Any, base: type, meta: Mapping[str, Any]) -> list[Problem]:
    """Range/enum/pattern checks of an already typed value."""
    shown = MASK if meta["secret"] else value
    expected = _expected(base, meta)
    if base in (int, float):
        if (meta["min"] is not None and value < meta["min"]) or (meta["max"] is not None and value > meta["max"]) \
                or (meta["gt"] is not None and value <= meta["gt"]):
            return [Problem(name, shown, f"expected {expected}", "is out of range")]
        return []
    if base is str:
        if value == "":
            return [Problem(name, shown, f"expected {expected}")]
        if meta["choices"] and value not in meta["choices"]:
            hint = _suggest(value, meta["choices"])
            return [Problem(name, shown, f"expected {expected}{hint}")]
        if meta["pattern"] is not None and not meta["pattern"].fullmatch(value):
            return [Problem(name, shown, f"expected {expected}")]
    if base is tuple:
        if not value:
            return [Problem(name, value, f"expected {expected}")]
        out = []
        for i, item in enumerate(value):
            if meta["pattern"] is not None and not meta["pattern"].fullmatch(item):
                out.append(Problem(f"{name}[{i}]", item, f"expected {meta['pattern_text']}"))
        if len(set(value)) != len(value):
            dupes = sorted({v for v in value if value.count(v) > 1})
            out.append(Problem(name, value, f"expected each entry once, {show(dupes[0])} is repeated"))
        if out:
            return out
        if meta["check"] is not None:
            for i, item in enumerate(value):
                err = meta["check"](item)
                if err:
                    out.append(Problem(f"{name}[{i}]", item, f"expected {err}"))
            return out
        return []
    if meta["check"] is not None:
        err = meta["check"](value)
        if err:
            return [Problem(name, shown, f"expected {err}")]
    return []


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(word.lower(), [o.lower() for o in options], n=1, cutoff=0.6)
        close = [o for o in options if o.lower() in close]
    return f" (did you mean {show(close[0])}?)" if close else ""


def _host_port(value: str) -> str | None:
    """None when ``value`` is host:port with port 0-65535 (IPv6 as [::1]:9092)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "host:port with a port number 0-65535, e.g. \"127.0.0.1:9092\""
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return "host:port; write IPv6 addresses in brackets, e.g. \"[::1]:9092\""
    return None


def _topic_name(value: str) -> str | None:
    if value in (".", ".."):
        return "a Kafka topic name other than \".\" or \"..\""
    return None


_TOPIC = dict(pattern=TOPIC_NAME, pattern_text="a Kafka topic name: 1-249 characters of a-z A-Z 0-9 . _ -",
              check=_topic_name)


class _Section:
    """Checks shared by every settings section (run on construction)."""

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems = self._field_problems() + self._cross_problems()
        if problems:
            raise _invalid(problems)

    def _field_problems(self) -> list[Problem]:
        hints = typing.get_type_hints(type(self))
        problems: list[Problem] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            problems += _field_problems(self.SECTION, f, hints[f.name], getattr(self, f.name))
        return problems

    def _cross_problems(self) -> list[Problem]:
        return []


def _field_problems(section: str, f: dataclasses.Field, hint: Any, value: Any) -> list[Problem]:
    """Type and range problems of one field's value."""
    base, optional = _kind(hint)
    name = f"{section}.{f.name}"
    if value is None:
        if optional:
            return []
        return [Problem(name, _NO_VALUE, f"expected {_expected(base, f.metadata)}", "is missing")]
    if not _isinstance(value, base):
        return [Problem(name, MASK if f.metadata.get("secret") else value,
                        f"expected {_expected(base, f.metadata)}, got {_type_name(value)}", "has the wrong type")]
    return _check_value(name, value, base, f.metadata)


def _isinstance(value: Any, base: type) -> bool:
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, base)


# ---- sections --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KafkaSettings(_Section):
    SECTION: typing.ClassVar[str] = "kafka"

    bootstrap_servers: tuple[str, ...] = _key(("127.0.0.1:9092",), check=_host_port)
    client_id: str = _key("failoverd")
    group_id: str = _key("failoverd")
    group_instance_id: str | None = _key(None)
    session_timeout_ms: int = _key(10000, min=1)
    heartbeat_interval_ms: int = _key(3000, min=1)
    security_protocol: str = _key("PLAINTEXT", choices=SECURITY_PROTOCOLS)
    sasl_mechanism: str | None = _key(None, choices=SASL_MECHANISMS)
    sasl_plain_username: str | None = _key(None)
    sasl_plain_password: str | None = _key(None, secret=True)
    sasl_kerberos_service_name: str = _key("kafka")
    ssl_cafile: str | None = _key(None, path=True)
    ssl_certfile: str | None = _key(None, path=True)
    ssl_keyfile: str | None = _key(None, path=True)
    ssl_password: str | None = _key(None, secret=True)
    request_timeout_ms: int = _key(40000, min=1)

    def _cross_problems(self) -> list[Problem]:
        out = []
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            out.append(Problem("kafka.heartbeat_interval_ms", self.heartbeat_interval_ms,
                               f"expected less than kafka.session_timeout_ms ({self.session_timeout_ms}); "
                               "Kafka recommends at most a third of it"))
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            out.append(Problem("kafka.sasl_mechanism", _NO_VALUE,
                               f"expected one of {', '.join(SASL_MECHANISMS)} because "
                               f"kafka.security_protocol = {show(self.security_protocol)}", "is missing"))
        if not sasl and self.sasl_mechanism is not None:
            out.append(Problem("kafka.sasl_mechanism", self.sasl_mechanism,
                               f"is only used with SASL; set kafka.security_protocol to SASL_PLAINTEXT or "
                               f"SASL_SSL (it is {show(self.security_protocol)}) or remove the key", "is ignored"))
        if sasl and self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            for key in ("sasl_plain_username", "sasl_plain_password"):
                if getattr(self, key) is None:
                    out.append(Problem(f"kafka.{key}", _NO_VALUE,
                                       f"expected a string because kafka.sasl_mechanism = {show(self.sasl_mechanism)}",
                                       "is missing"))
        return out

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's AIOKafkaConsumer, AIOKafkaProducer and AIOKafkaAdminClient."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "GSSAPI":
                kwargs["sasl_kerberos_service_name"] = self.sasl_kerberos_service_name
            else:
                if self.sasl_plain_username is not None:
                    kwargs["sasl_plain_username"] = self.sasl_plain_username
                if self.sasl_plain_password is not None:
                    kwargs["sasl_plain_password"] = self.sasl_plain_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def ssl_context(self):
        """An ``ssl.SSLContext`` from the ssl_* keys (aiokafka.helpers.create_ssl_context)."""
        from aiokafka.helpers import create_ssl_context

        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, key)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"kafka.{key} = {show(value)} does not exist: expected a readable PEM file")
        try:
            return create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                      keyfile=self.ssl_keyfile, password=self.ssl_password)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"kafka.ssl_*: cannot build the TLS context from ssl_cafile={show(self.ssl_cafile)}, "
                              f"ssl_certfile={show(self.ssl_certfile)}, ssl_keyfile={show(self.ssl_keyfile)}: "
                              f"{exc}") from exc


@dataclasses.dataclass(frozen=True)
class AppSettings(_Section):
    SECTION: typing.ClassVar[str] = "app"

    name: str = _key("failoverd", pattern=APP_NAME, pattern_text="a name of letters, digits, '.', '_' or '-'")


@dataclasses.dataclass(frozen=True)
class InputsSettings(_Section):
    SECTION: typing.ClassVar[str] = "inputs"

    topics: tuple[str, ...] = _key(example=["model-input"], **_TOPIC)


@dataclasses.dataclass(frozen=True)
class OutputSettings(_Section):
    SECTION: typing.ClassVar[str] = "output"

    topic: str = _key(example="model-output", **_TOPIC)


@dataclasses.dataclass(frozen=True)
class DeadLetterSettings(_Section):
    SECTION: typing.ClassVar[str] = "dead_letter"

    topic: str = _key(example="model-dlq", **_TOPIC)
    max_value_bytes: int = _key(1048576, min=1)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(_Section):
    SECTION: typing.ClassVar[str] = "checkpoint"

    interval_ms: int = _key(100, min=1)
    interval_records: int = _key(10000, min=1)
    topic: str = _key("failoverd-checkpoints", **_TOPIC)
    exactly_once: bool = _key(True)


@dataclasses.dataclass(frozen=True)
class StateSettings(_Section):
    SECTION: typing.ClassVar[str] = "state"

    directory: Path = _key(Path(".local/state"))
    changelog_topic: str = _key("failoverd-changelog", **_TOPIC)


@dataclasses.dataclass(frozen=True)
class RegistrySettings(_Section):
    SECTION: typing.ClassVar[str] = "registry"

    path: Path = _key(Path(".local/registry"))
    control_topic: str = _key("failoverd-control", **_TOPIC)
    # Zip-bomb limits of a bundle archive (daemon.bundle.archive.Limits): total unpacked bytes and
    # member count its manifest may declare; the CLI reads the same FAILOVERD_REGISTRY__* variables.
    bundle_max_unpacked_bytes: int = _key(4 << 30, min=1)
    bundle_max_members: int = _key(100_000, min=2)


def _passthrough_name(name: str) -> str | None:
    if name.upper().startswith(ENV_PREFIX):
        return (f"a variable that is not the daemon's own ({name} starts with {ENV_PREFIX}: its configuration "
                "and secrets never reach a model); give the model its own variable")
    return None


@dataclasses.dataclass(frozen=True)
class WorkerSettings(_Section):
    SECTION: typing.ClassVar[str] = "worker"

    mode: str = _key("subprocess", choices=("subprocess", "inprocess"))
    predict_timeout_ms: int = _key(5000, min=1)
    start_timeout_ms: int = _key(60000, min=1)
    max_batch_records: int = _key(1000, min=1)
    # The release boundary (docs/architecture.md "Trust boundary"): the largest frame a worker may
    # send, what of the daemon's environment it sees besides the allowlist, and its resource limits
    # (0 = no limit; applied with setrlimit in the worker before the model loads).
    max_frame_bytes: int = _key(256 << 20, min=1024, max=(1 << 32) - 1)
    env_passthrough: tuple[str, ...] | None = _key(None, pattern=ENV_NAME, pattern_text="an environment variable name",
                                                   check=_passthrough_name)
    memory_mb: int = _key(4096, min=0)
    max_open_files: int = _key(1024, min=0)
    max_processes: int = _key(0, min=0)

    def _cross_problems(self) -> list[Problem]:
        if 0 < self.max_open_files < 16:
            return [Problem("worker.max_open_files", self.max_open_files,
                            "expected 0 (no limit) or at least 16: the worker itself needs a few descriptors")]
        return []


@dataclasses.dataclass(frozen=True)
class FailoverSettings(_Section):
    SECTION: typing.ClassVar[str] = "failover"

    standby_mode: str = _key("warm", choices=("hot", "warm", "cold"))
    cooldown_ms: int = _key(5000, min=0)
    max_failovers: int = _key(3, min=1)
    window_ms: int = _key(600000, min=1)
    error_rate_threshold: float = _key(0.5, gt=0, max=1)
    error_window: int = _key(200, min=1)
    min_samples: int = _key(20, min=1)
    latency_p99_slo_ms: int = _key(2000, min=1)
    output_invalid_rate_threshold: float = _key(0.5, gt=0, max=1)
    failback: bool = _key(False)
    failback_delay_ms: int = _key(60000, min=0)
    # Poison records: a batch dead-letters at most this many records that fail on their own
    # (model_exception) before it fails as a whole and counts against the release (0: no isolation).
    isolate_max_records: int = _key(10, min=0)
    isolate_max_fraction: float = _key(0.1, gt=0, max=1)

    def _cross_problems(self) -> list[Problem]:
        if self.min_samples > self.error_window:
            return [Problem("failover.min_samples", self.min_samples,
                            f"expected at most failover.error_window ({self.error_window}): the window never "
                            "holds more samples than that, so failover on error rate could never trigger")]
        return []


@dataclasses.dataclass(frozen=True)
class AdminSettings(_Section):
    SECTION: typing.ClassVar[str] = "admin"

    bind: str = _key("127.0.0.1:8080", check=_host_port)
    token_file: Path | None = _key(None)
    token_env: str | None = _key(None, pattern=ENV_NAME, pattern_text="an environment variable name")

    def _cross_problems(self) -> list[Problem]:
        if self.token_file is not None and self.token_env is not None:
            return [Problem("admin.token_env", self.token_env,
                            "expected only one of admin.token_file and admin.token_env to be set")]
        return []


@dataclasses.dataclass(frozen=True)
class MetricsSettings(_Section):
    SECTION: typing.ClassVar[str] = "metrics"

    port: int = _key(9464, min=0, max=65535)


SECTIONS: dict[str, type[_Section]] = {
    "kafka": KafkaSettings,
    "app": AppSettings,
    "inputs": InputsSettings,
    "output": OutputSettings,
    "dead_letter": DeadLetterSettings,
    "checkpoint": CheckpointSettings,
    "state": StateSettings,
    "registry": RegistrySettings,
    "worker": WorkerSettings,
    "failover": FailoverSettings,
    "admin": AdminSettings,
    "metrics": MetricsSettings,
}


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
    env_overrides: tuple[str, ...] = ()  # names of the FAILOVERD_* variables that were applied

    def __post_init__(self) -> None:
        problems = _topic_role_problems(self)
        if problems:
            raise _invalid(problems, str(self.source) if self.source else "")

    def topics_by_role(self) -> dict[str, tuple[str, ...]]:
        """Every topic the daemon uses, by role (the roles of config/topics.toml)."""
        return {
            "input": self.inputs.topics,
            "output": (self.output.topic,),
            "dead_letter": (self.dead_letter.topic,),
            "changelog": (self.state.changelog_topic,),
            "checkpoint": (self.checkpoint.topic,),
            "control": (self.registry.control_topic,),
        }

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
        return out


# Which settings keys name topics, by role (used to check that no topic has two roles).
_TOPIC_FIELDS = (
    ("inputs.topics", "input"),
    ("output.topic", "output"),
    ("dead_letter.topic", "dead_letter"),
    ("state.changelog_topic", "changelog"),
    ("checkpoint.topic", "checkpoint"),
    ("registry.control_topic", "control"),
)


def _topic_role_problems(settings: Settings) -> list[Problem]:
    seen: dict[str, str] = {}
    problems = []
    for path, _role in _TOPIC_FIELDS:
        section, key = path.split(".")
        value = getattr(getattr(settings, section), key)
        for topic in value if isinstance(value, tuple) else (value,):
            if topic in seen and seen[topic] != path:
                problems.append(Problem(path, topic, f"expected a topic of its own: {show(topic)} is already "
                                                     f"{seen[topic]}; each topic has exactly one role"))
            seen.setdefault(topic, path)
    return problems


# ---- loading ---------------------------------------------------------------------------------

def env_var(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}{section.upper()}{ENV_SEPARATOR}{key.upper()}"


def load(path: str | Path, env: Mapping[str, str] = os.environ) -> Settings:
    """Read, override from ``env`` and validate one configuration file."""
    path = Path(path)
    shown = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: configuration file not found (working directory {Path.cwd()}); "
                          "pass the path of an existing file, e.g. config/failoverd.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, expected a TOML configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not valid UTF-8 at byte {exc.start}; TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from None
    return parse(data, env=env, source=path.absolute(), where=shown)


def parse(data: Mapping[str, Any], *, env: Mapping[str, str] = os.environ, source: Path | None = None,
          where: str | None = None) -> Settings:
    """Build :class:`Settings` from already-parsed TOML data (``load`` without the file)."""
    where = where if where is not None else (str(source) if source else "<config>")
    problems: list[tuple[Problem, str]] = []  # (problem, origin note)

    def report(problem: Problem, origin: str = "") -> None:
        problems.append((problem, origin))

    # 1. unknown sections and keys, sections that are not tables
    tables: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            report(Problem(f"[{name}]", _NO_VALUE, _unknown_help(name, SECTIONS, "section", "[", "]"),
                           "is an unknown section"))
        elif not isinstance(value, dict):
            report(Problem(name, value, f"expected a table ([{name}]), got {_type_name(value)}", "has the wrong type"))
        else:
            tables[name] = dict(value)
            keys = [f.name for f in dataclasses.fields(SECTIONS[name])]
            for key in value:
                if key not in keys:
                    report(Problem(f"{name}.{key}", _NO_VALUE, _unknown_help(key, keys, f"key of [{name}]"),
                                   "is an unknown key"))

    # 2. environment overrides: FAILOVERD_<SECTION>__<KEY>
    overrides: dict[tuple[str, str], tuple[str, str]] = {}  # (section, key) -> (variable, text)
    env_sections = {s.upper(): s for s in SECTIONS}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or ENV_SEPARATOR not in var[len(ENV_PREFIX):]:
            continue
        sec_part, _, key_part = var[len(ENV_PREFIX):].partition(ENV_SEPARATOR)
        section = env_sections.get(sec_part)
        if section is None:
            close = difflib.get_close_matches(sec_part, list(env_sections), n=1, cutoff=0.6)
            hint = (f"did you mean {ENV_PREFIX}{close[0]}{ENV_SEPARATOR}{key_part}?" if close else
                    f"overrides are {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>, sections: {', '.join(SECTIONS)}")
            report(Problem(f"environment variable {var}", _NO_VALUE,
                           f"there is no section [{sec_part.lower()}]; {hint}", "is unknown"))
            continue
        keys = {f.name.upper(): f.name for f in dataclasses.fields(SECTIONS[section])}
        key = keys.get(key_part)
        if key is None:
            close = difflib.get_close_matches(key_part, list(keys), n=1, cutoff=0.6)
            hint = (f"did you mean {env_var(section, close[0])}?" if close else
                    f"keys of [{section}] are: {', '.join(keys.values())}")
            report(Problem(f"environment variable {var}", _NO_VALUE,
                           f"[{section}] has no key {key_part.lower()}; {hint}", "is unknown"))
            continue
        overrides[(section, key)] = (var, env[var])

    # 3. typed values per section, then section checks
    built: dict[str, _Section] = {}
    origins: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        table = tables.get(name, {})
        kwargs: dict[str, Any] = {}
        complete = True
        first_problem = len(problems)
        for f in dataclasses.fields(cls):
            field_path = f"{name}.{f.name}"
            base, optional = _kind(hints[f.name])
            if (name, f.name) in overrides:
                var, text = overrides[(name, f.name)]
                origin = f" (from environment variable {var})"
                origins[field_path] = origin
                value, problem = _from_env(field_path, text, base, optional, f.metadata)
            elif f.name in table:
                origin = ""
                value, problem = _from_toml(field_path, table[f.name], base, optional, f.metadata)
            else:
                if isinstance(f.default, Path):  # relative default paths resolve at load time too
                    kwargs[f.name] = _resolve(str(f.default))
                if f.default is dataclasses.MISSING:
                    example = f.metadata.get("example")
                    report(Problem(field_path, _NO_VALUE,
                                   f"expected {_expected(base, f.metadata)}, e.g. {f.name} = {show(example)} "
                                   f"under [{name}] (or set {env_var(name, f.name)})", "is missing"))
                    complete = False
                continue
            if problem is not None:
                report(problem, origin)
                complete = False
                continue
            if value is None and not optional:
                continue  # the default applies
            field_problems = _field_problems(name, f, hints[f.name], value)
            for p in field_problems:
                report(p, origin)
            complete = complete and not field_problems
            kwargs[f.name] = value
        if not complete:
            # Every problem at once: the cross-field checks still run on the keys that are valid.
            bad = {p.field.split("[")[0] for p, _ in problems[first_problem:]}
            for p in _partial_cross_problems(cls, kwargs, bad):
                report(p, origins.get(p.field.split("[")[0], ""))
            continue
        try:
            built[name] = cls(**kwargs)
        except ConfigError as exc:
            for p in exc.problems:  # type: ignore[attr-defined]
                report(p, origins.get(p.field.split("[")[0], ""))
    if problems:
        if all(path.split(".")[0] in built for path, _ in _TOPIC_FIELDS):  # topic roles are checkable too
            for p in _topic_role_problems(types.SimpleNamespace(**built)):  # type: ignore[arg-type]
                report(p, origins.get(p.field.split("[")[0], ""))
        raise ConfigError("\n".join(f"{where}: {p.render(origin)}" for p, origin in problems))
    try:
        return Settings(source=source, env_overrides=tuple(var for var, _ in overrides.values()), **built)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{where}: {p.render(origins.get(p.field.split('[')[0], ''))}"
                                    for p in exc.problems)) from None  # type: ignore[attr-defined]


def _partial_cross_problems(cls: type[_Section], kwargs: dict[str, Any], bad: set[str]) -> list[Problem]:
    """The cross-field problems of a section some of whose keys are invalid (``bad``: their paths).

    Invalid keys take their defaults; a problem on an invalid key, or whose message names one (the
    check then compared against a value the user did not write), is left out.
    """
    section = object.__new__(cls)  # no __post_init__: the field checks already reported
    for f in dataclasses.fields(cls):
        path = f"{cls.SECTION}.{f.name}"
        if f.name in kwargs and path not in bad:
            value = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(section, f.name, value)
    try:
        found = section._cross_problems()
    except Exception:  # a check that cannot run on a partial section says nothing
        return []
    return [p for p in found if p.field.split("[")[0] not in bad and not any(b in p.render() for b in bad)]


def _unknown_help(word: str, options: typing.Iterable[str], what: str, pre: str = "", post: str = "") -> str:
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {pre}{close[0]}{post}?"
    return f"valid {what}s are: {', '.join(options)}" if len(options) <= 20 else f"not a valid {what}"


def _resolve(value: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(value)))


def _from_toml(path: str, value: Any, base: type, optional: bool, meta: Mapping[str, Any]) -> tuple[Any, Problem | None]:
    """A TOML value converted to the field's type, or the problem with it."""
    shown = MASK if meta["secret"] else value

    def wrong() -> tuple[None, Problem]:
        return None, Problem(path, shown, f"expected {_expected(base, meta)}, got {_type_name(value)}",
                             "has the wrong type")

    if base is bool:
        return (value, None) if isinstance(value, bool) else wrong()
    if base is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else wrong()
    if base is float:
        return (float(value), None) if isinstance(value, (int, float)) and not isinstance(value, bool) else wrong()
    if base is tuple:
        if isinstance(value, str):
            return _split(path, value, meta)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value), None
        return wrong()
    if not isinstance(value, str):
        return wrong()
    if optional and value == "":
        return None, None
    if base is Path or meta["path"]:
        if value == "":
            return None, Problem(path, value, f"expected {_expected(base, meta)}")
        resolved = _resolve(value)
        return (resolved if base is Path else str(resolved)), None
    return value, None


def _split(path: str, text: str, meta: Mapping[str, Any]) -> tuple[Any, Problem | None]:
    items = [item.strip() for item in text.split(",")]
    if text.strip() and any(not item for item in items):
        return None, Problem(path, text, "expected comma-separated non-empty entries, e.g. \"a,b\"")
    return tuple(item for item in items if item), None


def _from_env(path: str, text: str, base: type, optional: bool, meta: Mapping[str, Any]) -> tuple[Any, Problem | None]:
    """An environment variable's text converted to the field's type, or the problem with it."""
    shown = MASK if meta["secret"] else text
    stripped = text.strip()
    if optional and stripped == "":
        return None, None
    try:
        if base is bool:
            lowered = stripped.lower()
            if lowered in ("true", "1"):
                return True, None
            if lowered in ("false", "0"):
                return False, None
            return None, Problem(path, shown, "expected true, false, 1 or 0")
        if base is int:
            return int(stripped), None
        if base is float:
            return float(stripped), None
    except ValueError:
        return None, Problem(path, shown, f"expected {_expected(base, meta)}")
    if base is tuple:
        return _split(path, text, meta)
    return _from_toml(path, text, base, optional, meta)
