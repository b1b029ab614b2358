"""The daemon speaks systemd's notify protocol on a real unix datagram socket (NOTIFY_SOCKET)."""

from __future__ import annotations

import socket
import time

from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config
from tests.integration.test_engine import _count_committed


async def test_ready_after_restore_watchdog_status_and_stopping(kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "notify", partitions=2)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "s",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    await kafkatools.produce(kafka_bootstrap, names["input"], streams.transactions(300, seed=9))
    d = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "d.log",
                   env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}).start()
    received: list[tuple[float, str]] = []

    def drain() -> list[str]:
        while True:
            try:
                received.append((time.monotonic(), sock.recv(4096).decode()))
            except BlockingIOError:
                return [m for _, m in received]

    try:
        await kafkatools.wait_for(lambda: d.check() and "READY=1" in drain(), timeout=60, what="READY=1")
        # READY only once partitions were assigned and state restored: the daemon answers ready
        assert "partitions assigned" in d.log()
        assert d.get("/readyz")[0] == 200
        statuses = [m for m in drain() if m.startswith("STATUS=")]
        assert statuses and statuses[0] != "STATUS=processing"  # progress was reported before ready
        await kafkatools.wait_for(lambda: _count_committed(kafka_bootstrap, names, 300), timeout=60, what="outputs")
        start = time.monotonic()
        await kafkatools.wait_for(lambda: len([1 for t, m in (drain() and received) if m == "WATCHDOG=1"
                                               and t > start]) >= 2, timeout=10, what="two watchdog pings")
        assert d.terminate() == 0
        drain()
        assert any(m == "STOPPING=1" for _, m in received)
    finally:
        sock.close()
        if d.alive():
            d.kill9()
