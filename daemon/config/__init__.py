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

Each section is a frozen dataclass. A field's type annotation says how its value is parsed; its
metadata (see :func:`daemon.config.fields.key`) says which values are valid. The same checks run
when a section is built directly in code, so an invalid ``Settings`` cannot exist.

The package, in reading order: ``fields`` (what a key may hold, :class:`Problem`, "did you mean"),
``sections`` (one frozen dataclass per section), ``settings`` (:class:`Settings` and the topic
role table), ``loading`` (the file and the environment). Everything public is re-exported here.
"""

from daemon.config.fields import (
    APP_NAME, ENV_NAME, ENV_PREFIX, ENV_SEPARATOR, MASK, SASL_MECHANISMS, SECURITY_PROTOCOLS, TOPIC_NAME, Problem,
    closest, show,
)
from daemon.config.loading import env_var, load, parse
from daemon.config.sections import (
    SECTIONS, AdminSettings, AppSettings, CheckpointSettings, DeadLetterSettings, FailoverSettings, InputsSettings,
    KafkaSettings, MetricsSettings, OutputSettings, RegistrySettings, SchemaRegistrySettings, StateSettings,
    WorkerSettings,
)
from daemon.config.settings import TOPIC_ROLES, Settings, TopicRole

__all__ = [
    "APP_NAME", "ENV_NAME", "ENV_PREFIX", "ENV_SEPARATOR", "MASK", "SASL_MECHANISMS", "SECTIONS",
    "SECURITY_PROTOCOLS", "TOPIC_NAME", "TOPIC_ROLES", "AdminSettings", "AppSettings", "CheckpointSettings",
    "DeadLetterSettings", "FailoverSettings", "InputsSettings", "KafkaSettings", "MetricsSettings",
    "OutputSettings", "Problem", "RegistrySettings", "SchemaRegistrySettings", "Settings", "StateSettings",
    "TopicRole", "WorkerSettings",
    "closest", "env_var", "load", "parse", "show",
]
