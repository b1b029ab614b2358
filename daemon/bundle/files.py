"""Which files belong to a bundle, and their sha256 digests.

When a bundle is *built*, everything under its source directory is part of it except
interpreter and OS litter: ``__pycache__/`` directories, ``*.pyc`` files and ``.DS_Store``.
Once built, nothing is litter: a ``*.pyc`` in an unpacked bundle is code Python would run, so
verification (``scan(root, litter=True)``) reports it like any other file the manifest does not
list. Symlinks, devices and fifos are never part of a bundle: :func:`scan` reports them so
callers can refuse them.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

MANIFEST_NAME = "MANIFEST.json"
IGNORED_DIRS = frozenset({"__pycache__"})
IGNORED_NAMES = frozenset({".DS_Store"})
IGNORED_SUFFIXES = (".pyc",)
_CHUNK = 1 << 20


def is_ignored(relpath: str) -> bool:
    """True for litter that is never part of a bundle (any path component counts)."""
    parts = relpath.split("/")
    if any(p in IGNORED_DIRS for p in parts[:-1]):
        return True
    name = parts[-1]
    return name in IGNORED_DIRS or name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


def scan(root: Path, *, litter: bool = False) -> tuple[list[str], list[str]]:
    """(regular files, other entries) under ``root`` as sorted POSIX relative paths.

    "Other entries" are symlinks (to files or directories), devices, fifos and sockets: things a
    bundle must not contain. Ignored litter is in neither list unless ``litter`` (verification
    of a built bundle). Symlinked directories are not followed.
    """
    files: list[str] = []
    others: list[str] = []
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for d in list(dirnames):
            rel = prefix + d
            if d in IGNORED_DIRS and not litter:
                dirnames.remove(d)
            elif os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                others.append(rel)
        for f in filenames:
            rel = prefix + f
            if not litter and is_ignored(rel):
                continue
            mode = os.lstat(os.path.join(dirpath, f)).st_mode
            (files if stat.S_ISREG(mode) else others).append(rel)
    return sorted(files), sorted(others)


def digest_file(path: Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
