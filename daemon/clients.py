"""Kafka clients, built in one place from the settings; the only module that touches aiokafka's privates.

    consumer = clients.consumer(settings.kafka)                       # a read_committed reader, no group
    consumer = clients.consumer(settings.kafka, group_id="g", ...)    # overrides win
    producer = clients.producer(settings)                             # acks, compression ... from [output]
    producer = clients.producer(settings, batch_cap=limits.batch_bytes)  # no batch larger than topics accept
    producer = clients.transactional_producer(settings, "failoverd.app.g.t.0")
    admin = clients.admin(settings.kafka)
    parts = await clients.partitions_of(consumer, "model-input")      # after consumer.start()

The connection (servers, client id, security, TLS context, token provider) comes from
:meth:`~daemon.config.KafkaSettings.client_kwargs`. Every function also takes the whole
:class:`~daemon.config.Settings`, the kwargs dict that method returns, or a bare bootstrap string
(``failoverd release publish --bootstrap HOST:PORT``): see :data:`Target`. A producer built from
the whole Settings also takes ``[output]``'s compression, acks, linger_ms and batch_size
(:meth:`~daemon.config.OutputSettings.producer_kwargs`): pass the Settings wherever a producer
writes the daemon's data. Clients are returned unstarted; the caller starts and stops them.

The defaults are what failoverd's guarantees rely on, so a new client cannot forget them:
consumers read committed data only, never commit offsets on their own and start from the
earliest offset; producers wait for all in-sync replicas and are idempotent. A caller that means
otherwise says so with an override (the engine's high-watermark reader reads uncommitted).

aiokafka has no public API for three things failoverd needs, one bug failoverd must work around
(a refused OAUTHBEARER token), and it hides why a connection was refused (a wrong password is
"Unable to bootstrap", retried forever); the functions at the end of this module are the only places
that reach into its private state, each checked against aiokafka 0.14 (pyproject.toml pins
``aiokafka>=0.14,<0.15``): re-check them when that pin moves.
"""

from __future__ import annotations

import contextvars
import ssl
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.api import Request, Response

from daemon.config import KafkaSettings, Settings
from daemon.errors import ConfigError

Target = Settings | KafkaSettings | Mapping[str, Any] | str
"""Where to connect: the whole settings, their ``[kafka]`` section, its ``client_kwargs()``, or a
bootstrap string."""

CONSUMER_DEFAULTS: Mapping[str, Any] = {
    "group_id": None,  # readers assign partitions themselves; the engine's group consumer overrides
    "enable_auto_commit": False,  # offsets are committed in the checkpoint's transaction, or never
    "isolation_level": "read_committed",  # never act on records of an aborted or open transaction
    "auto_offset_reset": "earliest",  # a reader without a committed offset reads everything
}
PRODUCER_DEFAULTS: Mapping[str, Any] = {
    "acks": "all",  # a write is acknowledged once every in-sync replica has it
    "enable_idempotence": True,  # retries never duplicate or reorder
}
TRANSACTIONAL: Mapping[str, Any] = {
    "acks": "all",  # transactions need both, whatever [output] acks says (config check refuses "1"
    "enable_idempotence": True,  # with checkpoint.exactly_once; a DLQ replay is transactional too)
}


def common_kwargs(kafka: Target) -> dict[str, Any]:
    """The connection kwargs every aiokafka client takes (servers, client id, security)."""
    if isinstance(kafka, Settings):
        return kafka.kafka.client_kwargs()
    if isinstance(kafka, KafkaSettings):
        return kafka.client_kwargs()
    if isinstance(kafka, str):
        return {"bootstrap_servers": kafka}
    return dict(kafka)


def address(kafka: Target) -> str:
    """The bootstrap servers, comma-separated, for messages."""
    servers = common_kwargs(kafka).get("bootstrap_servers")
    return ",".join(servers) if isinstance(servers, (list, tuple)) else str(servers)


