"""``failoverd demo``: a failover on the local broker, end to end, with a report."""

from __future__ import annotations

import asyncio


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the failover demo on the local broker and print a report",
                       description="Build the example bundles, promote 2.0.0 active and 1.0.0 standby, stream "
                                   "synthetic inputs, crash 2.0.0's model process part-way, fail over to 1.0.0, "
                                   "and report records in/out/dead-lettered, the failover's reason and duration, "
                                   "records replayed, duplicates and missing inputs. Exits 1 on any duplicate or "
                                   "missing record. Start the broker first: `failoverd kafka up`.")
    p.add_argument("--records", type=int, default=20000, help="synthetic inputs to stream (default %(default)s)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--standby-mode", choices=["hot", "warm", "cold"], default="warm")
    p.add_argument("--bootstrap", default="127.0.0.1:9092", help="broker (default: the local one)")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon.demo import Demo
    from daemon.kafka_local import find_repo_root

    return asyncio.run(Demo(find_repo_root(), args.bootstrap, args.records, args.seed, args.standby_mode).run())
