"""Pure batch processing, run where the model lives (worker subprocess or executor thread).

Input: a batch of ``(key, value_bytes, skey)`` items plus the current state (JSON bytes or
None) of each distinct state key ``skey``. Output: one result per item and the final state
of every state key the batch touched. Records sharing a key are fed to the model in *waves*
(one occurrence of each key per ``predict`` call) so that the second record of a key sees
the state the first one produced, exactly as if records were processed one by one.

Result tuples (kept as plain tuples: they cross a pipe):
    (OK, output_bytes)
    (DLQ, reason, detail)      reason: bad_json | schema | model_error | output_schema | model_exception

Poison records (the processing-exception handler of Kafka Streams' KIP-1033, made automatic):
when a wave's ``predict`` raises or returns the wrong number of results, the wave is split in
halves and each half is retried, recursively, until the records that fail on their own are
found; each becomes a dead letter ``(DLQ, "model_exception", "<ExceptionType>: <text>")`` and
the others get their outputs. An output or new state that cannot be encoded as JSON (or a
result of the wrong type) is that record's ``model_exception`` dead letter, found without
retrying, since every result is encoded on its own. Only when more records fail on their own
than :class:`IsolationLimits` allow does the batch fail as a whole (the release is at fault,
not a few records): splitting stops at that moment, so a model that raises on everything costs
about ``2 * (allowed + 1) + log2(batch size)`` calls, not one per record.

State stays exact through all of it. A dead-lettered record (``model_exception``,
``model_error`` or ``output_schema``) never changes its key's state: later waves and the next
batch see the state from before that record, decoded afresh from the bytes it was stored as.
The rule for the retry path: once an attempt has failed, the model is only given **fresh
objects** -- values and states decoded again from the input bytes and from the state bytes the
wave started from (the batch's input state, or the encoded state an earlier wave produced) --
so a failed attempt that mutated ``record.state`` or ``record.value`` in place leaves no trace.
The first attempt of a wave (the fast path) gets the decoded objects as they are, without copies.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jsonschema_rs
import orjson

from daemon.formats import InvalidOutput
from daemon.model import Prediction, Record, RecordError, normalize

OK = 0
DLQ = 1

NO_STATE = -1


@dataclasses.dataclass(frozen=True)
class IsolationLimits:
    """How many records of one batch may fail on their own (``model_exception`` dead letters)
    before the batch fails as a whole and counts against the release (``[failover]``
    ``isolate_max_records`` / ``isolate_max_fraction``, docs/configuration.md)."""

    max_records: int = 10
    """At most this many per batch; 0 turns isolation off (any failure fails the batch)."""
    max_fraction: float = 0.1
    """And at most this share of the batch's valid records -- but one record is always allowed."""

    def allowed(self, records: int) -> int:
        return min(self.max_records, max(1, int(self.max_fraction * records)))


class IsolationLimitExceeded(RuntimeError):
    """More records of one batch failed on their own than :class:`IsolationLimits` allow."""


class ResultCountError(RuntimeError):
    """``predict`` returned a different number of results than it was given records."""


def make_validator(schema: dict[str, Any]) -> Any:
    """A compiled validator (jsonschema-rs: ~1 us per record where the pure-Python reference
    implementation takes ~300 us; the bundle build meta-validates schemas with ``jsonschema``)."""
    return jsonschema_rs.validator_for(schema)


