"""Pure parts of the local broker and registry scripts: the cluster id, the install lock."""

from __future__ import annotations

import threading
import time
import uuid

from daemon import localservice
from daemon.kafka_local import new_cluster_id


def test_a_cluster_id_never_starts_with_a_dash():
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 "-A..."
    plain = uuid.UUID(bytes=b"\x00" * 16)
    draws = iter([dashed, dashed, plain])
    got = new_cluster_id(lambda: next(draws))
    assert got == "AAAAAAAAAAAAAAAAAAAAAA", got
    assert all(not new_cluster_id().startswith("-") for _ in range(2000))


def test_one_install_at_a_time(tmp_path):
    target = tmp_path / "lib"
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with localservice.installing(target):
            order.append("first in")
            first_in.set()
            time.sleep(0.3)
            order.append("first out")

    def second() -> None:
        first_in.wait(5)
        with localservice.installing(target):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["first in", "first out", "second in"], order
