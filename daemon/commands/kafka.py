"""``failoverd kafka up|down|status``: the local single-node KRaft broker."""

from __future__ import annotations

import json

from daemon.kafka_local import LocalBroker, default_port, find_repo_root


def register(sub) -> None:
    p = sub.add_parser("kafka", help="start, stop or inspect the local Kafka broker (needs Java 17+)",
                       description="Manage a single-node Apache Kafka (KRaft) broker on 127.0.0.1, "
                                   "fetched from Maven Central; data under .local/kafka/.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--port", type=int, default=default_port(),
                   help="client port, controller uses port+1 (default %(default)s; env FAILOVERD_KAFKA_PORT)")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    broker = LocalBroker(find_repo_root(), port=args.port)
    if args.action == "up":
        print(broker.up())
        return 0
    if args.action == "down":
        print(broker.down())
        return 0
    st = broker.status()
    if args.json:
        print(json.dumps(st))
    else:
        print(f"{'up' if st['running'] else 'down'}: {st['bootstrap']} pid={st['pid']} data={st['data']} log={st['log']}")
    return 0 if st["running"] else 3