def _numpy_default(obj: Any) -> Any:
    """What orjson's numpy support leaves out: 0-d, non-contiguous and str/object arrays."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"Type is not JSON serializable: {type(obj).__module__}.{type(obj).__qualname__}")


def encode_numpy(value: Any) -> tuple[bytes, Any]:
    """``(JSON bytes, the plain value they decode to)`` of an output or state holding numpy scalars
    (``np.float32``, ``np.int64``, ``np.bool_``, ...) or arrays, as scikit-learn, XGBoost and ONNX
    Runtime return them; NaN and infinities become ``null`` as orjson writes them. Only called
    after plain ``orjson.dumps`` refused the value, so plain-Python results never pay for it.
    TypeError for anything still not JSON data (``complex``, arbitrary objects)."""
    encoded = orjson.dumps(value, default=_numpy_default, option=orjson.OPT_SERIALIZE_NUMPY)
    return encoded, orjson.loads(encoded)


def _describe_error(validator: Any, value: Any) -> str:
    """The DLQ detail for a value ``validator.is_valid`` rejected (the slow path only)."""
    err = next(iter(validator.iter_errors(value)), None)
    if err is None:  # pragma: no cover - is_valid and iter_errors disagree
        return "invalid"
    path = "/".join(str(p) for p in err.instance_path) or "(root)"
    return f"{path}: {err.message}"[:500]


def _exception_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class _Run:
    """One ``process`` call's working set, shared by its waves and their retries."""

    __slots__ = ("items", "results", "current", "raw", "updated", "allowed", "records", "failed", "first",
                 "max_output")

    def __init__(self, items: list[tuple[bytes | None, bytes, int]], results: list[tuple[Any, ...] | None],
                 current: list[Any], raw: list[bytes | None], allowed: int, records: int, max_output: int = 0) -> None:
        self.items = items
        self.max_output = max_output
        """Largest key + encoded output the output topic takes with the daemon's headers (0: no limit)."""
        self.results = results
        self.current = current
        """Decoded state by skey, as the model sees it next (the extra last slot: NO_STATE, always None)."""
        self.raw = raw
        """The same states as bytes (what ``current`` decodes to afresh; never written for NO_STATE)."""
        self.updated: dict[int, bytes | None] = {}
        """State keys this batch changed -> their encoded new state."""
        self.allowed = allowed
        self.records = records
        self.failed = 0
        self.first = ""


