"""[output] producer settings and [kafka] authentication: what config check refuses (with the
fix), what daemon.clients passes aiokafka, and the OAUTHBEARER token providers (daemon/kafka_auth.py).
The broker-side proof is in tests/integration/test_compression.py and test_secure_kafka.py."""

from __future__ import annotations

import asyncio
import sys

import pytest
from aiokafka import AIOKafkaProducer

from daemon import clients, config, kafka_auth
from daemon.errors import ConfigError
from daemon.kafka_local import unsecured_token

BASE = {"inputs": {"topics": ["in"]}, "output": {"topic": "out"}, "dead_letter": {"topic": "dlq"}}


def parse(**sections: dict) -> config.Settings:
    data = {k: dict(v) for k, v in BASE.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.parse(data, env={})


def error(**sections: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(**sections)
    return str(exc.value)


# ---- [output] producer settings -------------------------------------------------------------------------

def test_producer_defaults_are_zstd_acks_all_and_the_engines_batching():
    out = parse().output
    assert (out.compression, out.acks, out.linger_ms, out.batch_size) == ("zstd", "all", 10, 524288)
    assert out.producer_kwargs() == {"compression_type": "zstd", "acks": "all", "enable_idempotence": True,
                                     "linger_ms": 10, "max_batch_size": 524288}
    assert parse(output={"compression": "none"}).output.producer_kwargs()["compression_type"] is None


@pytest.mark.parametrize("output, needle", [
    ({"compression": "zstandard"}, 'output.compression = "zstandard" is invalid: expected one of zstd, lz4, snappy, '
                                   'gzip, none (did you mean "zstd"?)'),
    ({"acks": 1}, "output.acks = 1 has the wrong type: expected one of all, 1, got an integer"),
    ({"acks": "0"}, 'output.acks = "0" is invalid: expected one of all, 1'),
    ({"linger_ms": -1}, "output.linger_ms = -1 is out of range"),
    ({"batch_size": 2 << 20}, "output.batch_size = 2097152 is out of range: expected an integer >= 1024 and "
                              "<= 1048576"),
])
def test_invalid_producer_settings_name_the_key_and_the_valid_values(output, needle):
    assert needle in error(output=output)


def test_acks_1_with_exactly_once_is_refused_with_the_fix():
    message = error(output={"acks": "1"})
    assert 'output.acks = "1" cannot work: expected "all" because checkpoint.exactly_once = true' in message
    assert 'set output.acks = "all", or checkpoint.exactly_once = false' in message
    at_least_once = parse(output={"acks": "1"}, checkpoint={"exactly_once": False}).output.producer_kwargs()
    assert at_least_once["acks"] == 1 and at_least_once["enable_idempotence"] is False


async def test_producer_kwargs_from_the_settings_are_accepted_by_aiokafka():
    for output in ({}, {"acks": "1", "compression": "gzip"}, {"compression": "none", "linger_ms": 0}):
        s = parse(output=output, checkpoint={"exactly_once": "acks" not in output})
        producer = AIOKafkaProducer(**clients.producer_kwargs(s))  # ValueError on a combination it refuses
        await producer.stop()


def test_clients_take_output_settings_from_the_whole_settings_only():
    s = parse(output={"compression": "lz4", "linger_ms": 25, "batch_size": 262144})
    kwargs = clients.producer_kwargs(s)
    assert (kwargs["compression_type"], kwargs["linger_ms"], kwargs["max_batch_size"]) == ("lz4", 25, 262144)
    assert kwargs["bootstrap_servers"] == ["127.0.0.1:9092"]
    assert "compression_type" not in clients.producer_kwargs(s.kafka)  # the [kafka] section alone: defaults
    assert clients.producer_kwargs(s, linger_ms=0)["linger_ms"] == 0  # overrides still win


def test_batch_cap_lowers_the_batch_size_to_what_the_topics_accept_never_raises_it():
    s = parse(output={"batch_size": 262144})
    assert clients.producer_kwargs(s, batch_cap=100_000)["max_batch_size"] == 100_000
    assert clients.producer_kwargs(s, batch_cap=1 << 20)["max_batch_size"] == 262144
    assert clients.producer_kwargs("h:1", batch_cap=4096)["max_batch_size"] == 4096


def test_transactional_producers_keep_acks_all_whatever_the_settings_say():
    s = parse(output={"acks": "1"}, checkpoint={"exactly_once": False})  # e.g. a DLQ replay
    kwargs = clients.producer_kwargs(s, transactional_id="failoverd.dlq")
    assert kwargs["acks"] == "all" and kwargs["enable_idempotence"] is True
    assert clients.producer_kwargs(s)["acks"] == 1


# ---- [kafka] authentication checks ----------------------------------------------------------------------

SCRAM = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc"}


@pytest.mark.parametrize("kafka, needle", [
    (SCRAM, "kafka.sasl_plain_password is missing: expected the password because kafka.sasl_mechanism = "
            '"SCRAM-SHA-512": set kafka.sasl_plain_password_file'),
    ({**SCRAM, "sasl_plain_password": "p", "sasl_plain_password_file": "/run/pw"},
     "expected only one of kafka.sasl_plain_password and kafka.sasl_plain_password_file"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"},
     "kafka.sasl_oauth_token_file is missing: expected a token source because kafka.sasl_mechanism = "
     '"OAUTHBEARER": set kafka.sasl_oauth_token_file'),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_file": "/t",
      "sasl_oauth_token_command": "get-token"}, "expected only one of kafka.sasl_oauth_token_file and"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_command": "'unclosed"},
     "kafka.sasl_oauth_token_command = \"'unclosed\" is invalid: expected a command line"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_file": "/t",
      "sasl_plain_username": "svc"}, 'kafka.sasl_plain_username = "svc" is ignored: only kafka.sasl_mechanism '
                                     'PLAIN or SCRAM-SHA-256/512 uses it, and kafka.sasl_mechanism = "OAUTHBEARER"'),
    ({**SCRAM, "sasl_plain_password": "p", "sasl_oauth_token_file": "/t"},
     "kafka.sasl_oauth_token_file = \"/t\" is ignored: only kafka.sasl_mechanism OAUTHBEARER uses it"),
    ({"sasl_plain_password": "hunter2"}, 'kafka.sasl_plain_password = "***" is ignored: only kafka.sasl_mechanism '
                                         'PLAIN or SCRAM-SHA-256/512 uses it, and kafka.security_protocol = '
                                         '"PLAINTEXT" (no SASL)'),
    ({"ssl_cafile": "/ca.pem"}, 'kafka.ssl_cafile = "/ca.pem" is ignored: only TLS uses it: set '
                                'kafka.security_protocol to SSL or SASL_SSL (it is "PLAINTEXT": nothing would be '
                                'encrypted)'),
    ({"security_protocol": "SSL", "ssl_keyfile": "/k.pem"}, "kafka.ssl_certfile is missing: expected the client "
                                                             "certificate (PEM) that kafka.ssl_keyfile is the key of"),
])
def test_combinations_that_cannot_connect_are_refused_with_the_fix(kafka, needle):
    message = error(kafka=kafka)
    assert needle in message
    assert "hunter2" not in message


