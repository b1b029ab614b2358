"""Record headers: provenance on every output, reason and source position on dead letters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

H_RELEASE_NAME = "fd.release.name"
H_RELEASE_VERSION = "fd.release.version"
H_RELEASE_DIGEST = "fd.release.digest"
H_BINDING_PREFIX = "fd.binding."
"""``fd.binding.<name>``: the content digest of a binding the release ran against (docs/bundles.md#bindings)."""
H_SOURCE_TOPIC = "fd.source.topic"
H_SOURCE_PARTITION = "fd.source.partition"
H_SOURCE_OFFSET = "fd.source.offset"
H_DLQ_REASON = "fd.dlq.reason"
H_DLQ_DETAIL = "fd.dlq.detail"
H_DLQ_TRUNCATED = "fd.dlq.truncated"
H_REPLAYED_FROM = "fd.replayed.from"
H_CHECKPOINT = "fd.checkpoint"
H_CORRECTION = "fd.correction"

H_DLQ_ORIGINAL_SIZE = "fd.dlq.original_size"

DLQ_REASONS = ("bad_json", "schema", "oversized", "model_error", "output_schema", "model_exception",
               "output_oversized", "undecodable", "model_crash", "bad_avro", "unknown_schema_id")
"""Every reason a dead letter can carry (one metric label each; runbooks in docs/operations.md):
model_exception: predict failed for that record alone (found by splitting the batch);
output_oversized: the output is larger than the output topic or the producer accepts;
undecodable: the Kafka client could not parse the record (e.g. a header key that is not UTF-8);
model_crash: the model process died or hung on that record alone, on every release that met it;
bad_avro: not the Confluent Avro wire format, or a body its writer schema cannot read;
unknown_schema_id: the schema registry has no schema with the record's id."""


def release_headers(info: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [
        (H_RELEASE_NAME, info["name"].encode()),
        (H_RELEASE_VERSION, info["version"].encode()),
        (H_RELEASE_DIGEST, info["digest"].encode()),
        *((H_BINDING_PREFIX + name, digest.encode())
          for name, digest in sorted(info.get("binding_digests", {}).items())),
    ]


def source_headers(topic_b: bytes, partition_b: bytes, offset: int) -> list[tuple[str, bytes]]:
    return [(H_SOURCE_TOPIC, topic_b), (H_SOURCE_PARTITION, partition_b), (H_SOURCE_OFFSET, str(offset).encode())]


def dead_letter_headers(original: Sequence[tuple[str, bytes | None]] | None, reason: str, detail: str,
                        provenance: Sequence[tuple[str, bytes]], truncated: bool = False,
                        original_size: int | None = None) -> list[tuple[str, bytes | None]]:
    """A dead letter's headers: the input's own, then the reason, the detail (at most 1000 bytes),
    the provenance (release and source position) and, for a cut value, ``fd.dlq.truncated`` and
    ``fd.dlq.original_size``. daemon/deadletters.py reads them back in this order."""
    hs: list[tuple[str, bytes | None]] = [*(original or ()), (H_DLQ_REASON, reason.encode()),
          (H_DLQ_DETAIL, detail.encode("utf-8", "replace")[:1000]), *provenance]
    if truncated:
        hs.append((H_DLQ_TRUNCATED, b"1"))
        if original_size is not None:
            hs.append((H_DLQ_ORIGINAL_SIZE, str(original_size).encode()))
    return hs


def as_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, bytes]:
    return {k: v for k, v in (headers or ())}
