"""daemon.config: loading, environment overrides, every kind of error, and `failoverd config check`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "failoverd.toml"

MINIMAL = """\
[inputs]
topics = ["in-a", "in-b"]

[output]
topic = "out"

[dead_letter]
topic = "dlq"
"""


def write(tmp_path: Path, text: str, name: str = "failoverd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, env=env or {})
    return str(info.value)


# ---- what loads -----------------------------------------------------------------------------

def test_minimal_file_gets_the_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = config.load(write(tmp_path, MINIMAL), env={})
    assert settings.source == tmp_path / "failoverd.toml"
    assert settings.inputs.topics == ("in-a", "in-b")
    assert settings.output.topic == "out"
    assert settings.kafka.bootstrap_servers == ("127.0.0.1:9092",)
    assert settings.kafka.group_instance_id is None
    assert settings.checkpoint.interval_ms == 100
    assert settings.checkpoint.exactly_once is True
    assert settings.failover.standby_mode == "warm"
    assert settings.failover.error_rate_threshold == 0.5
    assert settings.dead_letter.max_value_bytes == 1048576
    assert settings.metrics.port == 9464
    # relative default paths resolve against the working directory at load time
    assert settings.state.directory == tmp_path / ".local" / "state"
    assert settings.registry.path == tmp_path / ".local" / "registry"
    assert settings.admin.token_file is None


def test_example_config_loads_and_names_the_local_topics():
    settings = config.load(EXAMPLE, env={})
    assert settings.kafka.bootstrap_servers == ("127.0.0.1:9092",)
    assert settings.topics_by_role() == {
        "input": ("model-input",), "output": ("model-output",), "dead_letter": ("model-dlq",),
        "changelog": ("failoverd-changelog",), "checkpoint": ("failoverd-checkpoints",),
        "control": ("failoverd-control",),
    }


def test_example_config_mentions_every_key():
    """The example is complete: every key of every section appears (set or commented out)."""
    text = EXAMPLE.read_text()
    for section, cls in config.SECTIONS.items():
        assert f"[{section}]" in text
        for f in dataclasses.fields(cls):
            assert f"{f.name} =" in text, f"{section}.{f.name} missing from {EXAMPLE}"


def test_docs_describe_every_key():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    for section, cls in config.SECTIONS.items():
        assert f"### `[{section}]`" in docs or f"`[{section}]`" in docs, section
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in docs or f"| `{section}.{f.name}` |" in docs, f"{section}.{f.name}"


def test_bootstrap_servers_accepts_a_comma_separated_string(tmp_path):
    path = write(tmp_path, '[kafka]\nbootstrap_servers = "a:9092, b:9093"\n' + MINIMAL)
    assert config.load(path, env={}).kafka.bootstrap_servers == ("a:9092", "b:9093")


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write(tmp_path, MINIMAL + '[state]\ndirectory = "data/state"\n[admin]\ntoken_file = "../token"\n')
    settings = config.load(path, env={})
    assert settings.state.directory == work / "data" / "state"
    assert settings.admin.token_file == tmp_path / "token"


# ---- environment overrides ---------------------------------------------------------------------

def test_env_overrides_int_bool_list_str_float_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {
        "FAILOVERD_CHECKPOINT__INTERVAL_MS": "250",
        "FAILOVERD_CHECKPOINT__EXACTLY_ONCE": "false",
        "FAILOVERD_FAILOVER__FAILBACK": "1",
        "FAILOVERD_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
        "FAILOVERD_INPUTS__TOPICS": "x, y",
        "FAILOVERD_KAFKA__GROUP_ID": "grp",
        "FAILOVERD_FAILOVER__ERROR_RATE_THRESHOLD": "0.25",
        "FAILOVERD_STATE__DIRECTORY": "st",
        "FAILOVERD_HOME": "/not/an/override",  # no double underscore: not a config override
    }
    settings = config.load(write(tmp_path, MINIMAL), env=env)
    assert settings.checkpoint.interval_ms == 250
    assert settings.checkpoint.exactly_once is False
    assert settings.failover.failback is True
    assert settings.kafka.bootstrap_servers == ("k1:9092", "k2:9092")
    assert settings.inputs.topics == ("x", "y")
    assert settings.kafka.group_id == "grp"
    assert settings.failover.error_rate_threshold == 0.25
    assert settings.state.directory == tmp_path / "st"
    assert "FAILOVERD_CHECKPOINT__INTERVAL_MS" in settings.env_overrides


def test_env_supplies_a_required_key_and_empty_unsets_an_optional_one(tmp_path):
    text = MINIMAL.replace('[output]\ntopic = "out"\n', "") + '[kafka]\ngroup_instance_id = "i-1"\n'
    settings = config.load(write(tmp_path, text), env={"FAILOVERD_OUTPUT__TOPIC": "from-env",
                                                        "FAILOVERD_KAFKA__GROUP_INSTANCE_ID": ""})
    assert settings.output.topic == "from-env"
    assert settings.kafka.group_instance_id is None


# ---- errors: each names file, field, value and what was expected ---------------------------------

def test_missing_file(tmp_path):
    message = load_error(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in message
    assert "not found" in message


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, MINIMAL + "[checkpoint]\ninterval_ms = = 5\n")
    message = load_error(path)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 10" in message


def test_wrong_type(tmp_path):
    path = write(tmp_path, MINIMAL + '[checkpoint]\ninterval_ms = "100"\n')
    message = load_error(path)
    assert message == (f'{path}: checkpoint.interval_ms = "100" has the wrong type: '
                       "expected an integer >= 1, got a string")


def test_bool_is_not_an_integer(tmp_path):
    message = load_error(write(tmp_path, MINIMAL + "[metrics]\nport = true\n"))
    assert "metrics.port = true has the wrong type" in message


@pytest.mark.parametrize("section, line, expected", [
    ("checkpoint", "interval_ms = 0", "checkpoint.interval_ms = 0 is out of range: expected an integer >= 1"),
    ("metrics", "port = 70000", "metrics.port = 70000 is out of range: expected an integer >= 0 and <= 65535"),
    ("failover", "error_rate_threshold = 1.5",
     "failover.error_rate_threshold = 1.5 is out of range: expected a number > 0 and <= 1"),
    ("failover", 'standby_mode = "lukewarm"',
     'failover.standby_mode = "lukewarm" is invalid: expected one of hot, warm, cold'),
    ("worker", 'mode = "threads"', 'worker.mode = "threads" is invalid: expected one of subprocess, inprocess'),
    ("admin", 'bind = "localhost"', 'admin.bind = "localhost" is invalid: expected host:port with a port number'),
    ("admin", 'bind = "0.0.0.0:99999"', 'admin.bind = "0.0.0.0:99999" is invalid: expected host:port'),
    ("app", 'name = "my app"', "app.name = \"my app\" is invalid: expected a name of letters, digits"),
    ("kafka", 'security_protocol = "SASL_PLAINTXT"',
     'kafka.security_protocol = "SASL_PLAINTXT" is invalid: expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, '
     'SASL_SSL (did you mean "SASL_PLAINTEXT"?)'),
    ("kafka", 'bootstrap_servers = ["ok:9092", "bad"]', 'kafka.bootstrap_servers[1] = "bad" is invalid'),
])
def test_out_of_range_and_enums(tmp_path, section, line, expected):
    path = write(tmp_path, MINIMAL + f"[{section}]\n{line}\n")
    assert f"{path}: {expected}" in load_error(path)


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, MINIMAL + '[kafka]\nbootstrap_server = "a:1"\n')
    assert load_error(path) == f"{path}: kafka.bootstrap_server is an unknown key: did you mean bootstrap_servers?"


def test_unknown_section_suggests_the_closest(tmp_path):
    path = write(tmp_path, MINIMAL + "[checkpionts]\ninterval_ms = 5\n")
    assert load_error(path) == f"{path}: [checkpionts] is an unknown section: did you mean [checkpoint]?"


def test_missing_required_key_says_how_to_set_it(tmp_path):
    path = write(tmp_path, MINIMAL.replace('[dead_letter]\ntopic = "dlq"\n', ""))
    message = load_error(path)
    assert message.startswith(f"{path}: dead_letter.topic is missing: expected a Kafka topic name")
    assert 'topic = "model-dlq" under [dead_letter]' in message
    assert "FAILOVERD_DEAD_LETTER__TOPIC" in message


def test_bad_env_override_names_the_variable(tmp_path):
    path = write(tmp_path, MINIMAL)
    message = load_error(path, env={"FAILOVERD_CHECKPOINT__INTERVAL_MS": "soon"})
    assert message == (f'{path}: checkpoint.interval_ms = "soon" (from environment variable '
                       'FAILOVERD_CHECKPOINT__INTERVAL_MS) is invalid: expected an integer >= 1')


def test_env_override_out_of_range_names_the_variable(tmp_path):
    message = load_error(write(tmp_path, MINIMAL), env={"FAILOVERD_METRICS__PORT": "-1"})
    assert "metrics.port = -1 (from environment variable FAILOVERD_METRICS__PORT) is out of range" in message


def test_bad_env_bool(tmp_path):
    message = load_error(write(tmp_path, MINIMAL), env={"FAILOVERD_FAILOVER__FAILBACK": "yes please"})
    assert "FAILOVERD_FAILOVER__FAILBACK" in message and "expected true, false, 1 or 0" in message


def test_unknown_env_override_suggests_the_variable(tmp_path):
    message = load_error(write(tmp_path, MINIMAL), env={"FAILOVERD_KAFKA__BOOTSTRAP_SERVER": "a:1"})
    assert "environment variable FAILOVERD_KAFKA__BOOTSTRAP_SERVER is unknown" in message
    assert "did you mean FAILOVERD_KAFKA__BOOTSTRAP_SERVERS?" in message


def test_a_choice_in_the_wrong_case_suggests_the_right_one(tmp_path):
    path = write(tmp_path, MINIMAL + '[failover]\nstandby_mode = "HOT"\n')
    assert load_error(path) == (f'{path}: failover.standby_mode = "HOT" is invalid: expected one of hot, warm, '
                                'cold (did you mean "hot"?)')


def test_a_topic_with_two_roles_is_refused(tmp_path):
    path = write(tmp_path, MINIMAL.replace('topic = "out"', 'topic = "in-b"'))
    assert load_error(path) == (f'{path}: output.topic = "in-b" is invalid: expected a topic of its own: "in-b" is '
                                'already inputs.topics; each topic has exactly one role')
    # also when another key is wrong at the same time, and when the clash comes from the environment
    message = load_error(write(tmp_path, MINIMAL + "[metrics]\nport = -1\n"),
                         env={"FAILOVERD_REGISTRY__CONTROL_TOPIC": "dlq"})
    assert "metrics.port = -1 is out of range" in message
    assert ('registry.control_topic = "dlq" (from environment variable FAILOVERD_REGISTRY__CONTROL_TOPIC) is '
            'invalid: expected a topic of its own: "dlq" is already dead_letter.topic') in message


def test_topic_roles_come_from_one_table(tmp_path):
    from daemon import topics

    settings = config.load(write(tmp_path, MINIMAL), env={})
    assert tuple(settings.topics_by_role()) == topics.ROLES == tuple(r.role for r in config.TOPIC_ROLES)
    for role in config.TOPIC_ROLES:
        section, key = role.field.split(".")
        assert key in {f.name for f in dataclasses.fields(config.SECTIONS[section])}
        assert topics.ROLE_FIELDS[role.role] == role.field
    assert settings.topics_by_role()["input"] == ("in-a", "in-b")
    assert settings.topics_by_role()["control"] == (settings.registry.control_topic,)
    assert topics.COMPACTED_ROLES == ("changelog", "checkpoint", "control")


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, MINIMAL + "[checkpoint]\ninterval_ms = -1\n[metrics]\nport = 1e9\n[kafak]\n")
    lines = load_error(path).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_cross_field_rules(tmp_path):
    text = MINIMAL + "[kafka]\nsession_timeout_ms = 3000\nheartbeat_interval_ms = 3000\n"
    assert "kafka.heartbeat_interval_ms = 3000 is invalid: expected less than kafka.session_timeout_ms" \
        in load_error(write(tmp_path, text))
    text = MINIMAL + '[kafka]\nsecurity_protocol = "SASL_SSL"\n'
    assert "kafka.sasl_mechanism is missing" in load_error(write(tmp_path, text))
    text = MINIMAL.replace('topic = "dlq"', 'topic = "out"')
    assert 'dead_letter.topic = "out" is invalid: expected a topic of its own' in load_error(write(tmp_path, text))


def test_section_that_is_not_a_table(tmp_path):
    message = load_error(write(tmp_path, "metrics = 5\n" + MINIMAL))
    assert "metrics = 5 has the wrong type: expected a table ([metrics]), got an integer" in message


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"checkpoint.interval_ms = -1 is out of range"):
        config.CheckpointSettings(interval_ms=-1)


# ---- secrets and client kwargs ---------------------------------------------------------------------

SASL = MINIMAL + """
[kafka]
bootstrap_servers = "k1:9092,k2:9092"
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "SCRAM-SHA-512"
sasl_plain_username = "svc"
sasl_plain_password = "hunter2"
"""


def test_to_dict_masks_secrets(tmp_path):
    settings = config.load(write(tmp_path, SASL), env={"FAILOVERD_KAFKA__SSL_PASSWORD": "pem-secret"})
    data = settings.to_dict()
    assert data["kafka"]["sasl_plain_password"] == "***"
    assert data["kafka"]["ssl_password"] == "***"
    assert data["kafka"]["sasl_plain_username"] == "svc"
    assert "hunter2" not in json.dumps(data) and "pem-secret" not in json.dumps(data)
    assert data["inputs"]["topics"] == ["in-a", "in-b"]
    assert settings.kafka.sasl_plain_password == "hunter2"  # the real value stays usable


def test_wrong_type_of_a_secret_is_masked_in_the_message(tmp_path):
    text = SASL.replace('sasl_plain_password = "hunter2"', "sasl_plain_password = 12345678")
    message = load_error(write(tmp_path, text))
    assert "kafka.sasl_plain_password = \"***\" has the wrong type" in message
    assert "12345678" not in message


def test_client_kwargs_plaintext(tmp_path):
    kwargs = config.load(write(tmp_path, MINIMAL), env={}).kafka.client_kwargs()
    assert kwargs == {"bootstrap_servers": ["127.0.0.1:9092"], "client_id": "failoverd",
                      "security_protocol": "PLAINTEXT", "request_timeout_ms": 40000, "metadata_max_age_ms": 30000}


def test_client_kwargs_sasl_plaintext(tmp_path):
    kwargs = config.load(write(tmp_path, SASL), env={}).kafka.client_kwargs()
    assert kwargs == {"bootstrap_servers": ["k1:9092", "k2:9092"], "client_id": "failoverd",
                      "security_protocol": "SASL_PLAINTEXT", "request_timeout_ms": 40000, "metadata_max_age_ms": 30000,
                      "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc",
                      "sasl_plain_password": "hunter2"}


async def test_client_kwargs_are_accepted_by_aiokafka(tmp_path):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    kwargs = config.load(write(tmp_path, SASL), env={}).kafka.client_kwargs()
    for cls in (AIOKafkaConsumer, AIOKafkaProducer):
        client = cls(**kwargs)  # raises TypeError/ValueError on a kwarg it does not know
        await client.stop()
    admin = AIOKafkaAdminClient(**kwargs)
    await admin.close()


def test_ssl_with_a_missing_ca_file_is_a_config_error(tmp_path):
    text = MINIMAL + '[kafka]\nsecurity_protocol = "SSL"\nssl_cafile = "missing-ca.pem"\n'
    kafka = config.load(write(tmp_path, text), env={}).kafka
    with pytest.raises(ConfigError, match=r"kafka.ssl_cafile = \".*missing-ca.pem\" does not exist"):
        kafka.client_kwargs()


# ---- failoverd config check ---------------------------------------------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "config", "check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


def test_config_check_valid_file_exits_0_and_prints_effective_toml(tmp_path):
    proc = run_cli(str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert "[checkpoint]\ninterval_ms = 100" in proc.stdout
    # the printed effective configuration is itself a valid configuration
    body = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#"))
    reloaded = config.load(write(tmp_path, body), env={})
    assert reloaded.to_dict() == config.load(EXAMPLE, env={}).to_dict()


def test_config_check_json_masks_secrets(tmp_path):
    import os

    env = {**os.environ, "FAILOVERD_KAFKA__SASL_PLAIN_PASSWORD": "hunter2"}
    proc = run_cli(str(write(tmp_path, SASL)), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kafka"]["sasl_plain_password"] == "***"
    assert data["kafka"]["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert "hunter2" not in proc.stdout


def test_config_check_invalid_file_exits_2_with_the_problem(tmp_path):
    path = write(tmp_path, MINIMAL + "[checkpoint]\ninterval_ms = -5\n")
    proc = run_cli(str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"failoverd: error: {path}: checkpoint.interval_ms = -5 is out of range" in proc.stderr


def test_config_check_missing_file_exits_2(tmp_path):
    proc = run_cli(str(tmp_path / "absent.toml"))
    assert proc.returncode == 2
    assert "configuration file not found" in proc.stderr
