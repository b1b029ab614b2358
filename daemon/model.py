"""The model protocol: what a bundle's entrypoint class sees and returns (docs/bundles.md).

A model is a class constructed with a :class:`ModelContext`; its ``predict(batch)`` takes a
list of :class:`Record` and returns one result per record, in order: a :class:`Prediction`,
a plain ``(output, new_state)`` tuple, or a :class:`RecordError` for a record the model
refuses (it is dead-lettered with the error's message; the rest of the batch goes on).
When ``predict`` raises (or returns the wrong number of results), the engine splits the batch
and retries the halves to find the records that fail on their own: each is dead-lettered with
reason ``model_exception`` and the others go on. Only a batch in which more records fail than
``[failover] isolate_max_records`` / ``isolate_max_fraction`` allow fails as a whole and counts
against the release (daemon/engine/batch.py). So ``predict`` may be called more than once for a
record; a retry gets fresh ``Record`` objects, so what a call that raised did to them is dropped.

Optional hooks: ``warm_up()``, ``health_check() -> bool``, ``close()``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(slots=True)
class Record:
    key: str | None
    """The Kafka record key decoded as UTF-8 (None when the record has no key)."""
    value: Any
    """The decoded JSON value, already validated against the input schema."""
    state: Any = None
    """The key's current state (JSON-compatible), or None when there is none yet."""


@dataclasses.dataclass(slots=True)
class Prediction:
    output: Any
    """The output value (JSON-compatible); validated against the output schema."""
    state: Any = None
    """The key's new state, or None to keep no state for the key (stateless models)."""


class RecordError(Exception):
    """Return (not raise) an instance in place of a Prediction to dead-letter one record."""


@dataclasses.dataclass(frozen=True)
class ModelContext:
    name: str
    version: str
    digest: str
    root: Path
    """The bundle's unpacked directory."""
    data: dict[str, Path]
    """Data files by their manifest name, as absolute paths."""
    manifest: dict[str, Any]
    """The whole manifest as parsed."""
    bindings: dict[str, Path] = dataclasses.field(default_factory=dict)
    """Per-environment inputs (the manifest's ``[bindings]``) by name: the file or directory this
    environment's configuration binds each to, as absolute paths."""


def normalize(result: Any) -> Prediction | RecordError:
    """One predict result as a Prediction or RecordError; TypeError for anything else."""
    if isinstance(result, (Prediction, RecordError)):
        return result
    if isinstance(result, tuple) and len(result) == 2:
        return Prediction(result[0], result[1])
    raise TypeError(f"predict returned {type(result).__name__}; expected Prediction, (output, state) or RecordError")
