"""Run fraud-avro end to end on the local broker and the local Schema Registry:

    .venv/bin/python examples/bundles/fraud-avro/run_example.py [--records 2000]

Starts both if needed (`failoverd kafka up`, `failoverd schema-registry up`), creates fresh topics,
registers the producers' schema under ``<input>-value``, produces Avro card transactions in the
Confluent wire format, builds this bundle and runs the daemon on it with ``format = "avro"`` both
ways, then reads the outputs back (read_committed), decodes them with the schema the daemon
registered under ``<output>-value``, and checks every input has exactly one output. Exit 0 when
it does. Not part of the model: the bundle carries it as documentation, like fraud-v1's samples.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent


def failoverd(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failoverd {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout.strip()


def transactions(n: int) -> list[dict]:
    rng = random.Random(7)
    return [{"card_id": f"card-{rng.randrange(50)}", "merchant_id": rng.choice(["m-grocery", "m-fuel", None]),
             "amount": round(rng.uniform(1, 500), 2), "features": [round(rng.random(), 3) for _ in range(8)]}
            for _ in range(n)]


async def main(n: int) -> int:
    import fastavro
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from daemon.bundle import build
    from daemon.formats.avro import frame, schema_text, split
    from daemon.formats.registry import RegistryClient
    from daemon.schema_registry_local import LocalSchemaRegistry, default_port

    print(failoverd("kafka", "up"))
    print(failoverd("schema-registry", "up"))
    url = LocalSchemaRegistry(ROOT, default_port()).url
    bootstrap = "127.0.0.1:9092"
    run = f"fraud-avro-{uuid.uuid4().hex[:8]}"
    topics = {role: f"{run}-{role}" for role in ("input", "output", "dlq", "changelog", "checkpoints")}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    compact = {"cleanup.policy": "compact"}
    await admin.create_topics([NewTopic(t, 2 if role in ("input", "output", "changelog") else 1, 1,
                                        topic_configs=compact if role in ("changelog", "checkpoints") else {})
                               for role, t in topics.items()])
    await admin.close()

    schema = json.loads((HERE / "schemas" / "input.avsc").read_text())
    registry = RegistryClient(url)
    schema_id = registry.register(f"{topics['input']}-value", schema_text(schema))
    parsed = fastavro.parse_schema(schema)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    for tx in transactions(n):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, tx)
        await producer.send(topics["input"], frame(schema_id, buf.getvalue()), key=tx["card_id"].encode())
    await producer.flush()
    await producer.stop()
    print(f"produced {n} Avro records to {topics['input']} (schema id {schema_id})")

    work = Path(tempfile.mkdtemp(prefix="fraud-avro-"))
    bundle = build(HERE, work).path
    config = work / "failoverd.toml"
    config.write_text(f"""[kafka]
bootstrap_servers = ["{bootstrap}"]
group_id = "{run}"
[app]
name = "{run}"
[inputs]
topics = ["{topics['input']}"]
format = "avro"
[output]
topic = "{topics['output']}"
format = "avro"
[dead_letter]
topic = "{topics['dlq']}"
[checkpoint]
topic = "{topics['checkpoints']}"
[state]
directory = "{work / 'state'}"
changelog_topic = "{topics['changelog']}"
[registry]
path = "{work / 'registry'}"
control_topic = "{run}-control-unused"
[admin]
bind = "127.0.0.1:0"
[metrics]
port = 0
[schema_registry]
url = "{url}"
""")
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config),
                               "--active-bundle", str(bundle)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    consumer = AIOKafkaConsumer(topics["output"], topics["dlq"], bootstrap_servers=bootstrap,
                                isolation_level="read_committed", auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    outputs, dead, deadline = [], [], time.monotonic() + 120
    try:
        while len(outputs) + len(dead) < n and time.monotonic() < deadline and daemon.poll() is None:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                (outputs if tp.topic == topics["output"] else dead).extend(records)
    finally:
        await consumer.stop()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    writers: dict[int, object] = {}
    sources = set()
    for r in outputs:
        sid, body = split(r.value)
        if sid not in writers:
            writers[sid] = fastavro.parse_schema(json.loads(registry.schema_by_id(sid) or "null"))
        value = fastavro.schemaless_reader(io.BytesIO(body), writers[sid])
        headers = dict(r.headers)
        sources.add((headers["fd.source.partition"], headers["fd.source.offset"]))
    print(f"read back {len(outputs)} outputs (Avro, schema ids {sorted(writers)} under {topics['output']}-value) "
          f"and {len(dead)} dead letters; last output: {value if outputs else None}")
    ok = len(outputs) == n and len(sources) == n and not dead
    print("exactly once: every input has one output" if ok else f"NOT exactly once; daemon log: {work / 'daemon.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    sys.exit(asyncio.run(main(parser.parse_args().records)))
