"""``failoverd kafka up|down|status``: the local single-node KRaft broker."""

from __future__ import annotations

import json

from daemon.kafka_local import LocalBroker, default_port, find_repo_root


def register(sub) -> None:
    p = sub.add_parser("kafka", help="start, stop or inspect the local Kafka broker (needs Java 17+)",
                       description="Manage a single-node Apache Kafka (KRaft) broker on 127.0.0.1, "
                                   "fetched from Maven Central; data under .local/kafka/.")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: fetch, format and start it (no-op when up); down: stop it; status: exit 0 up, 3 down")
    p.add_argument("--port", type=int, default=default_port(),
                   help="client port, controller uses port+1 (default %(default)s; env FAILOVERD_KAFKA_PORT)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: status as {running, pid, bootstrap, data, log}; up/down as {message}")
    p.set_defaults(func=run)


def run(args) -> int:
    broker = LocalBroker(find_repo_root(), port=args.port)
    if args.action in ("up", "down"):
        message = broker.up() if args.action == "up" else broker.down()
        print(json.dumps({"message": message, **broker.status()}) if args.json else message)
        return 0
    st = broker.status()
    if args.json:
        print(json.dumps(st))
    else:
        print(describe(st))
    return 0 if st["running"] else 3


def describe(st: dict) -> str:
    """One line saying whether the local broker is up, and where its data and log are."""
    where = f"data {st['data']}, log {st['log']}"
    if st["running"]:
        return f"up: {st['bootstrap']} (pid {st['pid']}; {where})"
    if st["pid"] is not None:
        return (f"down: broker process {st['pid']} is running but {st['bootstrap']} does not answer (starting, "
                f"or stuck: see its log); {where}")
    return f"down: no local broker on {st['bootstrap']}; start it with `failoverd kafka up`; {where}"
