"""A faust agent scoring card transactions with failoverd releases (docs/faust.md).

One agent over the input topic; per-card state in a faust Table (``cards``); outputs and dead
letters with failoverd's provenance headers; the releases (active fraud-scorer 2.0.0, standby
1.0.0), the failover policy and the control topic from a failoverd configuration file.

    FAILOVERD_CONFIG=examples/faust_app/failoverd.toml .venv/bin/python examples/faust_app/app.py worker -l info

Environment: ``FAILOVERD_CONFIG`` (the configuration: topics, registry, worker, failover),
``FAUST_APP_ID`` (the faust app id, also its consumer group; default ``fraud-faust``),
``FAUST_PARTITIONS`` (the input topic's partition count, default 2), ``FAUST_DATADIR``,
``FAUST_COMMIT_INTERVAL`` (seconds, default 1.0), ``FAUST_BATCH`` (records per batch, default 500),
``FAUST_METRICS_PORT`` (serve the integration's metrics; 0 = off), ``FAUST_WEB_PORT`` (faust's own
port, default 6066).
"""

import os

import faust

from daemon.integrations import metrics
from daemon.integrations.faust import FaustScorer

E = os.environ
PARTITIONS = int(E.get("FAUST_PARTITIONS", "2"))

app = faust.App(
    E.get("FAUST_APP_ID", "fraud-faust"),
    broker=f"kafka://{E.get('FAUST_BOOTSTRAP', '127.0.0.1:9092')}",
    store="memory://",
    datadir=E.get("FAUST_DATADIR", ".local/faust-example/data"),
    topic_partitions=PARTITIONS,
    broker_commit_interval=float(E.get("FAUST_COMMIT_INTERVAL", "1.0")),
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
    web_port=int(E.get("FAUST_WEB_PORT", "6066")),  # faust 0.15 still binds it: one per worker on a host
    producer_acks=-1,
)
cards = app.Table("cards", default=None, partitions=PARTITIONS)
scorer = FaustScorer.from_config(app, E.get("FAILOVERD_CONFIG", "examples/faust_app/failoverd.toml"), table=cards)

settings = scorer.settings
raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
source = app.topic(*settings.inputs.topics, **raw)
output = app.topic(settings.output.topic, **raw)
dead_letters = app.topic(settings.dead_letter.topic, **raw)

if int(E.get("FAUST_METRICS_PORT", "0")):
    metrics.serve(int(E["FAUST_METRICS_PORT"]))


@app.agent(source)
async def score(stream):
    async for events in stream.take_events(int(E.get("FAUST_BATCH", "500")), within=0.2):
        for scored in await scorer.score(events):
            await scorer.send(scored, output, dead_letters)


if __name__ == "__main__":
    app.main()
