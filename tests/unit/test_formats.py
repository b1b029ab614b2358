"""The format layer without a registry: the Confluent wire format, Avro decoding and encoding with
writer schemas already cached (what the worker holds after its registry lookups), the batch with
Avro formats, the keep-alive rules and `.avsc` schemas in bundles. Registry behaviour (lookups,
unknown ids, outages) is tested against a real registry in tests/integration/test_avro.py."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time

import fastavro
import orjson
import pytest

from daemon import formats
from daemon.engine.batch import DLQ, OK, BatchProcessor
from daemon.formats import InvalidOutput, Undecodable
from daemon.formats.avro import AvroFormat, AvroValidator, frame, split
from daemon.formats.json import JsonFormat
from daemon.formats.keepalive import BadKeepAlive, RegistryWaits
from daemon.model import Prediction
from tests.conftest import ROOT

IN = {"type": "record", "name": "Tx", "fields": [{"name": "card_id", "type": "string"},
                                                 {"name": "amount", "type": "double"}]}
WRITER = {"type": "record", "name": "Tx", "fields": [{"name": "card_id", "type": "string"},
                                                     {"name": "amount", "type": "double"},
                                                     {"name": "extra", "type": "string"}]}
OUT = {"type": "record", "name": "Score", "fields": [{"name": "card_id", "type": "string"},
                                                     {"name": "score", "type": "double"}]}
SPEC = {"input": "avro", "output": "avro", "registry": {"url": "http://127.0.0.1:9/apis/ccompat/v7"},
        "output_subject": "out-value"}


def body(schema: dict, value: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), value)
    return buf.getvalue()


def avro_formats(known: dict[int, dict | None], out_id: int = 42) -> tuple[AvroFormat, AvroFormat]:
    """Formats whose registry lookups are done: writer schemas by id (None: unknown), the output id."""
    fin = AvroFormat("input", IN, "avro", SPEC)
    for sid, schema in known.items():
        fin._writers[sid] = fastavro.parse_schema(schema) if schema is not None else None
    fout = AvroFormat("output", OUT, "avro", SPEC)
    fout._prefix = frame(out_id, b"")
    return fin, fout


# ---- wire format ----------------------------------------------------------------------------------
def test_wire_format_is_magic_byte_id_big_endian_and_body():
    data = frame(258, b"xyz")
    assert data == b"\x00\x00\x00\x01\x02xyz"
    sid, rest = split(data)
    assert sid == 258 and bytes(rest) == b"xyz"


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x01", b'{"a": 1}', b"\x01\x00\x00\x00\x01abc"])
def test_values_not_in_the_wire_format_are_bad_avro(data):
    with pytest.raises(Undecodable) as err:
        split(data)
    assert err.value.reason == "bad_avro" and "wire format" in str(err.value)


# ---- Avro decode / encode -------------------------------------------------------------------------
def test_decode_reads_the_writer_schema_into_the_reader_schema():
    fin, _ = avro_formats({7: WRITER})
    value = fin.decode(frame(7, body(WRITER, {"card_id": "c1", "amount": 2.5, "extra": "dropped"})))
    assert value == {"card_id": "c1", "amount": 2.5}


def test_decode_dead_letter_reasons():
    fin, _ = avro_formats({7: WRITER, 8: None, 9: {"type": "record", "name": "Tx", "fields": [
        {"name": "card_id", "type": "string"}]}})
    good = body(WRITER, {"card_id": "c1", "amount": 2.5, "extra": "x"})
    cases = {
        "unknown_schema_id": frame(8, good),
        "bad_avro": frame(7, good[:-2]),  # cut short
        "schema": frame(9, body({"type": "record", "name": "Tx", "fields": [{"name": "card_id", "type": "string"}]},
                                {"card_id": "c1"})),  # no amount, and the reader schema has no default for it
    }
    for reason, data in cases.items():
        with pytest.raises(Undecodable) as err:
            fin.decode(data)
        assert err.value.reason == reason, (reason, str(err.value))
    with pytest.raises(Undecodable) as err:
        fin.decode(frame(7, good + b"\x00\x00"))
    assert err.value.reason == "bad_avro" and "2 bytes left" in str(err.value)


def test_encode_validates_then_writes_the_output_schema_id():
    _, fout = avro_formats({})
    data = fout.encode({"card_id": "c1", "score": 0.5})
    sid, rest = split(data)
    assert sid == 42
    assert fastavro.schemaless_reader(io.BytesIO(rest), fastavro.parse_schema(OUT)) == {"card_id": "c1", "score": 0.5}
    with pytest.raises(InvalidOutput) as err:
        fout.encode({"card_id": "c1", "score": "high"})
    assert "Score.score" in str(err.value)


def test_avro_output_needs_an_avro_schema():
    with pytest.raises(ValueError, match="needs an Avro output schema"):
        AvroFormat("output", {"type": "object"}, "json", SPEC)
    with pytest.raises(ValueError, match="schema_registry"):
        AvroFormat("input", IN, "avro", {})


def test_json_format_with_an_avsc_schema_validates_with_avro():
    fmt = JsonFormat(IN, "avro")
    assert fmt.validator.is_valid({"card_id": "c", "amount": 1.0})
    assert not fmt.validator.is_valid({"card_id": "c", "amount": "x"})
    errors = list(AvroValidator(IN).iter_errors({"card_id": "c", "amount": "x"}))
    assert errors and "Tx.amount" in errors[0].message
    assert fmt.decode is orjson.loads and fmt.prepare is None  # the JSON fast path, unchanged


# ---- the batch with Avro formats ----------------------------------------------------------------
class Scorer:
    def predict(self, batch):
        out = []
        for r in batch:
            count = (r.state or {}).get("count", 0) + 1
            score = "bad" if r.value["card_id"] == "invalid-out" else r.value["amount"] / 10
            out.append(Prediction({"card_id": r.value["card_id"], "score": score}, {"count": count}))
        return out


def test_batch_decodes_avro_and_encodes_avro_with_dead_letters_per_record():
    fin, fout = avro_formats({7: WRITER, 8: None})
    bp = BatchProcessor(Scorer(), IN, OUT, None, fin, fout)
    enc = lambda card: frame(7, body(WRITER, {"card_id": card, "amount": 5.0, "extra": ""}))  # noqa: E731
    items = [(b"k1", enc("c1"), 0), (b"k1", enc("invalid-out"), 0), (b"k1", enc("c1"), 0),
             (None, frame(8, b"\x02"), -1), (None, b"not avro", -1)]
    results, states = bp.process(items, [None])
    assert results[0][0] == OK and split(results[0][1])[0] == 42
    assert results[1][:2] == (DLQ, "output_schema")
    assert results[2][0] == OK
    assert results[3][:2] == (DLQ, "unknown_schema_id")
    assert results[4][:2] == (DLQ, "bad_avro")
    # the dead-lettered output left its key's state alone: two outputs, count 2
    assert orjson.loads(states[0]) == {"count": 2}


def test_batch_prepare_fetches_each_missing_writer_schema_once_before_decoding():
    fin, fout = avro_formats({})
    fetched = []

    def writer(sid):
        fetched.append(sid)
        fin._writers[sid] = fastavro.parse_schema(WRITER)
        return fin._writers[sid]

    fin._writer = writer
    bp = BatchProcessor(Scorer(), IN, OUT, None, fin, fout)
    item = frame(5, body(WRITER, {"card_id": "c", "amount": 1.0, "extra": ""}))
    results, _ = bp.process([(None, item, -1)] * 3 + [(None, frame(6, item[5:]), -1)], [])
    assert fetched == [5, 6] and all(r[0] == OK for r in results)
    bp.process([(None, item, -1)], [])
    assert fetched == [5, 6]  # cached


# ---- waiting for the registry --------------------------------------------------------------------
def test_wait_with_backoff_retries_until_the_registry_answers_and_says_so_meanwhile():
    class Down(Exception):
        pass

    calls = []
    seen = []

    def attempt():
        calls.append(time.monotonic())
        seen.append((formats.WAITING.since > 0, formats.WAITING.detail))
        if len(calls) < 3:
            raise Down("connection refused")
        return "schema"

    assert formats.wait_with_backoff(attempt, Down, first=0.01) == "schema"
    assert len(calls) == 3 and seen[0] == (True, "") and seen[1] == (True, "connection refused")
    assert formats.WAITING.since == 0 and formats.WAITING.detail == ""


def test_keep_alives_only_from_workers_that_use_a_registry():
    with pytest.raises(BadKeepAlive):
        RegistryWaits("active", allowed=False).waiting(("waiting", "x"))
    waits = RegistryWaits("active", allowed=True)
    with pytest.raises(BadKeepAlive):
        waits.waiting(("waiting", 3))
    t = waits.waiting(("waiting", "schema registry unavailable"))
    assert t <= time.monotonic()
    waits.over()


def test_the_keep_alive_thread_never_writes_after_the_answer():
    """The worker's keep-alive thread checks WAITING under the send lock (worker_main._keep_alive)."""
    from daemon.engine import framing, worker_main

    out = io.BytesIO()
    lock = threading.Lock()
    threading.Thread(target=worker_main._keep_alive, args=(out, lock), daemon=True).start()
    formats.WAITING.begin("down")
    deadline = time.monotonic() + 5
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    with lock:
        formats.WAITING.end()
        size = len(out.getvalue())
    time.sleep(0.6)
    assert len(out.getvalue()) == size > 0
    frame_ = out.getvalue()
    assert framing.decode(frame_[4:4 + framing.HEADER.unpack(frame_[:4])[0]]) == ("waiting", "down")


