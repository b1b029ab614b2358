"""How large a record the cluster accepts, read once at start.

A produce request whose record batch is larger than the topic's ``max.message.bytes`` (or the
producer's ``max_request_size``) is refused whole, and on replay the same output is refused again:
one oversized output would stop its partition forever. The engine therefore checks every output
and dead letter against :class:`Limits` before it is added to a batch, turns an oversized output
into a dead letter (``output_oversized``) and cuts an oversized dead letter to fit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatchBuilder

log = logging.getLogger("failoverd.engine")

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588
"""The broker's default ``message.max.bytes`` (what a topic without its own setting accepts)."""
PRODUCER_MAX_REQUEST_BYTES = 1048576
"""aiokafka's default ``max_request_size``; the engine's producers keep it."""
BATCH_BYTES = 512 * 1024
"""The engine's producer batch size when every topic it writes accepts that much."""


def record_bytes(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> int:
    """Upper bound of a record's size alone in a v2 batch (batch header included)."""
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)
    return size


@dataclasses.dataclass(frozen=True)
class Limits:
    max_bytes: dict[str, int]
    """Per topic the engine writes: the largest record batch it accepts."""

    def of(self, topic: str) -> int:
        return self.max_bytes.get(topic, min(KAFKA_DEFAULT_MAX_MESSAGE_BYTES, PRODUCER_MAX_REQUEST_BYTES))

    @property
    def batch_bytes(self) -> int:
        """A producer batch size no topic refuses (batches fill up to it before they are sent)."""
        return max(1024, min([BATCH_BYTES, *self.max_bytes.values()]))


async def read(admin_kwargs: dict[str, Any], topics: list[str]) -> Limits:
    """Each topic's ``max.message.bytes`` (capped by the producer's request size). A cluster that
    does not let us describe configs gets Kafka's defaults, with a warning."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from daemon import clients

    values: dict[str, int] = {}
    admin = clients.admin(admin_kwargs)
    try:
        await admin.start()
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        for response in responses:
            for error_code, _message, _type, name, entries in response.resources:
                if error_code:
                    continue
                for entry in entries:
                    if entry[0] == "max.message.bytes" and entry[1] is not None:
                        values[name] = min(int(entry[1]), PRODUCER_MAX_REQUEST_BYTES)
    except Exception as exc:  # noqa: BLE001 - limits fall back to Kafka's defaults
        log.warning("could not read the topics' max.message.bytes; assuming Kafka's default",
                    extra={"error": repr(exc), "default": KAFKA_DEFAULT_MAX_MESSAGE_BYTES})
    finally:
        await admin.close()
    default = min(KAFKA_DEFAULT_MAX_MESSAGE_BYTES, PRODUCER_MAX_REQUEST_BYTES)
    return Limits({t: values.get(t, default) for t in topics})
