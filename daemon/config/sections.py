"""The sections of the configuration file, one frozen dataclass each, and :data:`SECTIONS`.

A field's annotation says how its value is parsed and :func:`~daemon.config.fields.key` which
values are valid; ``_cross_problems`` checks keys against each other. docs/configuration.md lists
every key (tests/unit/test_docs.py keeps the two in step).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import ssl
import typing
from pathlib import Path
from typing import Any

from daemon.config.fields import (
    APP_NAME, ENV_NAME, ENV_PREFIX, MASK, NO_VALUE, SASL_MECHANISMS, SECURITY_PROTOCOLS, TOPIC, Problem, Section,
    host_port, key, show,
)
from daemon.errors import ConfigError

FORMATS = ("json", "avro")
"""``[inputs] format`` / ``[output] format`` (daemon.formats.FORMATS)."""
SR_LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE",
             "REGISTRY")
"""``[schema_registry] compatibility`` (daemon.formats.compat.LEVELS)."""
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PASSWORD_KEYS = ("sasl_plain_username", "sasl_plain_password", "sasl_plain_password_file")
OAUTH_KEYS = ("sasl_oauth_token_file", "sasl_oauth_token_command")
COMPRESSIONS = ("zstd", "lz4", "snappy", "gzip", "none")
"""``[output] compression``: aiokafka's codecs; all but gzip and none need the package cramjam."""
PRODUCER_MAX_REQUEST_BYTES = 1048576
"""aiokafka's ``max_request_size`` (the engine's producers keep it): no batch may be larger."""


