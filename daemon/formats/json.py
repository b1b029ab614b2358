"""JSON values (the default): orjson to decode and encode, the compiled JSON Schema validator.

The fast path: ``decode`` *is* ``orjson.loads`` and ``encode`` *is* ``orjson.dumps`` (the batch
code adds numpy support only after a plain dump refused a value), so choosing this format costs
nothing per record. A bundle whose schema is an ``.avsc`` is validated with that Avro schema
instead (:class:`daemon.formats.avro.AvroValidator`): JSON on the wire, Avro for the shape.
"""

from __future__ import annotations

import orjson


def json_schema_validator(schema: dict):
    """A compiled validator (jsonschema-rs: ~1 us per record where the pure-Python reference
    implementation takes ~300 us; the bundle build meta-validates schemas with ``jsonschema``)."""
    import jsonschema_rs

    return jsonschema_rs.validator_for(schema)


class JsonFormat:
    name = "json"
    decode = staticmethod(orjson.loads)
    decode_error = orjson.JSONDecodeError
    """Its dead letters have reason ``bad_json`` (the batch's default: no ``reason`` attribute)."""
    encode = staticmethod(orjson.dumps)
    prepare = None
    """Nothing to resolve before a batch."""

    def __init__(self, schema: dict, schema_kind: str = "json") -> None:
        if schema_kind == "avro":
            from daemon.formats.avro import AvroValidator

            self.validator = AvroValidator(schema)
        else:
            self.validator = json_schema_validator(schema)
