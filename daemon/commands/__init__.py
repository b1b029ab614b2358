"""One module per command group of ``failoverd``; each exposes ``register(subparsers)``."""

from __future__ import annotations

from pathlib import Path

from daemon.errors import FailoverdError


class UsageError(FailoverdError):
    """A command-line argument names something that cannot be used (a missing file, a file where
    a directory is needed). Exit 2, as argparse's own usage errors."""

    exit_code = 2


def input_file(flag: str, path: Path) -> Path:
    """``path`` if it is a readable file, else a UsageError naming ``flag`` and the fix."""
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file; fix: pass an existing file")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; fix: pass a file")
    if not _readable(path):
        raise UsageError(f"{flag} {path}: cannot be read (permission denied)")
    return path


def existing_path(what: str, path: Path, fix: str) -> Path:
    """``path`` if it exists (file or directory), else a UsageError naming ``what`` and ``fix``."""
    if not path.exists():
        raise UsageError(f"{what} {path}: no such file or directory; fix: {fix}")
    return path


def output_dir(flag: str, path: Path) -> Path:
    """``path`` if it is a directory or can become one, else a UsageError naming ``flag`` and the fix."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory; fix: pass a directory (it is created "
                         "when missing)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is not a directory; fix: pass a directory path")
            break
    return path


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False