def test_gssapi_without_its_package_is_refused_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gssapi" else real(name, *a))
    message = error(kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "GSSAPI"})
    assert 'kafka.sasl_mechanism = "GSSAPI" cannot connect: needs the Python package gssapi' in message


def test_the_password_file_is_read_into_the_client_kwargs_and_masked(tmp_path):
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    s = parse(kafka={**SCRAM, "sasl_plain_password_file": str(password)})
    assert s.kafka.client_kwargs()["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.to_dict())


def test_every_client_shares_one_token_provider(tmp_path):
    s = parse(kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "OAUTHBEARER",
                     "sasl_oauth_token_command": "get-token --audience kafka"})
    first, second = s.kafka.client_kwargs(), s.kafka.client_kwargs()
    assert first is not second
    assert first["sasl_oauth_token_provider"] is second["sasl_oauth_token_provider"]
    assert isinstance(first["sasl_oauth_token_provider"], kafka_auth.CommandTokenProvider)


# ---- token providers ------------------------------------------------------------------------------------

def test_token_expiry_reads_the_jwt_exp_claim_without_verifying():
    token = unsecured_token(lifetime_s=100, now=1000)
    assert kafka_auth.token_expiry(token) == 1100
    assert kafka_auth.token_expiry("opaque-token") is None
    assert kafka_auth.token_expiry("a.!!!.c") is None
    assert kafka_auth.refresh_at(token, 1000, None) == 1080  # a fifth of its lifetime before exp
    long = unsecured_token(lifetime_s=3600, now=1000)
    assert kafka_auth.refresh_at(long, 1000, None) == 1000 + 3600 - 30
    assert kafka_auth.refresh_at("opaque", 1000, 60) == 1060


