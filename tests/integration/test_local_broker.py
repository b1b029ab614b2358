"""The local broker: idempotent up, status, and data surviving kill -9 of the broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from daemon.kafka_local import LocalBroker
from tests import kafkatools
from tests.conftest import ROOT


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_up_twice_is_harmless_and_status_says_where(kafka_bootstrap):
    again = _cli("kafka", "up", "--port", kafka_bootstrap.rsplit(":", 1)[1])
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout
    st = _cli("kafka", "status", "--port", kafka_bootstrap.rsplit(":", 1)[1])
    assert st.returncode == 0
    assert st.stdout.startswith("up: ") and kafka_bootstrap in st.stdout


async def test_kill_9_and_up_keeps_topics_and_records(kafka_bootstrap, unique_name):
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    topic = unique_name("kill9-")
    await kafkatools.create_topics(kafka_bootstrap, {topic: 2})
    records = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(200)]
    assert await kafkatools.produce(kafka_bootstrap, topic, records) == 200

    broker = LocalBroker(ROOT, port=port)
    pid = broker.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await kafkatools.wait_for(lambda: broker.pid() is None, timeout=30, what="broker to die")

    up = _cli("kafka", "up", "--port", str(port))
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("up: ")
    got = await kafkatools.read_committed(kafka_bootstrap, topic, expect=200, timeout=60)
    assert sorted(r.value for r in got) == sorted(v for _, v in records)
