"""``failoverd schema-registry up|down|status``: the local Schema Registry (Apicurio Registry, in memory)."""

from __future__ import annotations

import json

from daemon.kafka_local import find_repo_root
from daemon.schema_registry_local import LocalSchemaRegistry, default_port


def register(sub) -> None:
    p = sub.add_parser("schema-registry", help="start, stop or inspect the local Schema Registry (needs Java 17+)",
                       description="Manage Apicurio Registry on 127.0.0.1 (in-memory storage, fetched from Maven "
                                   "Central); its Confluent-compatible API is what [schema_registry] url names.")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: fetch and start it (no-op when up); down: stop it; status: exit 0 up, 3 down")
    p.add_argument("--port", type=int, default=default_port(),
                   help="HTTP port (default %(default)s; env FAILOVERD_SCHEMA_REGISTRY_PORT)")
    p.add_argument("--persist", action="store_true",
                   help="up: keep schemas in a database file under .local/schema-registry[-PORT]/data, so they and "
                        "their ids survive a restart (default: in memory, empty at every start)")
    p.add_argument("--json", action="store_true",
                   help="print JSON: status as {running, pid, url, log}; up/down as {message, ...}")
    p.set_defaults(func=run)


def run(args) -> int:
    registry = LocalSchemaRegistry(find_repo_root(), port=args.port, persist=args.persist)
    if args.action in ("up", "down"):
        message = registry.up() if args.action == "up" else registry.down()
        print(json.dumps({"message": message, **registry.status()}) if args.json else message)
        return 0
    st = registry.status()
    print(json.dumps(st) if args.json else describe(st))
    return 0 if st["running"] else 3


def describe(st: dict) -> str:
    """One line saying whether the local registry is up, and where its log is."""
    if st["running"]:
        return f"up: {st['url']} (pid {st['pid']}; log {st['log']})"
    if st["pid"] is not None:
        return (f"down: registry process {st['pid']} is running but {st['url']} does not answer (starting, or "
                f"stuck: see {st['log']})")
    return f"down: no local schema registry on {st['url']}; start it with `failoverd schema-registry up`"
