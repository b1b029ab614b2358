"""The peers workload on faust-streaming: one agent over the input topic, per-card state in a
Table (changelog topic, in-memory store: faust-streaming's default), common output to a topic.

    python bench/peers/faust_app.py worker -l warn   (configured by FAUST_BENCH_* variables)

FAUST_BENCH_ML=<unpacked peers-ml bundle>: the ml workload -- the score comes from the example
release's own model on its fitted model file, called per event (the agent's natural shape, as in
faust's documentation); run on the release environment's python with this venv's packages appended
after it (FAILOVERD_BENCH_APPEND_PATH), as bench/peers/run.py does.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
for _extra in os.environ.get("FAILOVERD_BENCH_APPEND_PATH", "").split(os.pathsep):
    if _extra and _extra not in sys.path:
        sys.path.append(_extra)

import faust  # noqa: E402
import orjson  # noqa: E402

from workload import ml_scores, release_model, step, step_scored  # noqa: E402

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


MODEL = release_model(E["FAUST_BENCH_ML"]) if E.get("FAUST_BENCH_ML") else None


@app.agent(src)
async def score(stream):
    async for key, raw in stream.items():
        value = orjson.loads(raw)
        card = value["card_id"]
        if MODEL is None:
            out, cards[card] = step(cards.get(card), value)
        else:
            out, cards[card] = step_scored(cards.get(card), value, ml_scores(MODEL, [value])[0])
        await dst.send(key=key, value=orjson.dumps(out))


if __name__ == "__main__":
    app.main()