def consumer(kafka: Target, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An unstarted consumer (subscribed to ``topics`` if any) with :data:`CONSUMER_DEFAULTS`."""
    return AIOKafkaConsumer(*topics, **{**common_kwargs(kafka), **CONSUMER_DEFAULTS, **overrides})


def producer_kwargs(kafka: Target, *, batch_cap: int | None = None, **overrides: Any) -> dict[str, Any]:
    """What :func:`producer` passes to aiokafka: the connection, :data:`PRODUCER_DEFAULTS`, then
    ``[output]``'s producer settings when ``kafka`` is the whole Settings, then ``overrides``;
    ``batch_cap`` lowers ``max_batch_size`` to what every topic written accepts
    (daemon/engine/limits.py), never raises it."""
    tuning = kafka.output.producer_kwargs() if isinstance(kafka, Settings) else {}
    kwargs = {**common_kwargs(kafka), **PRODUCER_DEFAULTS, **tuning, **overrides}
    if "transactional_id" in kwargs:
        kwargs.update(TRANSACTIONAL)
    if batch_cap is not None:
        kwargs["max_batch_size"] = min(int(kwargs.get("max_batch_size", AIOKAFKA_BATCH_BYTES)), batch_cap)
    return kwargs


AIOKAFKA_BATCH_BYTES = 16384
"""aiokafka's default ``max_batch_size``."""


def producer(kafka: Target, *, batch_cap: int | None = None, **overrides: Any) -> AIOKafkaProducer:
    """An unstarted producer: see :func:`producer_kwargs`."""
    return AIOKafkaProducer(**producer_kwargs(kafka, batch_cap=batch_cap, **overrides))


def transactional_producer(kafka: Target, transactional_id: str, *, batch_cap: int | None = None,
                           **overrides: Any) -> AIOKafkaProducer:
    """An unstarted transactional producer (acks=all, idempotent, whatever the settings say): its
    ``start()`` (InitProducerId) fences every earlier producer with the same ``transactional_id``
    and aborts that producer's open transaction."""
    return producer(kafka, batch_cap=batch_cap, transactional_id=transactional_id, **overrides)


def admin(kafka: Target, **overrides: Any) -> AIOKafkaAdminClient:
    """An unstarted admin client."""
    return AIOKafkaAdminClient(**{**common_kwargs(kafka), **overrides})


# ---- aiokafka private API (checked against aiokafka 0.14) ----------------------------------------

async def partitions_of(client: AIOKafkaConsumer | AIOKafkaProducer, topic: str) -> set[int]:
    """The partition ids of ``topic`` from a started client's metadata, fetching it if needed
    (empty: the cluster knows the topic without partitions). UnknownTopicOrPartitionError when the
    topic is not in the metadata within ``request_timeout_ms``.

    Why private: ``AIOKafkaConsumer.partitions_for_topic`` answers only from metadata already held,
    which a reader that has not subscribed to the topic does not have; aiokafka 0.14's
    ``AIOKafkaClient._wait_on_metadata`` adds the topic to the metadata request and waits for it
    (it is what ``AIOKafkaProducer.send`` uses).
    """
    kafka_client = client._client  # noqa: SLF001 - see the docstring
    parts = await kafka_client._wait_on_metadata(topic)  # noqa: SLF001
    return set(parts or ())


async def refresh_metadata(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Fetch the cluster's metadata now (e.g. to see a topic created a moment ago).

    Why private: aiokafka 0.14 refreshes metadata on its own schedule (``metadata_max_age_ms``,
    5 minutes by default) and has no public way to ask for it; ``AIOKafkaClient.
    force_metadata_update`` is what its consumer and producer call internally.
    """
    await client._client.force_metadata_update()  # noqa: SLF001 - see the docstring


async def send_request(admin_client: AIOKafkaAdminClient, request: Request) -> Response:
    """Send a raw Kafka protocol request through an admin client's connection (any broker).

    Why private: aiokafka 0.14's ``AIOKafkaAdminClient.alter_configs`` has no ``validate_only``,
    which daemon/topics needs to validate every change before making any; it sends the same
    ``AlterConfigsRequest`` with the flag set through ``AIOKafkaAdminClient._send_request``.
    """
    response: Response = await admin_client._send_request(request)  # noqa: SLF001 - see the docstring
    return response


def _answer_oauthbearer_error_challenges() -> None:
    """Make a refused OAUTHBEARER token an authentication error, not a connection that seems up.

    A broker that refuses a token (expired, wrong audience, bad signature) answers with an error
    challenge, ``{"status":"invalid_token"}``, to which the client must reply ``%x01`` before the
    broker fails the exchange with its reason (RFC 7628 3.2.2, KIP-255). aiokafka 0.14's
    ``conn.OAuthAuthenticator.step`` ends the exchange after sending the token whatever the broker
    answered, so the connection counts as authenticated while the broker waits for the reply: every
    request after it goes unanswered and the client stalls until its timeouts. Answering the
    challenge lets aiokafka's own error path raise ``SaslAuthenticationFailed`` with the broker's
    message. Applied once, when this module is imported (before any client is built).
    """
    from aiokafka import conn

    authenticator = conn.OAuthAuthenticator
    if getattr(authenticator, "_failoverd_answers_challenges", False):
        return
    original = authenticator.step

    async def step(self: Any, payload: bytes | None) -> tuple[bytes, bool] | None:
        if getattr(self, "_token_sent", False) and payload and not getattr(self, "_challenge_answered", False):
            self._challenge_answered = True
            return b"\x01", True
        result: tuple[bytes, bool] | None = await original(self, payload)
        return result

    authenticator.step = step
    authenticator._failoverd_answers_challenges = True


_BOOTSTRAP_ERRORS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "failoverd_bootstrap_errors", default=None)


def _explain_refused_connections() -> None:
    """A client whose every bootstrap connection was refused for a reason that retrying cannot fix
    (authentication failed, a mechanism the broker does not enable, a certificate not trusted, TLS
    against a listener that does not speak it) raises ConfigError naming it and the fix, instead
    of aiokafka's ``KafkaConnectionError("Unable to bootstrap ...")`` that callers retry forever.

    Why private: aiokafka 0.14's ``AIOKafkaClient.bootstrap`` logs each connection's error and
    raises without it. The wrapper of ``aiokafka.client.create_conn`` (what ``bootstrap`` calls)
    records the errors of the connections made during a ``bootstrap`` only (a context variable,
    closed when it returns; later reconnects are not recorded); the wrapper of ``bootstrap``
    turns a refusal among them into the ConfigError. A broker that is down stays a
    KafkaConnectionError (retried). Applied once, when this module is imported.
    """
    from aiokafka import client as client_module
    from aiokafka.errors import KafkaConnectionError

    cls = client_module.AIOKafkaClient
    if getattr(cls, "_failoverd_explains_refusals", False):
        return
    original_bootstrap, original_create_conn = cls.bootstrap, client_module.create_conn

    async def create_conn(*args: Any, **kwargs: Any) -> Any:
        try:
            return await original_create_conn(*args, **kwargs)
        except BaseException as exc:
            seen = _BOOTSTRAP_ERRORS.get()
            if seen is not None and seen["open"]:
                seen["errors"].append(exc)
            raise

    async def bootstrap(self: Any) -> None:
        seen: dict[str, Any] = {"open": True, "errors": []}
        token = _BOOTSTRAP_ERRORS.set(seen)
        try:
            await original_bootstrap(self)
        except KafkaConnectionError:
            problem = refusal(self, seen["errors"])
            if problem is not None:
                raise ConfigError(problem) from None
            raise
        finally:
            seen["open"] = False
            _BOOTSTRAP_ERRORS.reset(token)

    client_module.create_conn = create_conn
    cls.bootstrap = bootstrap
    cls._failoverd_explains_refusals = True


def refusal(kafka_client: Any, errors: list[BaseException]) -> str | None:
    """One line saying why the brokers refused every connection, with the fix, or None when
    nothing in ``errors`` is a refusal (the broker is down or slow: worth retrying)."""
    from aiokafka.errors import SaslAuthenticationFailed, UnsupportedSaslMechanismError

    hosts = ",".join(f"{h}:{p}" for h, p, *_ in getattr(kafka_client, "hosts", []))
    mechanism = getattr(kafka_client, "_sasl_mechanism", None)
    user = getattr(kafka_client, "_sasl_plain_username", None)
    for exc in errors:
        if isinstance(exc, SaslAuthenticationFailed):
            if mechanism == "OAUTHBEARER":
                return (f"Kafka at {hosts} refused the OAUTHBEARER token ({exc}): it is expired or not one the "
                        "brokers accept; fix what kafka.sasl_oauth_token_file holds or "
                        "kafka.sasl_oauth_token_command prints (the broker's log says why)")
            return (f"Kafka at {hosts} refused the credentials of user {user!r} with {mechanism} ({exc}); fix "
                    "kafka.sasl_plain_username and the password (kafka.sasl_plain_password_file or "
                    "FAILOVERD_KAFKA__SASL_PLAIN_PASSWORD), or kafka.sasl_mechanism")
        if isinstance(exc, UnsupportedSaslMechanismError):
            return (f"Kafka at {hosts} does not enable kafka.sasl_mechanism = \"{mechanism}\" ({exc}); set one it "
                    "enables")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"Kafka at {hosts}: the broker's TLS certificate is not trusted ({exc.verify_message}); set "
                    "kafka.ssl_cafile to the PEM file of the CA that signed the brokers' certificates")
        if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) in TLS_REFUSALS:  # not an EOF (restart)
            return (f"Kafka at {hosts}: the TLS handshake failed ({exc.reason}); is that a TLS listener, and does "
                    "it accept this client (kafka.ssl_certfile/ssl_keyfile for mutual TLS)? Check "
                    "kafka.security_protocol (SSL/SASL_SSL only for TLS listeners) and the port")
    return None


TLS_REFUSALS = frozenset({
    "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_PROTOCOL_VERSION",
    "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_ACCESS_DENIED", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
})
"""OpenSSL reasons of a handshake the broker (or this client) refuses for good: retrying cannot help."""


_answer_oauthbearer_error_challenges()
_explain_refused_connections()