class BatchProcessor:
    """Runs one model on batches; the same code serves subprocess and in-process workers.

    ``process`` is the model worker's hot path, so it is written for per-record cost: globals
    and bound methods are hoisted into locals, ``is_valid`` is called inline (the error text is
    only built for invalid values), the common case of a batch whose state keys are all
    distinct skips the wave bookkeeping (one ``predict`` call over the records in order), and
    plain ``Prediction`` / ``(output, state)`` results skip :func:`normalize`. The isolation of
    poison records (module docstring) runs only after a failure.
    """

    def __init__(self, model: Any, input_schema: dict[str, Any], output_schema: dict[str, Any],
                 isolation: IsolationLimits | None = None, input_format: Any = None, output_format: Any = None) -> None:
        self.model = model
        # ``[inputs] format`` / ``[output] format`` (daemon.formats); None: JSON, the fast path as it was
        self.input_validator = input_format.validator if input_format else make_validator(input_schema)
        self.output_validator = output_format.validator if output_format else make_validator(output_schema)
        self.decode = input_format.decode if input_format else orjson.loads
        self.decode_error = input_format.decode_error if input_format else orjson.JSONDecodeError
        self.encode = output_format.encode if output_format else orjson.dumps
        self.prepare = [f.prepare for f in (input_format, output_format) if f is not None and f.prepare]
        """Registry lookups a batch needs, done before any of it is decoded (they may wait out an outage)."""
        self.isolation = isolation or IsolationLimits()
        self.splits = 0
        """Failing groups of records split in halves so far (all batches)."""
        self._last: list[Any] | None = None
        """The decoded states the last batch left, by its skey (what the next batch may carry)."""
        self._last_raw: list[bytes | None] | None = None
        """The same states, encoded (a carried state's fresh copy on the retry path)."""

    def process(self, items: list[tuple[bytes | None, bytes, int]], states: list[bytes | None],
                carry: list[tuple[int, int]] | tuple[()] = (), max_output: int = 0
                ) -> tuple[list[tuple[Any, ...]], dict[int, bytes | None]]:
        """``carry``: ``(skey, previous_skey)`` pairs whose state is the one the previous call left
        for ``previous_skey`` (the daemon sends the next batch before it has stored the previous
        batch's states; calls arrive in order). ``max_output``: the largest key plus encoded output
        the output topic accepts with the daemon's headers; a larger one is that record's dead
        letter ``output_oversized`` and leaves its key's state as it was (0: no limit)."""
        for prepare in self.prepare:
            prepare(items)
        last, self._last = self._last, None  # a failing batch leaves nothing to carry
        last_raw, self._last_raw = self._last_raw, None
        loads = orjson.loads
        decode = self.decode
        decode_error = self.decode_error
        input_validator = self.input_validator
        is_valid = input_validator.is_valid
        results: list[tuple[Any, ...] | None] = [None] * len(items)
        # current[NO_STATE] (the extra last slot) is always None: keyless records read it, and
        # it is never written (NO_STATE results touch no state).
        current: list[Any] = [loads(s) if s is not None else None for s in states]
        current.append(None)
        raw: list[bytes | None] = list(states)
        raw.append(None)
        if carry:
            if last is None or last_raw is None:
                raise RuntimeError("a batch carries state from a previous batch this worker did not finish")
            for skey, previous in carry:
                current[skey] = last[previous]
                raw[skey] = last_raw[previous]

        # Pass 1: decode and validate; the valid records as three parallel lists.
        positions: list[int] = []
        records: list[Record] = []
        skeys: list[int] = []
        for i, (key, value_raw, skey) in enumerate(items):
            try:
                value = decode(value_raw)
            except decode_error as exc:
                results[i] = (DLQ, getattr(exc, "reason", "bad_json"), str(exc)[:500])
                continue
            if not is_valid(value):
                results[i] = (DLQ, "schema", _describe_error(input_validator, value))
                continue
            positions.append(i)
            records.append(Record(key.decode("utf-8", "replace") if key is not None else None, value,
                                  current[skey]))
            skeys.append(skey)

        run = _Run(items, results, current, raw, self.isolation.allowed(len(records)), len(records), max_output)
        distinct = set(skeys)
        distinct.discard(NO_STATE)
        if not records:
            pass  # nothing valid: the model is not called
        elif len(distinct) + skeys.count(NO_STATE) == len(skeys):
            # Fast path: no state key repeats, so the whole batch is wave 0, in item order.
            self._run_wave(run, records, positions, skeys)
        else:
            # Wave w holds the (w+1)-th occurrence of each state key; NO_STATE is always wave 0.
            waves: list[list[int]] = []
            seen: dict[int, int] = {}
            for n, skey in enumerate(skeys):
                if skey == NO_STATE:
                    wave = 0
                else:
                    wave = seen.get(skey, 0)
                    seen[skey] = wave + 1
                if wave == len(waves):
                    waves.append([])
                waves[wave].append(n)
            for w, wave_members in enumerate(waves):
                wave_records = [records[n] for n in wave_members]
                wave_skeys = [skeys[n] for n in wave_members]
                if w:  # wave 0 read its state when its records were built
                    for record, skey in zip(wave_records, wave_skeys):
                        record.state = current[skey]
                self._run_wave(run, wave_records, [positions[n] for n in wave_members], wave_skeys)

        self._last = current
        self._last_raw = raw
        return results, run.updated  # type: ignore[return-value]

    def _run_wave(self, run: _Run, records: list[Record], positions: list[int], skeys: list[int]) -> None:
        """One ``predict`` call over records with distinct state keys; on failure, isolate."""
        try:
            predictions = self.model.predict(records)
            if len(predictions) != len(records):
                raise ResultCountError(f"predict returned {len(predictions)} results for {len(records)} records")
        except Exception as exc:  # noqa: BLE001 - the model's own failure, whatever it is
            if not run.allowed:
                raise  # isolation is off: the batch fails as before
            self._bisect(run, list(zip(positions, skeys)), exc)
            return
        self._apply(run, predictions, positions, skeys)

    def _apply(self, run: _Run, predictions: Any, positions: list[int], skeys: list[int]) -> None:
        """Check and encode each result on its own; fill the results and the state of its key."""
        results, current, raw, updated = run.results, run.current, run.raw, run.updated
        output_validator = self.output_validator
        is_valid = output_validator.is_valid
        dumps = orjson.dumps
        encode = self.encode
        for i, skey, raw_result in zip(positions, skeys, predictions):
            kind = type(raw_result)
            if kind is Prediction:
                output = raw_result.output
                state = raw_result.state
            elif kind is tuple and len(raw_result) == 2:
                output, state = raw_result
            else:
                try:
                    result = normalize(raw_result)
                except TypeError as exc:
                    self._dead(run, i, skey, str(exc), exc)
                    continue
                if isinstance(result, RecordError):
                    results[i] = (DLQ, "model_error", (str(result) or type(result).__name__)[:500])
                    self._restore(run, skey)
                    continue
                output = result.output
                state = result.state
            try:
                try:
                    encoded = encode(output)
                except TypeError:  # numpy scalars/arrays: encoded natively, validated as the JSON they become
                    encoded, output = encode_numpy(output)
                valid = is_valid(output)
            except InvalidOutput as exc:  # a format that validates while it encodes (avro)
                results[i] = (DLQ, "output_schema", str(exc)[:500])
                self._restore(run, skey)
                continue
            except (TypeError, ValueError) as exc:  # orjson: TypeError; jsonschema-rs: ValueError
                self._dead(run, i, skey, f"output is not JSON data: {exc}", exc)
                continue
            if not valid:
                results[i] = (DLQ, "output_schema", _describe_error(output_validator, output))
                self._restore(run, skey)
                continue
            if run.max_output:
                key = run.items[i][0]
                size = len(encoded) + (len(key) if key is not None else 0)
                if size > run.max_output:  # the broker would refuse it, and again on every replay
                    results[i] = (DLQ, "output_oversized", f"output of {len(encoded)} bytes (with its key {size}) "
                                                           f"exceeds the {run.max_output} bytes the output topic "
                                                           "accepts beside the provenance headers")
                    self._restore(run, skey)
                    continue
            if skey != NO_STATE:
                try:
                    try:
                        state_bytes = dumps(state) if state is not None else None
                    except TypeError:  # numpy, as for outputs; the next wave sees the JSON it became
                        state_bytes, state = encode_numpy(state)
                except TypeError as exc:
                    self._dead(run, i, skey, f"new state is not JSON data: {exc}", exc)
                    continue
                current[skey] = state
                raw[skey] = state_bytes
                updated[skey] = state_bytes
            results[i] = (OK, encoded)

    # ---- the retry path: only after a failure --------------------------------------------------
    def _bisect(self, run: _Run, members: list[tuple[int, int]], exc: Exception) -> None:
        """``members`` (``(position, skey)`` pairs) failed together with ``exc``: find who fails alone."""
        if len(members) == 1:
            position, skey = members[0]
            self._dead(run, position, skey, _exception_text(exc), exc)
            return
        self.splits += 1
        half = len(members) // 2
        for part in (members[:half], members[half:]):
            error = self._attempt(run, part)
            if error is not None:
                self._bisect(run, part, error)

    def _attempt(self, run: _Run, members: list[tuple[int, int]]) -> Exception | None:
        """One ``predict`` call on fresh copies of these records; applies its results, or returns its error."""
        loads = orjson.loads
        decode = self.decode
        items, raw = run.items, run.raw
        records = []
        for position, skey in members:
            key, value_raw, _ = items[position]
            state_raw = raw[skey]
            records.append(Record(key.decode("utf-8", "replace") if key is not None else None, decode(value_raw),
                                  loads(state_raw) if state_raw is not None else None))
        try:
            predictions = self.model.predict(records)
            if len(predictions) != len(records):
                raise ResultCountError(f"predict returned {len(predictions)} results for {len(records)} records")
        except Exception as exc:  # noqa: BLE001
            return exc
        self._apply(run, predictions, [p for p, _ in members], [s for _, s in members])
        return None

    def _dead(self, run: _Run, position: int, skey: int, detail: str, exc: Exception) -> None:
        """One record failed on its own: its dead letter -- or, past the limits, the batch's failure."""
        run.failed += 1
        if run.failed > run.allowed:
            if not run.allowed:
                raise exc  # isolation is off: the batch fails with the model's own error, as before
            limits = self.isolation
            raise IsolationLimitExceeded(
                f"{run.failed} of {run.records} records failed in the model on their own, more than the "
                f"{run.allowed} a batch may dead-letter (failover.isolate_max_records = {limits.max_records}, "
                f"failover.isolate_max_fraction = {limits.max_fraction}): the release is at fault, not the "
                f"records; first failure: {run.first}") from exc
        if not run.first:
            run.first = detail[:300]
        run.results[position] = (DLQ, "model_exception", detail[:500])
        self._restore(run, skey)

    @staticmethod
    def _restore(run: _Run, skey: int) -> None:
        """A dead-lettered record's key keeps its state from before the record, as a fresh object
        (the model may have mutated the one it was given)."""
        if skey != NO_STATE:
            state_raw = run.raw[skey]
            run.current[skey] = orjson.loads(state_raw) if state_raw is not None else None
