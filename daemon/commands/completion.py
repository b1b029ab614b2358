"""``failoverd completion bash|zsh|tcsh``: a shell completion script, generated from the parser.

shtab writes the script from the argparse tree itself, so completion knows every command, flag
and choice without a list to keep up to date, and costs nothing at run time (the script is
static: the shell does not start Python on every <Tab>, as argcomplete's hook would).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHELLS = ("bash", "zsh", "tcsh")
# Arguments that name a directory; other Path arguments name a file (or either, for bundles).
DIRECTORIES = {"out", "registry", "unpack_dir", "src"}


def register(sub) -> None:
    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh, tcsh)",
                       description="Print the completion script of failoverd for a shell. Install it with, e.g.\n"
                                   "  failoverd completion bash > ~/.local/share/bash-completion/completions/failoverd\n"
                                   "  failoverd completion zsh > \"${fpath[1]}/_failoverd\"\n"
                                   "or for this shell only: eval \"$(failoverd completion bash)\".",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    p.set_defaults(func=run)


def run(args) -> int:
    import shtab

    from daemon.cli import build_parser

    parser = build_parser()
    _mark_paths(parser, shtab)
    print(shtab.complete(parser, shell=args.shell))
    return 0


def _mark_paths(parser: argparse.ArgumentParser, shtab) -> None:
    """Complete file and directory names for the arguments that take them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_paths(sub, shtab)
        elif action.type is Path or (action.metavar or "") in ("FILE", "PATH"):
            action.complete = shtab.DIRECTORY if action.dest in DIRECTORIES else shtab.FILE  # type: ignore[attr-defined]
        elif action.dest in ("config", "topics", "file", "input", "token_file"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
