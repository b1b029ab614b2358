"""Hostile records with a good release, all in one run: each costs at most its own dead letter.

A record the model cannot take (not JSON, not UTF-8, nested past any parser's limit, larger than
``[dead_letter] max_value_bytes``, a tombstone) is a dead letter with the original bytes; a record
the Kafka client cannot parse (a header key that is not UTF-8) is a dead letter ``undecodable``; odd
but legal records (no key, a key that is not UTF-8, duplicate, many or huge headers) are outputs.
None of them may cost a failover, stop the pipeline or lose another record.
"""

from __future__ import annotations

import orjson

from tests.hostile import harness as h

MAX_VALUE = 65536
BROKER_MAX = 1048588
"""The broker's default max.message.bytes (the suite's topics keep it)."""


def _txn(seq: int, **extra) -> bytes:
    return orjson.dumps({"card_id": f"card-x{seq}", "amount": 12.5, "features": [0.1] * 8, "seq": seq, **extra})


def _deep_txn(seq: int, depth: int) -> bytes:
    """A valid transaction with a field nested ``depth`` deep (orjson cannot dump that deep)."""
    return _txn(seq)[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}"


# label: (key, value, headers, expected): "output", "any" or the dead letter's accepted reasons
HOSTILE = {
    "not_json": (b"card-h1", b"{not json", [], {"bad_json"}),
    "not_utf8": (b"card-h2", b'{"card_id": "\xff\xfe", "amount": 1, "features": []}', [], {"bad_json"}),
    "empty_value": (b"card-h3", b"", [], {"bad_json"}),
    "nested_10000_deep": (b"card-h4", b"[" * 10000 + b"]" * 10000, [], {"bad_json"}),
    "nested_200_deep_valid": (b"card-h5", _deep_txn(100_005, 200), [], "output"),
    # at orjson's depth limit (1024): an output, or a dead letter of any reason, but nothing worse
    "nested_1000_deep_valid": (b"card-h18", _deep_txn(100_018, 1000), [], "any"),
    "too_large": (b"card-h6", _txn(100_006, pad="x" * (MAX_VALUE + 1000)), [], {"oversized"}),
    "tombstone": (b"card-h7", None, [], {"bad_json"}),
    "key_none": (None, _txn(100_008), [], "output"),
    "key_not_utf8": (b"\xff\xfe\xfd", _txn(100_009), [], "output"),
    "header_key_not_utf8": (b"card-h10", _txn(100_010), [(b"\xff\xfebad-key", b"v")], {"undecodable"}),
    "header_key_not_utf8_no_json": (b"card-h11", b"{not json", [(b"\xc3\x28", b"v")], {"undecodable", "bad_json"}),
    "duplicate_headers": (b"card-h12", _txn(100_012), [(b"h", b"1"), (b"h", b"2")], "output"),
    "duplicate_headers_no_json": (b"card-h13", b"{not json", [(b"h", b"1"), (b"h", b"2")], {"bad_json"}),
    "header_value_none": (b"card-h14", _txn(100_014), [(b"h", None)], "output"),
    "many_headers": (b"card-h15", _txn(100_015), [(f"h{i}".encode(), b"v") for i in range(5000)], "output"),
    "huge_header": (b"card-h16", _txn(100_016), [(b"big", b"y" * 900_000)], "output"),
    # a dead letter copies the input's headers: this one would be larger than the broker accepts
    "huge_header_no_json": (b"card-h17", b"{not json", [(b"big", b"z" * (BROKER_MAX - 200))],
                            {"bad_json", "oversized"}),
}


async def test_hostile_records_each_cost_at_most_a_dead_letter(kafka_bootstrap, tmp_path, good_bundle):
    active = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION, source=h.model_source())
    run = await h.start(kafka_bootstrap, tmp_path, active=active, standby=good_bundle, prefix="hrec",
                        dead_letter={"max_value_bytes": MAX_VALUE})
    d = run.daemon
    checks = h.Checks()
    normal = h.transactions(1000, seed=31)
    try:
        await h.produce(kafka_bootstrap, run.names["input"], normal[:300], run.sent)
        await h.produce(kafka_bootstrap, run.names["input"], [v[:3] for v in HOSTILE.values()], run.sent,
                        labels=list(HOSTILE), raw_headers=True)
        await h.produce(kafka_bootstrap, run.names["input"], normal[300:], run.sent)
        outputs, dead = await checks.every_run(run)
        await checks("each hostile record ends as expected", _each_as_expected, run, outputs, dead)
        await checks("per-card state carried exactly once (counts 1, 2, 3...)", h.streams.assert_counts_chain,
                     outputs)
        await checks("no failover, no dead letter for a normal record", _release_untouched, run, outputs, dead)
        if d.alive():
            await checks("SIGTERM: exit 0, no process of the daemon left", run.stop)
    finally:
        if d.alive():
            d.kill9()
    checks.raise_if_any(d.log())


def _each_as_expected(run: h.Run, outputs: list, dead: list) -> None:
    by_pos = {h.streams.source_position(r): r for r in outputs + dead}
    problems = []
    for label, (_, _, _, expected) in HOSTILE.items():
        r = by_pos.get(run.sent.labels[label])
        if r is None:
            problems.append(f"{label}: neither output nor dead letter")
        elif expected == "any":
            pass
        elif expected == "output":
            if r not in outputs:
                problems.append(f"{label}: expected an output, got dead letter {h.reason_of(r)}: {h.detail_of(r)[:150]}")
        elif r not in dead or h.reason_of(r) not in expected:
            got = f"dead letter {h.reason_of(r)}: {h.detail_of(r)[:150]}" if r in dead else "an output"
            problems.append(f"{label}: expected a dead letter {sorted(expected)}, got {got}")
        elif label == "duplicate_headers_no_json":
            copied = [(k, v) for k, v in r.headers if k == "h"]
            if copied != [("h", b"1"), ("h", b"2")]:
                problems.append(f"{label}: the dead letter's copy of the input's headers is {copied}")
    assert not problems, "; ".join(problems)


def _release_untouched(run: h.Run, outputs: list, dead: list) -> None:
    fo = h.failovers(run.daemon.log())
    assert not fo, f"a bad record cost a failover: {fo[:2]}"
    hostile = set(run.sent.labels.values())
    innocent = [h.streams.source_position(r) for r in dead if h.streams.source_position(r) not in hostile]
    assert not innocent, f"{len(innocent)} normal records were dead-lettered, e.g. {innocent[:5]}"
    versions = {h.release_of(r) for r in outputs}
    assert versions == {h.HOSTILE_VERSION}, f"outputs came from {sorted(versions)}"
