"""The ``failoverd`` command line.

Each command group lives in its own module under ``daemon/commands/`` and exposes
``register(subparsers)``; this module only wires them together and turns
:class:`~daemon.errors.FailoverdError` into a one-line message and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from daemon import __version__, logs
from daemon.errors import FailoverdError

# (module under daemon.commands, one-line help) in the order --help lists them.
COMMANDS = [
    "run",
    "kafka",
    "config",
    "topics",
    "bundle",
    "release",
    "failover",
    "ctl",
    "dlq",
    "demo",
]

EPILOG = """\
quick start:
  make demo     build the example bundles, start a local broker, stream, fail over, report
  make test     run the test suite against the local broker

docs: README.md, docs/configuration.md, docs/bundles.md, docs/operations.md, docs/architecture.md
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="failoverd",
        description="Serve ML models on Kafka streams; fail over to a standby release exactly once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"failoverd {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="human", choices=["human", "json"],
                        help="human-readable lines (default) or JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"daemon.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"daemon.commands.{name}":
                continue  # command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FailoverdError as exc:
        print(f"failoverd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        logging.getLogger("failoverd").warning("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
