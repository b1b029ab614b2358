"""Kafka clients, built in one place from the settings; the only module that touches aiokafka's privates.

    consumer = clients.consumer(settings.kafka)                       # a read_committed reader, no group
    consumer = clients.consumer(settings.kafka, group_id="g", ...)    # overrides win
    producer = clients.producer(settings.kafka, linger_ms=10)         # acks=all, idempotent
    producer = clients.transactional_producer(settings.kafka, "failoverd.app.g.t.0")
    admin = clients.admin(settings.kafka)
    parts = await clients.partitions_of(consumer, "model-input")      # after consumer.start()

The connection (servers, client id, security, TLS context) comes from
:meth:`~daemon.config.KafkaSettings.client_kwargs`. Every function also takes the kwargs dict that
method returns, or a bare bootstrap string (``failoverd release publish --bootstrap HOST:PORT``):
see :data:`Target`. Clients are returned unstarted; the caller starts and stops them.

The defaults are what failoverd's guarantees rely on, so a new client cannot forget them:
consumers read committed data only, never commit offsets on their own and start from the
earliest offset; producers wait for all in-sync replicas and are idempotent. A caller that means
otherwise says so with an override (the engine's high-watermark reader reads uncommitted).

aiokafka has no public API for three things failoverd needs; the functions at the end of this
module are the only places that reach into its private state, each checked against aiokafka 0.14
(pyproject.toml pins ``aiokafka>=0.14,<0.15``): re-check them when that pin moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.api import Request, Response

from daemon.config import KafkaSettings

Target = KafkaSettings | Mapping[str, Any] | str
"""Where to connect: the settings' ``[kafka]`` section, its ``client_kwargs()``, or a bootstrap string."""

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


def common_kwargs(kafka: Target) -> dict[str, Any]:
    """The connection kwargs every aiokafka client takes (servers, client id, security)."""
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


def producer(kafka: Target, **overrides: Any) -> AIOKafkaProducer:
    """An unstarted producer with :data:`PRODUCER_DEFAULTS`."""
    return AIOKafkaProducer(**{**common_kwargs(kafka), **PRODUCER_DEFAULTS, **overrides})


def transactional_producer(kafka: Target, transactional_id: str, **overrides: Any) -> AIOKafkaProducer:
    """An unstarted transactional producer: its ``start()`` (InitProducerId) fences every earlier
    producer with the same ``transactional_id`` and aborts that producer's open transaction."""
    return producer(kafka, transactional_id=transactional_id, **overrides)


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
