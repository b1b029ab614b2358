"""Bindings: inputs of a model that are legitimately per environment (docs/bundles.md#bindings).

A bundle declares them by name in ``[bindings]`` of its ``bundle.toml`` (name -> description);
each environment's configuration binds the names to files or directories (``[bindings]`` of the
failoverd configuration). The bundle digest covers the code and the bundled data, never a binding,
so a bundle moves between environments unchanged; what a release ran against is recorded by the
binding's *content digest*: in the release log at promotion and on every output
(``fd.binding.<name>``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path

from daemon.bundle import files as bfiles
from daemon.errors import BundleError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
NAME_TEXT = "letters, digits, _ and -"


def digest_of(path: Path) -> str:
    """sha256 of a file's bytes; for a directory, sha256 over the sorted ``relpath\\0sha256\\n``
    lines of every regular file under it (symlinks followed: the content is what the model reads)."""
    path = Path(path)
    if path.is_file():
        return bfiles.digest_file(path)[0]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a file nor a directory")
    entries = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file():
                rel = full.relative_to(path).as_posix()
                entries.append(f"{rel}\0{bfiles.digest_file(full)[0]}\n")
    h = hashlib.sha256()
    for line in sorted(entries):
        h.update(line.encode("utf-8"))
    return h.hexdigest()


def resolve(declared: Mapping[str, str], bound: Mapping[str, Path], label: str) -> dict[str, Path]:
    """The bound path of every binding ``declared`` (the manifest's ``[bindings]``), by name.

    BundleError naming each binding that this environment does not bind, or binds to a path that
    is missing, and the fix. Bindings the configuration has but the bundle does not declare are
    not passed on (another release may declare them)."""
    problems, out = [], {}
    for name in sorted(declared):
        path = bound.get(name)
        if path is None:
            problems.append(f"binding {name!r} ({declared[name] or 'no description'}) is not bound in this "
                            f"environment; fix: add {name} = \"/path/to/file-or-directory\" under [bindings] of the "
                            f"failoverd configuration (or set FAILOVERD_BINDINGS__{name.upper()})")
        elif not Path(path).exists():
            problems.append(f"binding {name!r} is bound to {path}, which does not exist; fix: create it or correct "
                            f"[bindings] {name} in the failoverd configuration")
        else:
            out[name] = Path(path)
    if problems:
        raise BundleError(f"{label}: " + "; ".join(problems))
    return out


def digests(paths: Mapping[str, Path]) -> dict[str, str]:
    """{name: content digest} of resolved bindings."""
    return {name: digest_of(path) for name, path in sorted(paths.items())}
