"""Synthetic card transactions and the checks every exactly-once test makes on the output."""

from __future__ import annotations

import collections
import random

import orjson

from daemon.engine import headers as H


def transaction(rng: random.Random, n_cards: int, i: int) -> tuple[bytes, bytes]:
    card = f"card-{rng.randrange(n_cards)}"
    value = {"card_id": card, "merchant_id": rng.choice(["m-grocery", "m-fuel", "m-giftcards", "m-travel"]),
             "amount": round(rng.uniform(1, 500), 2), "features": [round(rng.random(), 3) for _ in range(8)],
             "seq": i}
    return card.encode(), orjson.dumps(value)


def transactions(n: int, *, seed: int = 7, n_cards: int = 50) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [transaction(rng, n_cards, i) for i in range(n)]


def source_position(record) -> tuple[int, int]:
    h = H.as_dict(record.headers)
    return int(h[H.H_SOURCE_PARTITION]), int(h[H.H_SOURCE_OFFSET])


def assert_exactly_once(inputs: dict[tuple[int, int], bytes], outputs: list, dead: list) -> None:
    """Every input position appears exactly once across outputs and dead letters."""
    seen = collections.Counter(source_position(r) for r in outputs + dead)
    dups = {pos: n for pos, n in seen.items() if n > 1}
    missing = set(inputs) - set(seen)
    extra = set(seen) - set(inputs)
    assert not dups, f"{len(dups)} duplicated inputs, e.g. {list(dups.items())[:5]}"
    assert not missing, f"{len(missing)} inputs missing, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} outputs for unknown inputs, e.g. {sorted(extra)[:5]}"


def assert_counts_chain(outputs: list) -> None:
    """Per card, outputs in source order count 1, 2, 3...: state was carried exactly once."""
    by_card: dict[tuple[int, str], list[tuple[int, int]]] = collections.defaultdict(list)
    for r in outputs:
        part, off = source_position(r)
        v = orjson.loads(r.value)
        by_card[(part, v["card_id"])].append((off, v["count"]))
    for card, seq in by_card.items():
        counts = [c for _, c in sorted(seq)]
        assert counts == list(range(1, len(counts) + 1)), f"{card}: state counts {counts[:20]}..."


async def read_back(bootstrap: str, names: dict) -> tuple[dict, list, list]:
    """(inputs by (partition, offset), outputs, dead letters), all read with read_committed."""
    from tests import kafkatools

    inputs = {(r.partition, r.offset): r.value for r in await kafkatools.read_committed(bootstrap, names["input"])}
    outputs = await kafkatools.read_committed(bootstrap, names["output"])
    dead = await kafkatools.read_committed(bootstrap, names["dlq"])
    return inputs, outputs, dead


async def verified(bootstrap: str, names: dict) -> tuple[dict, list, list]:
    """read_back, asserting every input exactly once as an output or a dead letter."""
    inputs, outputs, dead = await read_back(bootstrap, names)
    assert_exactly_once(inputs, outputs, dead)
    return inputs, outputs, dead