async def test_the_token_file_is_read_at_every_authentication(tmp_path):
    path = tmp_path / "token"
    provider = kafka_auth.FileTokenProvider(str(path))
    path.write_text("first\n")
    assert await provider.token() == "first"
    path.write_text("second")
    assert await provider.token() == "second"
    path.unlink()
    with pytest.raises(ConfigError, match=r"kafka.sasl_oauth_token_file = \".*token\" does not exist"):
        await provider.token()
    assert "first" not in repr(provider)


def command(tmp_path, lifetime: float) -> tuple[str, object]:
    """A token command that counts its runs in a file and prints a token living ``lifetime`` seconds."""
    runs = tmp_path / "runs"
    script = tmp_path / "get_token.py"
    script.write_text(
        "import pathlib, sys\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
        "from daemon.kafka_local import unsecured_token\n"
        f"print(unsecured_token(lifetime_s={lifetime}))\n")
    return f"{sys.executable} {script}", lambda: len(runs.read_text()) if runs.exists() else 0


async def test_a_command_token_is_reused_until_it_nears_expiry(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    cmd, runs = command(tmp_path, lifetime=3600)
    provider = kafka_auth.CommandTokenProvider(cmd)
    tokens = await asyncio.gather(*(provider.token() for _ in range(5)))  # connections at once: one run
    assert len(set(tokens)) == 1 and runs() == 1
    assert await provider.token() == tokens[0] and runs() == 1
    (tmp_path / "expiring").mkdir()
    expiring, runs2 = command(tmp_path / "expiring", lifetime=0)  # expires at once: every call runs it again
    provider = kafka_auth.CommandTokenProvider(expiring)
    await provider.token()
    await provider.token()
    assert runs2() == 2


async def test_a_failing_token_command_is_one_line_naming_the_key(tmp_path):
    provider = kafka_auth.CommandTokenProvider(f"{sys.executable} -c \"import sys; sys.exit('no IdP today')\"")
    with pytest.raises(ConfigError, match=r"kafka.sasl_oauth_token_command \(.*\) exited with code 1: no IdP today"):
        await provider.token()
    provider = kafka_auth.CommandTokenProvider("/nonexistent/get-token")
    with pytest.raises(ConfigError, match="cannot be started"):
        await provider.token()
    provider = kafka_auth.CommandTokenProvider(f"{sys.executable} -c \"print('two words')\"")
    with pytest.raises(ConfigError, match="printed more than one word"):
        await provider.token()


def test_only_refusals_that_retrying_cannot_fix_stop_a_bootstrap():
    import ssl
    import types

    from aiokafka.errors import SaslAuthenticationFailed

    client = types.SimpleNamespace(hosts=[("k1", 9093, 0)], _sasl_mechanism="PLAIN", _sasl_plain_username="svc")
    assert clients.refusal(client, [ConnectionRefusedError(), ssl.SSLEOFError(8, "EOF")]) is None  # down, restarting
    refused = clients.refusal(client, [ConnectionRefusedError(), SaslAuthenticationFailed("invalid credentials")])
    assert refused.startswith("Kafka at k1:9093 refused the credentials of user 'svc' with PLAIN")
    wrong_port = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong_port.reason = "WRONG_VERSION_NUMBER"
    assert "is that a TLS listener" in clients.refusal(client, [wrong_port])
