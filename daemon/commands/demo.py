"""``failoverd demo``: a failover on the local broker, end to end, with a report."""

from __future__ import annotations

import argparse
import asyncio

EXIT_HELP = ("exit status: 0 every input came out exactly once (as an output or a dead letter) across a "
             "failover; 1 an input was duplicated or missing, no failover happened, or the demo could not run "
             "(no broker at --bootstrap: start it with `failoverd kafka up`); 2 bad arguments")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 10:
        raise argparse.ArgumentTypeError(f"{value} is too few: at least 10 records (the crash is at the middle)")
    return value


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the failover demo on the local broker and print a report",
                       description="Build the example bundles, promote 2.0.0 active and 1.0.0 standby, stream "
                                   "synthetic inputs, crash 2.0.0's model process part-way, fail over to 1.0.0, "
                                   "and report records in/out/dead-lettered, the failover's reason and duration, "
                                   "records replayed, duplicates and missing inputs, then the commands that show "
                                   "what it did (its configuration, dead letters, release history, daemon log are "
                                   "under .local/demo/<run>/). Start the broker first: `failoverd kafka up`.",
                       epilog=EXIT_HELP)
    p.add_argument("--records", type=_positive, default=20000, help="synthetic inputs to stream (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the synthetic inputs (default %(default)s)")
    p.add_argument("--standby-mode", choices=["hot", "warm", "cold"], default="warm",
                   help="how ready the standby is: hot (shadows every batch), warm (model loaded), cold (nothing "
                        "loaded) (default %(default)s)")
    from daemon.kafka_local import default_port

    p.add_argument("--bootstrap", default=f"127.0.0.1:{default_port()}",
                   help="broker (default: the local one that `failoverd kafka up` starts, %(default)s; "
                        "FAILOVERD_KAFKA_PORT moves both)")
    p.add_argument("--ml", action="store_true",
                   help="the real ML releases instead: fraud-ml 1.1.0 (ONNX Runtime) active, 1.0.0 (scikit-learn) "
                        "standby, each in its own environment built from its wheels; the ONNX worker crashes, "
                        "scikit-learn takes over, then a rollback returns to ONNX (downloads ~110 MB of wheels once)")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon.demo import Demo, check_broker
    from daemon.kafka_local import find_repo_root

    root = find_repo_root()
    check_broker(args.bootstrap)  # before building anything: a missing broker is the usual first stumble
    if getattr(args, "ml", False):
        from daemon.demo_ml import MlDemo as Demo  # noqa: F811
    return asyncio.run(Demo(root, args.bootstrap, args.records, args.seed, args.standby_mode).run())
