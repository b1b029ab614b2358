"""``failoverd failover --reason TEXT``: ask every running instance to fail over to its standby."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("failover", help="request a manual failover on every instance (via the control topic)",
                       description="Publish a failover request on the control topic: every daemon instance "
                                   "following it aborts its open checkpoint interval and switches to its standby, "
                                   "subject to the cool-down and cap. For one instance only, use "
                                   "`failoverd ctl failover` against its admin API.")
    p.add_argument("--reason", required=True, help="why (logged, and recorded with the failover)")
    p.add_argument("--config", type=Path, default=Path("config/failoverd.toml"),
                   help="configuration naming the brokers and the control topic (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the published request event as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon import config
    from daemon.coordination import ReleaseRecorder

    settings = config.load(args.config)
    event = asyncio.run(ReleaseRecorder(settings).request_failover(args.reason))
    if args.json:
        print(json.dumps({"control_topic": settings.registry.control_topic, "event": event}, indent=2, default=str))
        return 0
    print(f"failover requested on control topic {settings.registry.control_topic} (event {event['id']})")
    return 0
