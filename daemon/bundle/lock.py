"""The dependency lock of a bundle: a pip requirements file of exact pins.

Accepted lines (what ``pip freeze`` and ``pip-compile --generate-hashes`` write)::

    # comments and blank lines
    orjson==3.10.7
    requests[socks]==2.32.3 \\
        --hash=sha256:...            # hashes are optional; pip checks them with --with-wheels
    colorama==0.4.6 ; sys_platform == "win32"   # markers need the `packaging` package
    --index-url https://...          # index options are ignored

Anything that is not an exact ``name==version`` pin (ranges, ``-r``, ``-e``, URLs) is refused:
a lock pins, or it is not a lock.

The installed environment satisfies the lock when every pin whose marker applies is installed
at that version. Names compare after PEP 503 normalization, versions after PEP 440's
"trailing zeros and separators do not matter" (``1.0 == 1.0.0``, ``1.0-rc1 == 1.0rc1``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
from pathlib import Path

from daemon.errors import BundleError

_IGNORED_OPTIONS = ("--index-url", "--extra-index-url", "--find-links", "--trusted-host", "-i ", "-f ")
_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?P<extras>\[[^\]]*\])?"
    r"\s*==\s*(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)\s*(?:;\s*(?P<marker>.+))?$"
)
_HASH = re.compile(r"\s--hash[=\s]\s*(\S+)")


@dataclasses.dataclass(frozen=True)
class Pin:
    name: str
    version: str
    line: int
    marker: str | None = None
    hashes: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def normalize_version(version: str) -> str:
    """A PEP 440-ish normal form good enough to compare exact pins without `packaging`."""
    v = version.strip().lower()
    epoch = ""
    if "!" in v:
        epoch, v = v.split("!", 1)
        epoch = "" if int(epoch or 0) == 0 else f"{int(epoch)}!"
    if v.startswith("v"):
        v = v[1:]
    local = ""
    if "+" in v:
        v, local = v.split("+", 1)
        local = "+" + re.sub(r"[-_]", ".", local)
    m = re.match(r"^(\d+(?:\.\d+)*)(.*)$", v)
    if not m:
        return epoch + v + local
    release = [int(p) for p in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    rest = re.sub(r"[-_.]", "", m.group(2))
    rest = re.sub(r"^(alpha|a)(\d*)", r"a\2", rest)
    rest = re.sub(r"^(beta|b)(\d*)", r"b\2", rest)
    rest = re.sub(r"^(preview|pre|rc|c)(\d*)", r"rc\2", rest)
    rest = re.sub(r"(a|b|rc|post|dev)(?=\D|$)", r"\g<1>0", rest)
    return epoch + ".".join(map(str, release)) + rest + local


def parse_lock(path: Path, label: str) -> list[Pin]:
    """Every pin of the lock file at ``path``; BundleError naming ``label``, file and line otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{label}: cannot read dependency lock {path}: {exc}; "
                          f"fix: make it a UTF-8 requirements file of name==version lines") from None
    pins: list[Pin] = []
    errors: list[str] = []
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    if pending:
        logical.append((start, pending))
    for number, line in logical:
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line or line.startswith(_IGNORED_OPTIONS):
            continue
        hashes = tuple(_HASH.findall(" " + line))
        requirement = _HASH.sub("", " " + line).strip()
        m = _PIN.match(requirement)
        if not m:
            errors.append(f"line {number}: {line!r} is not an exact pin name==version")
            continue
        pins.append(Pin(m["name"], m["version"], number, (m["marker"] or "").strip() or None, hashes))
    if errors:
        raise BundleError(f"{label}: dependency lock {path} is not a lock:\n  " + "\n  ".join(errors)
                          + "\nfix: pin every package exactly (pip freeze or pip-compile write such a file)")
    return pins


def _marker_applies(pin: Pin, label: str, path: Path) -> bool:
    if pin.marker is None:
        return True
    try:
        from packaging.markers import InvalidMarker, Marker
    except ImportError:  # pragma: no cover - packaging is installed with aiokafka
        raise BundleError(f"{label}: {path} line {pin.line} has an environment marker, which needs the "
                          f"`packaging` package; fix: pip install packaging, or drop the marker") from None
    try:
        return Marker(pin.marker).evaluate()
    except InvalidMarker as exc:
        raise BundleError(f"{label}: {path} line {pin.line}: invalid environment marker {pin.marker!r}: {exc}; "
                          f"fix: write a PEP 508 marker") from None


def unsatisfied(pins: list[Pin], label: str, path: Path) -> list[str]:
    """One line per pin the installed environment does not satisfy (empty list: all good)."""
    problems = []
    for pin in pins:
        if not _marker_applies(pin, label, path):
            continue
        try:
            installed = importlib.metadata.version(pin.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"line {pin.line}: {pin} is not installed")
            continue
        if normalize_version(installed) != normalize_version(pin.version):
            problems.append(f"line {pin.line}: {pin} is pinned but {pin.name}=={installed} is installed")
    return problems