@dataclasses.dataclass(frozen=True)
class KafkaSettings(Section):
    SECTION: typing.ClassVar[str] = "kafka"

    bootstrap_servers: tuple[str, ...] = key(("127.0.0.1:9092",), check=host_port)
    client_id: str = key("failoverd")
    group_id: str = key("failoverd")
    group_instance_id: str | None = key(None)
    session_timeout_ms: int = key(10000, min=1)
    heartbeat_interval_ms: int = key(3000, min=1)
    security_protocol: str = key("PLAINTEXT", choices=SECURITY_PROTOCOLS)
    sasl_mechanism: str | None = key(None, choices=SASL_MECHANISMS)
    sasl_plain_username: str | None = key(None)
    sasl_plain_password: str | None = key(None, secret=True)
    sasl_kerberos_service_name: str = key("kafka")
    ssl_cafile: str | None = key(None, path=True)
    ssl_certfile: str | None = key(None, path=True)
    ssl_keyfile: str | None = key(None, path=True)
    ssl_password: str | None = key(None, secret=True)
    request_timeout_ms: int = key(40000, min=1)
    metadata_max_age_ms: int = key(30000, min=1)
    # Credentials kept out of the file (daemon/kafka_auth.py): the password read from a file (a
    # mounted Secret) when the clients are built; an OAUTHBEARER token from a file (read at every
    # connection) or from a command's output (run again when the token nears its expiry).
    sasl_plain_password_file: str | None = key(None, path=True)
    sasl_oauth_token_file: str | None = key(None, path=True)
    sasl_oauth_token_command: str | None = key(None)

    def _cross_problems(self) -> list[Problem]:
        out: list[Problem] = []
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            out.append(Problem("kafka.heartbeat_interval_ms", self.heartbeat_interval_ms,
                               f"expected less than kafka.session_timeout_ms ({self.session_timeout_ms}); "
                               "Kafka recommends at most a third of it"))
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and self.sasl_mechanism is None:
            out.append(Problem("kafka.sasl_mechanism", NO_VALUE,
                               f"expected one of {', '.join(SASL_MECHANISMS)} because "
                               f"kafka.security_protocol = {show(self.security_protocol)}", "is missing"))
        if not sasl and self.sasl_mechanism is not None:
            out.append(Problem("kafka.sasl_mechanism", self.sasl_mechanism,
                               f"is only used with SASL; set kafka.security_protocol to SASL_PLAINTEXT or "
                               f"SASL_SSL (it is {show(self.security_protocol)}) or remove the key", "is ignored"))
        return out + self._credential_problems(sasl) + self._tls_problems()

    def _credential_problems(self, sasl: bool) -> list[Problem]:
        """Credentials that are missing for the mechanism, or set and never used (a wrong guess of
        what the cluster needs: refused rather than silently ignored)."""
        out: list[Problem] = []
        mechanism = self.sasl_mechanism if sasl else None
        because = f"because kafka.sasl_mechanism = {show(mechanism)}"
        if mechanism in PASSWORD_MECHANISMS:
            if self.sasl_plain_username is None:
                out.append(Problem("kafka.sasl_plain_username", NO_VALUE, f"expected a string {because}",
                                   "is missing"))
            if self.sasl_plain_password is None and self.sasl_plain_password_file is None:
                out.append(Problem("kafka.sasl_plain_password", NO_VALUE,
                                   f"expected the password {because}: set kafka.sasl_plain_password_file (a file "
                                   f"holding it) or FAILOVERD_KAFKA__SASL_PLAIN_PASSWORD", "is missing"))
            elif self.sasl_plain_password is not None and self.sasl_plain_password_file is not None:
                out.append(Problem("kafka.sasl_plain_password_file", self.sasl_plain_password_file,
                                   "expected only one of kafka.sasl_plain_password and kafka.sasl_plain_password_file "
                                   "to be set; remove one"))
        if mechanism == "OAUTHBEARER":
            token_keys = [k for k in ("sasl_oauth_token_file", "sasl_oauth_token_command") if getattr(self, k)]
            if not token_keys:
                out.append(Problem("kafka.sasl_oauth_token_file", NO_VALUE,
                                   f"expected a token source {because}: set kafka.sasl_oauth_token_file (a file "
                                   "holding the token) or kafka.sasl_oauth_token_command (a command printing it)",
                                   "is missing"))
            elif len(token_keys) > 1:
                out.append(Problem("kafka.sasl_oauth_token_command", self.sasl_oauth_token_command,
                                   "expected only one of kafka.sasl_oauth_token_file and "
                                   "kafka.sasl_oauth_token_command to be set; remove one"))
            elif self.sasl_oauth_token_command is not None:
                try:
                    if not shlex.split(self.sasl_oauth_token_command):
                        raise ValueError("empty")
                except ValueError:
                    out.append(Problem("kafka.sasl_oauth_token_command", self.sasl_oauth_token_command,
                                       "expected a command line (program and arguments, shell quoting; no shell "
                                       "runs it)"))
        if mechanism == "GSSAPI" and importlib.util.find_spec("gssapi") is None:
            out.append(Problem("kafka.sasl_mechanism", mechanism,
                               "needs the Python package gssapi, which is not installed: pip install gssapi "
                               "(aiokafka's Kerberos support), or choose another mechanism", "cannot connect"))
        used = {"PLAIN": PASSWORD_KEYS, "SCRAM-SHA-256": PASSWORD_KEYS, "SCRAM-SHA-512": PASSWORD_KEYS,
                "OAUTHBEARER": OAUTH_KEYS}.get(mechanism or "", ())
        for name in PASSWORD_KEYS + OAUTH_KEYS:
            if name not in used and getattr(self, name) is not None:
                where = (f"kafka.sasl_mechanism = {show(mechanism)}" if mechanism else
                         f"kafka.security_protocol = {show(self.security_protocol)} (no SASL)")
                needs = ("PLAIN or SCRAM-SHA-256/512" if name in PASSWORD_KEYS else "OAUTHBEARER")
                out.append(Problem(f"kafka.{name}", MASK if name == "sasl_plain_password" else getattr(self, name),
                                   f"only kafka.sasl_mechanism {needs} uses it, and {where}; remove the key "
                                   "or fix the mechanism", "is ignored"))
        return out

    def _tls_problems(self) -> list[Problem]:
        out: list[Problem] = []
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if not tls and getattr(self, name) is not None:
                out.append(Problem(f"kafka.{name}", getattr(self, name),
                                   f"only TLS uses it: set kafka.security_protocol to SSL or SASL_SSL (it is "
                                   f"{show(self.security_protocol)}: nothing would be encrypted) or remove the key",
                                   "is ignored"))
        if tls and self.ssl_keyfile is not None and self.ssl_certfile is None:
            out.append(Problem("kafka.ssl_certfile", NO_VALUE, "expected the client certificate (PEM) that "
                                                               "kafka.ssl_keyfile is the key of", "is missing"))
        return out

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's AIOKafkaConsumer, AIOKafkaProducer and AIOKafkaAdminClient.

        Built once per settings object and copied on each call, so every client shares one TLS
        context and one OAUTHBEARER token provider (one token, refreshed once, for all connections);
        a password file is read on the first call (a rotated password takes a restart)."""
        cached: dict[str, Any] | None = self.__dict__.get("_client_kwargs")
        if cached is None:
            cached = self._build_client_kwargs()
            object.__setattr__(self, "_client_kwargs", cached)  # not a field: eq, hash and repr ignore it
        return dict(cached)

    def _build_client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        if self.security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_mechanism == "GSSAPI":
                kwargs["sasl_kerberos_service_name"] = self.sasl_kerberos_service_name
            elif self.sasl_mechanism == "OAUTHBEARER":
                from daemon.kafka_auth import token_provider

                kwargs["sasl_oauth_token_provider"] = token_provider(self.sasl_oauth_token_file,
                                                                     self.sasl_oauth_token_command)
            else:
                if self.sasl_plain_username is not None:
                    kwargs["sasl_plain_username"] = self.sasl_plain_username
                if self.sasl_plain_password is not None:
                    kwargs["sasl_plain_password"] = self.sasl_plain_password
                elif self.sasl_plain_password_file is not None:
                    from daemon.kafka_auth import read_secret

                    kwargs["sasl_plain_password"] = read_secret("kafka.sasl_plain_password_file",
                                                                self.sasl_plain_password_file)
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` from the ssl_* keys (aiokafka.helpers.create_ssl_context)."""
        from aiokafka.helpers import create_ssl_context

        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"kafka.{name} = {show(value)} does not exist: expected a readable PEM file")
        try:
            context: ssl.SSLContext = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                                         keyfile=self.ssl_keyfile, password=self.ssl_password)
            return context
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"kafka.ssl_*: cannot build the TLS context from ssl_cafile={show(self.ssl_cafile)}, "
                              f"ssl_certfile={show(self.ssl_certfile)}, ssl_keyfile={show(self.ssl_keyfile)}: "
                              f"{exc}") from exc


