"""Pure batch processing, run where the model lives (worker subprocess or executor thread).

Input: a batch of ``(key, value_bytes, skey)`` items plus the current state (JSON bytes or
None) of each distinct state key ``skey``. Output: one result per item and the final state
of every state key the batch touched. Records sharing a key are fed to the model in *waves*
(one occurrence of each key per ``predict`` call) so that the second record of a key sees
the state the first one produced, exactly as if records were processed one by one.

Result tuples (kept as plain tuples: they cross a pipe):
    (OK, output_bytes)
    (DLQ, reason, detail)      reason: bad_json | schema | model_error | output_schema
"""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import orjson

from daemon.model import Prediction, Record, RecordError, normalize

OK = 0
DLQ = 1

NO_STATE = -1


def make_validator(schema: dict):
    """A compiled validator (jsonschema-rs: ~1 us per record where the pure-Python reference
    implementation takes ~300 us; the bundle build meta-validates schemas with ``jsonschema``)."""
    return jsonschema_rs.validator_for(schema)


def _describe_error(validator, value: Any) -> str:
    """The DLQ detail for a value ``validator.is_valid`` rejected (the slow path only)."""
    err = next(iter(validator.iter_errors(value)), None)
    if err is None:  # pragma: no cover - is_valid and iter_errors disagree
        return "invalid"
    path = "/".join(str(p) for p in err.instance_path) or "(root)"
    return f"{path}: {err.message}"[:500]


class BatchProcessor:
    """Runs one model on batches; the same code serves subprocess and in-process workers.

    ``process`` is the model worker's hot path, so it is written for per-record cost: globals
    and bound methods are hoisted into locals, ``is_valid`` is called inline (the error text is
    only built for invalid values), the common case of a batch whose state keys are all
    distinct skips the wave bookkeeping (one ``predict`` call over the records in order), and
    plain ``Prediction`` / ``(output, state)`` results skip :func:`normalize`.
    """

    def __init__(self, model: Any, input_schema: dict, output_schema: dict) -> None:
        self.model = model
        self.input_validator = make_validator(input_schema)
        self.output_validator = make_validator(output_schema)
        self._last: list[Any] | None = None
        """The decoded states the last batch left, by its skey (what the next batch may carry)."""

    def process(self, items: list[tuple[bytes | None, bytes, int]], states: list[bytes | None],
                carry: list[tuple[int, int]] | tuple = ()) -> tuple[list[tuple], dict[int, bytes | None]]:
        """``carry``: ``(skey, previous_skey)`` pairs whose state is the one the previous call left
        for ``previous_skey`` (the daemon sends the next batch before it has stored the previous
        batch's states; calls arrive in order)."""
        last, self._last = self._last, None  # a failing batch leaves nothing to carry
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        input_validator = self.input_validator
        is_valid = input_validator.is_valid
        results: list[tuple | None] = [None] * len(items)
        # current[NO_STATE] (the extra last slot) is always None: keyless records read it, and
        # it is never written (NO_STATE results touch no state).
        current: list[Any] = [loads(s) if s is not None else None for s in states]
        current.append(None)
        if carry:
            if last is None:
                raise RuntimeError("a batch carries state from a previous batch this worker did not finish")
            for skey, previous in carry:
                current[skey] = last[previous]

        # Pass 1: decode and validate; the valid records as three parallel lists.
        positions: list[int] = []
        records: list[Record] = []
        skeys: list[int] = []
        for i, (key, raw, skey) in enumerate(items):
            try:
                value = loads(raw)
            except decode_error as exc:
                results[i] = (DLQ, "bad_json", str(exc)[:500])
                continue
            if not is_valid(value):
                results[i] = (DLQ, "schema", _describe_error(input_validator, value))
                continue
            positions.append(i)
            records.append(Record(key.decode("utf-8", "replace") if key is not None else None, value,
                                  current[skey]))
            skeys.append(skey)

        updated: dict[int, Any] = {}  # state key -> latest new state (decoded)
        distinct = set(skeys)
        distinct.discard(NO_STATE)
        if not records:
            pass  # nothing valid: the model is not called
        elif len(distinct) + skeys.count(NO_STATE) == len(skeys):
            # Fast path: no state key repeats, so the whole batch is wave 0, in item order.
            self._run_wave(records, positions, skeys, results, current, updated)
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
                self._run_wave(wave_records, [positions[n] for n in wave_members], wave_skeys,
                               results, current, updated)

        dumps = orjson.dumps
        new_states = {s: (dumps(v) if v is not None else None) for s, v in updated.items()}
        self._last = current
        return results, new_states  # type: ignore[return-value]

    def _run_wave(self, records: list[Record], positions: list[int], skeys: list[int],
                  results: list, current: list, updated: dict) -> None:
        """One ``predict`` call over records with distinct state keys; fills their results."""
        predictions = self.model.predict(records)
        if len(predictions) != len(positions):
            raise RuntimeError(f"predict returned {len(predictions)} results for {len(positions)} records")
        output_validator = self.output_validator
        is_valid = output_validator.is_valid
        dumps = orjson.dumps
        for i, skey, raw_result in zip(positions, skeys, predictions):
            kind = type(raw_result)
            if kind is Prediction:
                output = raw_result.output
                state = raw_result.state
            elif kind is tuple and len(raw_result) == 2:
                output, state = raw_result
            else:
                result = normalize(raw_result)
                if isinstance(result, RecordError):
                    results[i] = (DLQ, "model_error", (str(result) or type(result).__name__)[:500])
                    continue
                output = result.output
                state = result.state
            if not is_valid(output):
                results[i] = (DLQ, "output_schema", _describe_error(output_validator, output))
                continue
            results[i] = (OK, dumps(output))
            if skey != NO_STATE:
                current[skey] = state
                updated[skey] = state
