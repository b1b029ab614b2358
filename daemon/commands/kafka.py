"""``failoverd kafka up|down|status|token``: the local single-node KRaft broker (plain, or ``--secure``)."""

from __future__ import annotations

import json

from daemon.kafka_local import (
    SECURE_USER, LocalBroker, default_port, default_secure_port, find_repo_root, unsecured_token,
)


def register(sub) -> None:
    p = sub.add_parser("kafka", help="start, stop or inspect the local Kafka broker (needs Java 17+)",
                       description="Manage a single-node Apache Kafka (KRaft) broker on 127.0.0.1, "
                                   "fetched from Maven Central; data under .local/kafka/. With --secure, a "
                                   "separate broker whose only listener is SASL_SSL (throwaway CA, PLAIN and "
                                   "SCRAM user 'failoverd', unsecured-JWS OAUTHBEARER) under "
                                   ".local/kafka-secure-PORT/, for testing authentication.")
    p.add_argument("action", choices=["up", "down", "status", "token"],
                   help="up: fetch, format and start it (no-op when up); down: stop it; status: exit 0 up, 3 down; "
                        "token: print an unsigned JWT the --secure broker's OAUTHBEARER accepts")
    p.add_argument("--port", type=int, default=None,
                   help=f"client port, controller uses port+1 (default {default_port()}, env FAILOVERD_KAFKA_PORT; "
                        f"with --secure {default_secure_port()}, env FAILOVERD_KAFKA_SECURE_PORT)")
    p.add_argument("--secure", action="store_true",
                   help="the SASL_SSL broker (its own ports and data), not the plain one")
    p.add_argument("--subject", default=SECURE_USER, help="token: the JWT's sub claim (default %(default)s)")
    p.add_argument("--lifetime", type=float, default=3600.0,
                   help="token: seconds until the JWT's exp claim (default %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: status as {running, pid, bootstrap, data, log} (--secure adds security_protocol, "
                        "ssl_cafile, user, mechanisms); up/down as {message, ...status}")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "token":
        print(unsecured_token(args.subject, args.lifetime))
        return 0
    port = args.port if args.port is not None else (default_secure_port() if args.secure else default_port())
    broker = LocalBroker(find_repo_root(), port=port, secure=args.secure)
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
    if "ssl_cafile" in st:
        where += (f"; SASL_SSL ({', '.join(st['mechanisms'])}) as user {st['user']!r}, "
                  f"CA {st['ssl_cafile']}")
    start = "failoverd kafka up --secure" if "ssl_cafile" in st else "failoverd kafka up"
    if st["running"]:
        return f"up: {st['bootstrap']} (pid {st['pid']}; {where})"
    if st["pid"] is not None:
        return (f"down: broker process {st['pid']} is running but {st['bootstrap']} does not answer (starting, "
                f"or stuck: see its log); {where}")
    return f"down: no local broker on {st['bootstrap']}; start it with `{start}`; {where}"
