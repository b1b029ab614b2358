"""Bundle sources written by tests, laid out like examples/bundles/fraud-v1: ``bundle.toml``,
``code/<module>.py``, ``schemas/input.json``, ``schemas/output.json``, ``requirements.lock`` and
any data files. One writer, so a test says only what its bundle has of its own (model, schemas,
lock) and every test's ``bundle.toml`` stays in step with what the build accepts."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

NO_PACKAGES = "# no third-party packages\n"
"""A lock that pins nothing: the model needs only the standard library and the daemon."""


def this_python() -> str:
    """The running interpreter's major.minor, as ``[bundle] python`` wants it."""
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def bundle_toml(*, name: str, version: str, entrypoint: str, python: str | None = None,
                state_schema_version: int = 1, data: Mapping[str, str] | None = None) -> str:
    """The ``bundle.toml`` of :func:`source_files`; ``data`` maps a ``[data]`` name to its path."""
    lines = ["[bundle]", f'name = "{name}"', f'version = "{version}"', f'entrypoint = "{entrypoint}"',
             f'python = "{python or this_python()}"', f"state_schema_version = {state_schema_version}", "",
             "[schemas]", 'input = "schemas/input.json"', 'output = "schemas/output.json"', ""]
    if data:
        lines += ["[data]", *(f'{key} = "{rel}"' for key, rel in data.items()), ""]
    lines += ["[dependencies]", 'lock = "requirements.lock"']
    return "\n".join(lines) + "\n"


def source_files(*, name: str, version: str, entrypoint: str, model: str, input_schema: Mapping[str, Any],
                 output_schema: Mapping[str, Any], lock: str = NO_PACKAGES, python: str | None = None,
                 state_schema_version: int = 1, data: Mapping[str, str] | None = None) -> dict[str, str]:
    """A bundle source as {relative path: text}: ``model`` is the entrypoint's module; each data
    file (path -> text) is declared under ``[data]`` by its file name's stem."""
    module = entrypoint.split(":", 1)[0].replace(".", "/")
    data = dict(data or {})
    return {
        "bundle.toml": bundle_toml(name=name, version=version, entrypoint=entrypoint, python=python,
                                   state_schema_version=state_schema_version,
                                   data={PurePosixPath(rel).stem: rel for rel in data}),
        f"code/{module}.py": model,
        "schemas/input.json": json.dumps(input_schema),
        "schemas/output.json": json.dumps(output_schema),
        "requirements.lock": lock,
        **data,
    }


def write_source(root: Path, files: Mapping[str, str]) -> Path:
    """Write ``files`` ({relative path: text}, e.g. from :func:`source_files`) under ``root``; returns ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def pypi_reachable() -> bool:
    """Whether pypi.org answers (``bundle build --with-wheels`` downloads the lock's wheels from it)."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False
