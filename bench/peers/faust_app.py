"""The peers workload on faust-streaming: one agent over the input topic, per-card state in a
Table (changelog topic, in-memory store: faust-streaming's default), common output to a topic.

    python bench/peers/faust_app.py worker -l warn   (configured by FAUST_BENCH_* variables)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import faust  # noqa: E402
import orjson  # noqa: E402

from workload import step  # noqa: E402

E = os.environ
app = faust.App(
    E["FAUST_BENCH_GROUP"],
    broker=f"kafka://{E.get('FAUST_BENCH_BOOTSTRAP', '127.0.0.1:9092')}",
    store="memory://",
    datadir=E["FAUST_BENCH_DATADIR"],
    processing_guarantee=E.get("FAUST_BENCH_GUARANTEE", "at_least_once"),
    topic_partitions=int(E["FAUST_BENCH_PARTITIONS"]),
    broker_commit_interval=float(E.get("FAUST_BENCH_COMMIT_INTERVAL", "0.1")),
    web_enabled=False,
    consumer_auto_offset_reset="earliest",
    producer_acks=-1,
    consumer_group_instance_id=E.get("FAUST_BENCH_INSTANCE") or None,  # static membership when set
)
src = app.topic(E["FAUST_BENCH_INPUT"], key_type=bytes, value_type=bytes, key_serializer="raw",
                value_serializer="raw")
dst = app.topic(E["FAUST_BENCH_OUTPUT"], key_type=bytes, value_type=bytes, key_serializer="raw",
                value_serializer="raw")
cards = app.Table("cards", default=None, partitions=int(E["FAUST_BENCH_PARTITIONS"]))


@app.agent(src)
async def score(stream):
    async for key, raw in stream.items():
        value = orjson.loads(raw)
        card = value["card_id"]
        out, cards[card] = step(cards.get(card), value)
        await dst.send(key=key, value=orjson.dumps(out))


if __name__ == "__main__":
    app.main()
