"""Avro values in the Confluent wire format, with writer schemas from a Schema Registry.

Wire format: magic byte ``0``, the writer schema's registry id (4 bytes, big-endian), the Avro
binary body. Decoding reads the body with the writer schema fetched by id (cached for the
worker's life; an id the registry does not know is asked for once and then remembered as unknown)
into the bundle's ``.avsc`` reader schema when it has one (Avro schema resolution: added fields
take their defaults, removed ones are skipped). Dead letters: ``bad_avro`` (not the wire format,
a body the writer schema cannot read, bytes left after the value), ``unknown_schema_id``, and
``schema`` (the writer schema cannot be resolved into the bundle's reader schema).

Encoding validates the output against the bundle's ``.avsc`` output schema (an output it refuses
is the record's ``output_schema`` dead letter) and writes it with the id of that schema under the
output topic's value subject ``<topic>-value``: registered there at the first batch
(``[schema_registry] subject_policy = "register"``, the default; registering an identical
schema again returns its id) or only looked up (``"lookup"``: someone else registers schemas,
e.g. the release pipeline; a schema missing there fails the batch, naming the fix).

Registry lookups happen in :meth:`AvroFormat.prepare`, once per batch before any record is
decoded. While the registry is unavailable the batch waits and retries with backoff
(:func:`daemon.formats.wait_with_backoff`); nothing is dead-lettered for it.

fastavro: the maintained, C-accelerated Avro implementation for Python.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.validation import ValidationError, validate

from daemon.formats import InvalidOutput, Undecodable, wait_with_backoff
from daemon.formats.registry import RegistryClient, RegistryUnavailable

MAGIC = 0
HEADER_BYTES = 5
_UNKNOWN = None


def schema_text(schema: dict) -> str:
    """The text failoverd registers and looks up for a bundle's Avro schema (compact JSON): the
    worker and ``release promote`` send the same text for the same ``.avsc``."""
    return json.dumps(schema, separators=(",", ":"), sort_keys=False)


def parse(schema: Any):
    """fastavro's parsed form; ``SchemaParseException``/``ValueError``/``KeyError``/``TypeError``
    when it is not a valid Avro schema (``bundle build`` says which file)."""
    return fastavro.parse_schema(schema)


def frame(schema_id: int, body: bytes) -> bytes:
    """A value in the Confluent wire format."""
    return bytes((MAGIC,)) + int(schema_id).to_bytes(4, "big") + body


def split(data: bytes) -> tuple[int, memoryview]:
    """``(schema id, body)`` of a wire-format value; :class:`Undecodable` ``bad_avro`` otherwise."""
    if len(data) < HEADER_BYTES or data[0] != MAGIC:
        head = data[:1].hex() or "empty"
        raise Undecodable("bad_avro", f"not the Confluent Avro wire format (magic byte 0, 4-byte schema id): "
                                      f"{len(data)} bytes starting 0x{head}")
    return int.from_bytes(data[1:HEADER_BYTES], "big"), memoryview(data)[HEADER_BYTES:]


class _Error:
    __slots__ = ("instance_path", "message")

    def __init__(self, message: str) -> None:
        self.instance_path = ()
        self.message = message


class AvroValidator:
    """``is_valid`` / ``iter_errors`` (as the batch code uses a JSON Schema validator) for an Avro schema."""

    def __init__(self, schema: Any) -> None:
        self.parsed = parse(schema)

    def is_valid(self, value: Any) -> bool:
        return validate(value, self.parsed, raise_errors=False)

    def iter_errors(self, value: Any):
        try:
            validate(value, self.parsed, raise_errors=True)
        except ValidationError as exc:
            for e in exc.errors:
                yield _Error(f"{e.field or '(root)'} is {e.datum!r:.80}, expected {e.schema}")


class _AlwaysValid:
    """Decoding into the reader schema (input) and encoding (output) already check the shape."""

    @staticmethod
    def is_valid(value: Any) -> bool:
        return True

    @staticmethod
    def iter_errors(value: Any):
        return iter(())


class AvroFormat:
    name = "avro"
    decode_error = Undecodable

    def __init__(self, side: str, schema: dict, schema_kind: str, spec: dict) -> None:
        registry = spec.get("registry") or {}
        if not registry.get("url"):
            raise ValueError("format avro needs [schema_registry] url (the Confluent-compatible API, e.g. "
                             "http://127.0.0.1:8081/apis/ccompat/v7 for Apicurio)")
        self.client = RegistryClient(registry["url"], username=registry.get("username") or "",
                                     password=registry.get("password") or "",
                                     timeout=float(registry.get("timeout_s") or 5.0))
        self.side = side
        if schema_kind == "avro":
            self.schema = parse(schema)
            self.text = schema_text(schema)
            self.validator = _AlwaysValid()
        elif side == "output":
            raise ValueError("[output] format = \"avro\" needs an Avro output schema in the bundle; fix: make "
                             "[schemas] output an .avsc file and rebuild the bundle")
        else:  # Avro on the wire, read with the writer's schema, checked with the bundle's JSON Schema
            from daemon.formats.json import json_schema_validator

            self.schema = None
            self.text = ""
            self.validator = json_schema_validator(schema)
        self._writers: dict[int, Any] = {}
        """schema id -> parsed writer schema, or None (the registry does not know the id)."""
        self.subject = spec.get("output_subject") or ""
        self.policy = spec.get("subject_policy") or "register"
        self._prefix: bytes | None = None
        """Magic byte + the output schema's id, once known."""
        self.prepare = self._prepare_input if side == "input" else self._prepare_output

    # ---- registry -------------------------------------------------------------------------------
    def _writer(self, schema_id: int):
        if schema_id in self._writers:
            return self._writers[schema_id]
        text = wait_with_backoff(lambda: self.client.schema_by_id(schema_id), RegistryUnavailable)
        parsed = _UNKNOWN
        if text is not None:
            try:
                parsed = parse(json.loads(text))
                if parsed == self.schema:
                    parsed = self.schema  # the reader's own schema: read without resolution (decode)
            except Exception:  # noqa: BLE001 - a registry schema fastavro cannot use: its records cannot be read
                parsed = _UNKNOWN
        self._writers[schema_id] = parsed
        return parsed

    def _prepare_input(self, items) -> None:
        """Fetch every writer schema the batch needs that is not cached (waiting out an outage)."""
        writers = self._writers
        missing = set()
        for item in items:
            value = item[1]
            if len(value) >= HEADER_BYTES and value[0] == MAGIC:
                sid = int.from_bytes(value[1:HEADER_BYTES], "big")
                if sid not in writers:
                    missing.add(sid)
        for sid in sorted(missing):
            self._writer(sid)

    def _output_id(self) -> int:
        client, subject = self.client, self.subject
        if self.policy == "lookup":
            found = wait_with_backoff(lambda: client.lookup(subject, self.text), RegistryUnavailable)
            if found is None:
                raise RuntimeError(f"the output schema is not registered under subject {subject!r} of "
                                   f"{client.url} ([schema_registry] subject_policy = \"lookup\"); fix: register "
                                   f"it (failoverd release promote does not), or set subject_policy = \"register\"")
            return found
        return wait_with_backoff(lambda: client.register(subject, self.text), RegistryUnavailable)

    def _prepare_output(self, items=()) -> None:
        if self._prefix is None:
            self._prefix = frame(self._output_id(), b"")

    # ---- per record -----------------------------------------------------------------------------
    def decode(self, data: bytes) -> Any:
        schema_id, body = split(data)
        writer = self._writers[schema_id] if schema_id in self._writers else self._writer(schema_id)
        if writer is _UNKNOWN:
            raise Undecodable("unknown_schema_id", f"schema id {schema_id} is not in the schema registry "
                                                   f"{self.client.url}")
        fo = io.BytesIO(body)
        try:
            value = fastavro.schemaless_reader(fo, writer, None if writer is self.schema else self.schema)
        except SchemaResolutionError as exc:
            raise Undecodable("schema", f"writer schema {schema_id} does not resolve into the bundle's input "
                                        f"schema: {exc}"[:500]) from None
        except EOFError:
            raise Undecodable("bad_avro", f"the Avro body ends early for schema id {schema_id} "
                                          f"({len(body)} bytes)") from None
        except Exception as exc:  # noqa: BLE001 - whatever a corrupt body makes the reader raise
            raise Undecodable("bad_avro", f"Avro body unreadable with schema id {schema_id}: "
                                          f"{type(exc).__name__}: {exc}"[:500]) from None
        left = len(body) - fo.tell()
        if left:
            raise Undecodable("bad_avro", f"{left} bytes left after the Avro value (schema id {schema_id})")
        return value

    def encode(self, value: Any) -> bytes:
        try:
            validate(value, self.schema, raise_errors=True)
        except ValidationError as exc:
            raise InvalidOutput("; ".join(f"{e.field or '(root)'} is {e.datum!r:.80}, expected {e.schema}"
                                          for e in exc.errors)[:500]) from None
        prefix = self._prefix
        if prefix is None:
            self._prepare_output()
            prefix = self._prefix or b""
        buf = io.BytesIO()
        buf.write(prefix)
        try:
            fastavro.schemaless_writer(buf, self.schema, value)
        except (TypeError, AttributeError) as exc:  # never TypeError: that means "retry as numpy JSON" upstream
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        return buf.getvalue()
