"""Record headers: provenance on every output, reason and source position on dead letters."""

from __future__ import annotations

H_RELEASE_NAME = "fd.release.name"
H_RELEASE_VERSION = "fd.release.version"
H_RELEASE_DIGEST = "fd.release.digest"
H_SOURCE_TOPIC = "fd.source.topic"
H_SOURCE_PARTITION = "fd.source.partition"
H_SOURCE_OFFSET = "fd.source.offset"
H_DLQ_REASON = "fd.dlq.reason"
H_DLQ_DETAIL = "fd.dlq.detail"
H_CHECKPOINT = "fd.checkpoint"
H_CORRECTION = "fd.correction"

DLQ_REASONS = ("bad_json", "schema", "oversized", "model_error", "output_schema")


def release_headers(info: dict) -> list[tuple[str, bytes]]:
    return [
        (H_RELEASE_NAME, info["name"].encode()),
        (H_RELEASE_VERSION, info["version"].encode()),
        (H_RELEASE_DIGEST, info["digest"].encode()),
    ]


def source_headers(topic_b: bytes, partition_b: bytes, offset: int, before=()) -> list[tuple[str, bytes]]:
    """The source position headers, after ``before`` (e.g. the release headers)."""
    return [*before, (H_SOURCE_TOPIC, topic_b), (H_SOURCE_PARTITION, partition_b),
            (H_SOURCE_OFFSET, str(offset).encode())]


def as_dict(headers) -> dict[str, bytes]:
    return {k: v for k, v in (headers or ())}