@dataclasses.dataclass(frozen=True)
class AppSettings(Section):
    SECTION: typing.ClassVar[str] = "app"

    name: str = key("failoverd", pattern=APP_NAME, pattern_text="a name of letters, digits, '.', '_' or '-'")


@dataclasses.dataclass(frozen=True)
class InputsSettings(Section):
    SECTION: typing.ClassVar[str] = "inputs"

    topics: tuple[str, ...] = key(example=["model-input"], **TOPIC)
    format: str = key("json", choices=FORMATS)  # avro: Confluent wire format, needs [schema_registry] url


@dataclasses.dataclass(frozen=True)
class OutputSettings(Section):
    SECTION: typing.ClassVar[str] = "output"

    topic: str = key(example="model-output", **TOPIC)
    format: str = key("json", choices=FORMATS)  # avro: registered under "<topic>-value" (daemon/formats/avro.py)
    # Every producer the daemon builds (daemon/clients.py), for outputs, dead letters, changelog
    # and checkpoints alike. zstd: the best ratio of Kafka's codecs at a CPU cost far below a model's
    # (JSON predictions shrink 3-10x per batch), readable by every client since Kafka 2.1.
    compression: str = key("zstd", choices=COMPRESSIONS)
    acks: str = key("all", choices=("all", "1"))  # "1": the leader alone; at-least-once only
    linger_ms: int = key(10, min=0, max=60000)
    batch_size: int = key(524288, min=1024, max=PRODUCER_MAX_REQUEST_BYTES)  # capped by the topics' max.message.bytes

    def _cross_problems(self) -> list[Problem]:
        if self.compression in ("snappy", "lz4", "zstd") and importlib.util.find_spec("cramjam") is None:
            return [Problem("output.compression", self.compression,
                            "needs the Python package cramjam (aiokafka's snappy, lz4 and zstd codecs), which is not "
                            "installed: pip install cramjam, or set output.compression = \"gzip\" or \"none\"",
                            "cannot be used")]
        return []

    def producer_kwargs(self) -> dict[str, Any]:
        """aiokafka producer kwargs of these settings (daemon.clients applies them)."""
        return {
            "compression_type": None if self.compression == "none" else self.compression,
            "acks": "all" if self.acks == "all" else 1,
            "enable_idempotence": self.acks == "all",  # aiokafka: idempotence requires acks=all
            "linger_ms": self.linger_ms,
            "max_batch_size": self.batch_size,
        }


