"""The ``failoverd`` command line.

Each command group lives in its own module under ``daemon/commands/`` and exposes
``register(subparsers)``; this module only wires them together and turns what a user can cause
into a one-line message and an exit code, never a traceback:

    0    success
    1    the command failed: something checked is not right (a bundle does not verify, topics
         differ, the demo was not exactly once, `bundle try` met bad records), or it could not
         be done (Kafka or the admin API unreachable, unknown release, ...)
    2    usage: bad flags or arguments, a missing or unreadable file, an invalid configuration
    3    `kafka status` / `schema-registry status`: the broker / registry is down; `dlq replay`: some
         dead letters could not be sent
    130  interrupted (Ctrl-C)
    141  stdout was closed early (`failoverd ... | head`): the rest of the output is dropped
         quietly, as the shell reports a command killed by SIGPIPE (128 + 13)

The same table is in README.md ("Exit codes"); tests/unit/test_cli_misuse.py checks it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from daemon import __version__, logs
from daemon.errors import FailoverdError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for `yes | head`

# (module under daemon.commands, one-line help) in the order --help lists them.
COMMANDS = [
    "run",
    "kafka",
    "schema_registry",
    "config",
    "topics",
    "bundle",
    "release",
    "failover",
    "ctl",
    "dlq",
    "demo",
    "completion",
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
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="least severe log lines shown, on stderr (default %(default)s)")
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
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
    except BrokenPipeError:  # also from argparse's --help and usage output
        return _stdout_closed()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    aiokafka_log = logging.getLogger("aiokafka")
    aiokafka_level = aiokafka_log.level
    if args.command != "run" and args.log_level != "debug":
        # A one-shot command turns an unreachable broker into one error line of its own; aiokafka's
        # retry chatter would only repeat it (the daemon keeps it: it runs for long).
        aiokafka_log.setLevel(logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise  # main() handles it, for argparse's output too
    except FailoverdError as exc:
        return _error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        logging.getLogger("failoverd").warning("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise  # a bug: the traceback is what a report needs
        return _error(*message)
    finally:
        aiokafka_log.setLevel(aiokafka_level)  # main() is also called in-process (tests)


def _error(message: str, code: int) -> int:
    try:
        print(f"failoverd: error: {message}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass
    return code


def _stdout_closed() -> int:
    """The reader of our stdout went away (``| head``): stop quietly, like a tool killed by SIGPIPE.

    stdout is pointed at /dev/null so that the interpreter's final flush of what is still
    buffered does not fail a second time ("Exception ignored ... BrokenPipeError").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_PIPE_CLOSED


def _user_error(exc: Exception) -> tuple[str, int] | None:
    """(message, exit code) for an error the user's environment caused, or None for a bug.

    Commands raise FailoverdError with a precise message where they can; this is the net under
    them for an unreachable broker and files that cannot be read or written.
    """
    try:
        from aiokafka.errors import KafkaError
    except ImportError:  # pragma: no cover
        KafkaError = ()  # type: ignore[assignment,misc]
    if isinstance(exc, KafkaError):
        return (f"Kafka: {type(exc).__name__}: {exc}; is the broker up (`failoverd kafka status`) and the "
                "bootstrap address right?", 1)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}", EXIT_USAGE
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
