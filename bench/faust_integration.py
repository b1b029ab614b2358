"""The overhead of the faust integration: one faust agent, two ways of calling the model.

- ``inprocess``: the agent calls the fraud-scorer 2.0.0 model in its own process, on the event
  loop, the way a faust app calls a model today (the bundle loaded with
  ``daemon.engine.loading.load_processor``: the same decode, JSON-Schema validation and encoding
  as the integration, so the two differ only in how the model is reached);
- ``integration``: the same agent through ``daemon.integrations.faust.FaustScorer``: active 2.0.0
  and standby 1.0.0 each in a model worker subprocess, failover signals, provenance headers,
  per-release state namespaces in the Table.

Both: ``stream.take_events(500, within=0.2)``, per-card state in a faust Table (in-memory store,
changelog topic), outputs to a topic, at-least-once, 2 input partitions. The rounds are
interleaved (inprocess, integration, inprocess, ...) on fresh topics pre-filled with the same
records. A round's rate is its output count over the span between its first and last output's
broker timestamps, so faust's start-up and recovery are not counted.

    .venv/bin/python bench/faust_integration.py [--records 6000] [--rounds 2] [--write]

``--write`` replaces the ``faust-integration`` section of docs/BENCHMARKS.md. The script also
runs itself as the faust worker (``FI_MODE`` set: ``worker`` arguments go to faust).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

E = os.environ


def worker() -> None:
    """The faust worker of one round (``FI_*`` variables say which variant and which topics)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import faust
    import orjson

    app = faust.App(E["FI_APP"], broker=f"kafka://{E['FI_BOOTSTRAP']}", store="memory://",
                    datadir=E["FI_DATADIR"], topic_partitions=2, broker_commit_interval=1.0,
                    consumer_auto_offset_reset="earliest", web_enabled=False, producer_acks=-1,
                    web_port=int(E["FI_WEB_PORT"]))  # faust 0.15 binds it even with the web disabled
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source, sink = app.topic(E["FI_INPUT"], **raw), app.topic(E["FI_OUTPUT"], **raw)
    cards = app.Table("cards", default=None, partitions=2)
    bundles = Path(E["FI_BUNDLES"])

    if E["FI_MODE"] == "integration":
        from daemon.integrations.faust import FaustScorer

        scorer = FaustScorer.from_bundles(app, bundles / E["FI_ACTIVE"], bundles / E["FI_STANDBY"], table=cards,
                                          unpack_dir=Path(E["FI_DATADIR"]) / "unpacked")

        @app.agent(source)
        async def score(stream):
            async for events in stream.take_events(500, within=0.2):
                for s in await scorer.score(events):
                    await scorer.send(s, sink, sink)
    else:
        from daemon.engine.batch import OK
        from daemon.engine.loading import load_processor

        processor, _ = load_processor(bundles / E["FI_ACTIVE"], Path(E["FI_DATADIR"]) / "unpacked")

        @app.agent(source)
        async def score(stream):
            async for events in stream.take_events(500, within=0.2):
                keys = list(dict.fromkeys(ev.key for ev in events))
                index = {k: i for i, k in enumerate(keys)}
                states = [orjson.dumps(s) if (s := cards.get(k)) is not None else None for k in keys]
                results, new_states = processor.process(
                    [(ev.key, ev.value, index[ev.key]) for ev in events], states)
                partition_of = {ev.key: ev.message.partition for ev in events}  # a key's last event
                for skey, state in new_states.items():
                    value = orjson.loads(state)
                    cards.send_changelog(partition_of[keys[skey]], keys[skey], value)
                    cards.data[keys[skey]] = value
                for ev, r in zip(events, results):
                    await sink.send(key=ev.key, value=r[1] if r[0] == OK else ev.value)

    app.main()


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as c  # noqa: E402

NAME = "faust-integration"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def one_round(mode: str, records: list, bundles: dict[str, Path], out: Path) -> float:
    tag = c.unique(f"fi-{mode}")
    names = {"input": f"{tag}-in", "output": f"{tag}-out"}
    await c.create_topics({names["input"]: 2, names["output"]: 2})
    try:
        c.produce(names["input"], records)
        env = {"FI_MODE": mode, "FI_APP": tag, "FI_BOOTSTRAP": c.BOOTSTRAP, "FI_DATADIR": str(out / tag),
               "FI_INPUT": names["input"], "FI_OUTPUT": names["output"],
               "FI_BUNDLES": str(bundles["v2"].parent), "FI_ACTIVE": bundles["v2"].name,
               "FI_STANDBY": bundles["v1"].name, "FI_WEB_PORT": str(free_port())}
        proc = c.Proc([c.PY, __file__, "worker", "-l", "warn"], out / f"{tag}.log", env=env)
        try:
            got = await c.read_all(names["output"], expect=len(records), timeout=90)
            if len(got) < len(records):
                raise RuntimeError(f"{mode}: {len(got)} of {len(records)} outputs; log tail:\n{proc.log()[-2000:]}")
        finally:
            proc.stop(20)
        stamps = sorted(r[5] for r in got)
        span = (stamps[-1] - stamps[0]) / 1000
        return (len(got) - 1) / span if span > 0 else float("nan")
    finally:
        await c.delete_topics(list(names.values()) + [f"{tag}-cards-changelog", f"{tag}-__assignor-__leader"])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="replace the section in docs/BENCHMARKS.md")
    args = ap.parse_args()
    out = c.OUT / "faust-integration"
    bundles = {v: c.build_bundle(c.ROOT / "examples" / "bundles" / f"fraud-{v}", out / "bundles") for v in ("v1", "v2")}
    records = c.transactions(args.records, n_cards=1000, seed=11)
    rates: dict[str, list[float]] = {"inprocess": [], "integration": []}
    t0 = time.monotonic()
    for i in range(args.rounds):
        for mode in ("inprocess", "integration") if i % 2 == 0 else ("integration", "inprocess"):
            rate = await one_round(mode, records, bundles, out)
            rates[mode].append(rate)
            print(f"round {i + 1} {mode:12} {c.fmt_rate(rate)} records/s")
    s = {m: c.stats(v) for m, v in rates.items()}
    ratio = s["integration"]["median"] / s["inprocess"]["median"]
    rows = [[m, c.fmt_rate(s[m]["median"]), f"{c.fmt_rate(s[m]['min'])}–{c.fmt_rate(s[m]['max'])}", s[m]["n"]]
            for m in ("inprocess", "integration")]
    body = [f"Measured by `{c.command_line()}` ({args.records:,} records, 1,000 cards, 2 partitions, "
            f"{args.rounds} interleaved rounds per variant, {time.monotonic() - t0:.0f} s in all).", "",
            c.md_table(["faust agent calls the model", "records/s (median)", "min–max", "rounds"], rows), "",
            f"Through the integration: {ratio:.2f}x the in-process rate."]
    print("\n".join(body))
    c.publish_section(NAME, body, Path(__file__).with_name("faust_integration_notes.md"), args.write)


if __name__ == "__main__":
    if E.get("FI_MODE"):
        worker()
    else:
        asyncio.run(main())