@dataclasses.dataclass(frozen=True)
class DeadLetterSettings(Section):
    SECTION: typing.ClassVar[str] = "dead_letter"

    topic: str = key(example="model-dlq", **TOPIC)
    max_value_bytes: int = key(1048576, min=1)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(Section):
    SECTION: typing.ClassVar[str] = "checkpoint"

    interval_ms: int = key(100, min=1)
    interval_records: int = key(10000, min=1)
    topic: str = key("failoverd-checkpoints", **TOPIC)
    exactly_once: bool = key(True)


@dataclasses.dataclass(frozen=True)
class StateSettings(Section):
    SECTION: typing.ClassVar[str] = "state"

    directory: Path = key(Path(".local/state"))
    changelog_topic: str = key("failoverd-changelog", **TOPIC)


@dataclasses.dataclass(frozen=True)
class RegistrySettings(Section):
    SECTION: typing.ClassVar[str] = "registry"

    path: Path = key(Path(".local/registry"))
    control_topic: str = key("failoverd-control", **TOPIC)
    # Zip-bomb limits of a bundle archive (daemon.bundle.archive.Limits): total unpacked bytes and
    # member count its manifest may declare; the CLI reads the same FAILOVERD_REGISTRY__* variables.
    bundle_max_unpacked_bytes: int = key(4 << 30, min=1)
    bundle_max_members: int = key(100_000, min=2)
    # Fetching bundles by digest from other instances (daemon/distribution, docs/operations.md#three-hosts):
    # this instance's admin URL as peers reach it (default http://<admin.bind>), peers to try after the
    # holders named by release events, the token GET /bundles also accepts (and sends to peers), and an
    # fsspec URL of an object store keyed by digest (optional extra `failoverd[objectstore]`).
    advertise_url: str | None = key(None, pattern=re.compile(r"https?://\S+"), pattern_text="an http(s):// URL")
    peers: tuple[str, ...] | None = key(None, pattern=re.compile(r"https?://\S+"), pattern_text="an http(s):// URL")
    read_token_file: Path | None = key(None)
    fetch_timeout_ms: int = key(60000, min=1)
    bundle_store: str | None = key(None)


def _passthrough_name(name: str) -> str | None:
    if name.upper().startswith(ENV_PREFIX):
        return (f"a variable that is not the daemon's own ({name} starts with {ENV_PREFIX}: its configuration "
                "and secrets never reach a model); give the model its own variable")
    return None


@dataclasses.dataclass(frozen=True)
class WorkerSettings(Section):
    SECTION: typing.ClassVar[str] = "worker"

    mode: str = key("subprocess", choices=("subprocess", "inprocess"))
    predict_timeout_ms: int = key(5000, min=1)
    start_timeout_ms: int = key(60000, min=1)
    max_batch_records: int = key(1000, min=1)
    processes: int = key(1, min=1, max=64)  # model processes per release, keys spread by hash (daemon.engine.pool)
    # The release boundary (docs/architecture.md "Trust boundary"): the largest frame a worker may
    # send, what of the daemon's environment it sees besides the allowlist, and its resource limits
    # (0 = no limit; applied with setrlimit in the worker before the model loads).
    max_frame_bytes: int = key(256 << 20, min=1024, max=(1 << 32) - 1)
    env_passthrough: tuple[str, ...] | None = key(None, pattern=ENV_NAME, pattern_text="an environment variable name",
                                                   check=_passthrough_name)
    memory_mb: int = key(4096, min=0)
    max_open_files: int = key(1024, min=0)
    max_processes: int = key(0, min=0)

    def _cross_problems(self) -> list[Problem]:
        problems = []
        if 0 < self.max_open_files < 16:
            problems.append(Problem("worker.max_open_files", self.max_open_files,
                                    "expected 0 (no limit) or at least 16: the worker itself needs a few descriptors"))
        if self.processes > 1 and self.mode != "subprocess":
            problems.append(Problem("worker.processes", self.processes,
                                    f"expected 1 with worker.mode = \"{self.mode}\" (an in-process model runs in a "
                                    "thread of the daemon); fix: set worker.processes = 1, or worker.mode = "
                                    "\"subprocess\""))
        return problems


