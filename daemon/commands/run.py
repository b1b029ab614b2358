"""``failoverd run --config FILE``: the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.commands import existing_path


def register(sub) -> None:
    p = sub.add_parser("run", help="run the daemon: consume, predict, produce, checkpoint, fail over",
                       description="Consume the configured input topics, run every batch through the active "
                                   "release and write outputs in exactly-once checkpoints; fail over to the "
                                   "standby when the active release fails.")
    p.add_argument("--config", default="config/failoverd.toml", help="configuration file (default: %(default)s)")
    p.add_argument("--active-bundle", type=Path, help="run this bundle archive as active instead of the registry's")
    p.add_argument("--standby-bundle", type=Path, help="use this bundle archive as standby instead of the registry's")
    p.set_defaults(func=run)


def run(args) -> int:
    from daemon import config
    from daemon.app import App

    for flag, path in (("--active-bundle", args.active_bundle), ("--standby-bundle", args.standby_bundle)):
        if path is not None:
            existing_path(flag, path, "pass a .fdb archive from `failoverd bundle build` or an unpacked bundle")
    settings = config.load(args.config)
    return asyncio.run(App(settings, active_bundle=args.active_bundle, standby_bundle=args.standby_bundle).run())