# ---- bundles ------------------------------------------------------------------------------------
def test_bundle_build_validates_avsc_schemas(tmp_path):
    from daemon.bundle import build
    from daemon.errors import BundleError

    src = tmp_path / "fraud-avro"
    shutil.copytree(ROOT / "examples" / "bundles" / "fraud-avro", src)
    built = build(src, tmp_path / "out")
    assert built.path.is_file()
    (src / "schemas" / "output.avsc").write_text(json.dumps({"type": "record", "name": "S", "fields": [
        {"name": "a", "type": "no-such-type"}]}))
    with pytest.raises(BundleError, match=r"output = 'schemas/output.avsc': not a valid Avro schema"):
        build(src, tmp_path / "out")
    (src / "schemas" / "output.avsc").write_text('"string"')
    with pytest.raises(BundleError, match="must be a record"):
        build(src, tmp_path / "out")


def test_avro_format_needs_a_registry_url_in_the_configuration(tmp_path):
    from daemon import config
    from daemon.errors import ConfigError

    path = tmp_path / "f.toml"
    path.write_text('[inputs]\ntopics = ["a"]\nformat = "avro"\n[output]\ntopic = "b"\n[dead_letter]\ntopic = "c"\n')
    with pytest.raises(ConfigError, match=r"schema_registry.url is missing.*inputs.format = \"avro\""):
        config.load(path, env={})