@dataclasses.dataclass(frozen=True)
class FailoverSettings(Section):
    SECTION: typing.ClassVar[str] = "failover"

    standby_mode: str = key("warm", choices=("hot", "warm", "cold"))
    cooldown_ms: int = key(5000, min=0)
    max_failovers: int = key(3, min=1)
    window_ms: int = key(600000, min=1)
    error_rate_threshold: float = key(0.5, gt=0, max=1)
    error_window: int = key(200, min=1)
    min_samples: int = key(20, min=1)
    latency_p99_slo_ms: int = key(2000, min=1)
    output_invalid_rate_threshold: float = key(0.5, gt=0, max=1)
    failback: bool = key(False)
    failback_delay_ms: int = key(60000, min=0)
    # Poison records: a batch dead-letters at most this many records that fail on their own
    # (model_exception) before it fails as a whole and counts against the release (0: no isolation).
    isolate_max_records: int = key(10, min=0)
    isolate_max_fraction: float = key(0.1, gt=0, max=1)

    def _cross_problems(self) -> list[Problem]:
        if self.min_samples > self.error_window:
            return [Problem("failover.min_samples", self.min_samples,
                            f"expected at most failover.error_window ({self.error_window}): the window never "
                            "holds more samples than that, so failover on error rate could never trigger")]
        return []


@dataclasses.dataclass(frozen=True)
class AdminSettings(Section):
    SECTION: typing.ClassVar[str] = "admin"

    bind: str = key("127.0.0.1:8080", check=host_port)
    token_file: Path | None = key(None)
    token_env: str | None = key(None, pattern=ENV_NAME, pattern_text="an environment variable name")

    def _cross_problems(self) -> list[Problem]:
        if self.token_file is not None and self.token_env is not None:
            return [Problem("admin.token_env", self.token_env,
                            "expected only one of admin.token_file and admin.token_env to be set")]
        return []


@dataclasses.dataclass(frozen=True)
class MetricsSettings(Section):
    SECTION: typing.ClassVar[str] = "metrics"

    port: int = key(9464, min=0, max=65535)


@dataclasses.dataclass(frozen=True)
class SchemaRegistrySettings(Section):
    """The Confluent-compatible Schema Registry of the avro format (daemon/formats/)."""

    SECTION: typing.ClassVar[str] = "schema_registry"

    url: str | None = key(None, pattern=re.compile(r"https?://\S+"), pattern_text="an http:// or https:// URL")
    username: str | None = key(None)
    password: str | None = key(None, secret=True)
    timeout_ms: int = key(5000, min=1)
    compatibility: str = key("BACKWARD", choices=SR_LEVELS)
    subject_policy: str = key("register", choices=("register", "lookup"))


def producer_problems(sections: Any) -> list[Problem]:
    """Exactly-once writes through transactions, which need every in-sync replica's acknowledgement."""
    if sections.checkpoint.exactly_once and sections.output.acks != "all":
        return [Problem("output.acks", sections.output.acks,
                        "expected \"all\" because checkpoint.exactly_once = true (transactions need every in-sync "
                        "replica's acknowledgement); set output.acks = \"all\", or checkpoint.exactly_once = false "
                        "for at-least-once", "cannot work")]
    return []


def format_problems(sections: Any) -> list[Problem]:
    """The avro format needs a schema registry (``sections``: a Settings)."""
    out = []
    for field, value in (("inputs.format", sections.inputs.format), ("output.format", sections.output.format)):
        if value == "avro" and not sections.schema_registry.url:
            out.append(Problem("schema_registry.url", NO_VALUE, f"expected the registry's Confluent-compatible API "
                                                                f"URL because {field} = \"avro\"", "is missing"))
            break
    return out


SECTIONS: dict[str, type[Section]] = {
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
    "schema_registry": SchemaRegistrySettings,
}

