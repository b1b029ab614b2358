"""Re-hash a built bundle and compare it with its manifest.

A bundle verifies when every file its ``MANIFEST.json`` lists is present with the recorded
size and sha256, no other file is present (``__pycache__/`` and ``*.pyc`` included: in a built
bundle they are code, not litter), ``MANIFEST.json`` is canonical (its sha256 is the bundle
digest) and agrees with ``bundle.toml``. An archive is checked member by member while it is
unpacked into a temporary directory (:func:`daemon.bundle.archive.unpack`: exactly the
manifest's files, within the size limits), then as a directory.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from daemon.bundle import archive
from daemon.bundle import files as bfiles
from daemon.bundle.manifest import load_spec, read_manifest, spec_of
from daemon.errors import BundleError, IntegrityError


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str  # missing | extra | changed | unsafe
    path: str
    expected: str | None = None
    actual: str | None = None

    def __str__(self) -> str:
        if self.kind == "changed":
            return f"changed: {self.path}: expected {self.expected}, actual {self.actual}"
        if self.kind == "missing":
            return f"missing: {self.path} (expected {self.expected})"
        if self.kind == "extra":
            return f"extra: {self.path} (sha256:{self.actual}, not in the manifest)"
        return f"unsafe: {self.path} ({self.actual})"


@dataclasses.dataclass(frozen=True)
class Verified:
    root: Path
    manifest: dict[str, Any]
    digest: str

    @property
    def ref(self) -> str:
        b = self.manifest["bundle"]
        return f"{b['name']}@{b['version']}"


def problems_of(root: Path, manifest: dict[str, Any]) -> list[Problem]:
    """Every difference between the files under ``root`` and ``manifest['files']``."""
    present, others = bfiles.scan(root, litter=True)
    present_set = set(present) - {bfiles.MANIFEST_NAME}
    found: list[Problem] = []
    for rel, entry in sorted(manifest["files"].items()):
        expected = f"sha256:{entry['sha256']} ({entry['size']} bytes)"
        if rel not in present_set:
            found.append(Problem("missing", rel, expected=expected))
            continue
        digest, size = bfiles.digest_file(root / rel)
        if digest != entry["sha256"] or size != entry["size"]:
            found.append(Problem("changed", rel, expected=expected, actual=f"sha256:{digest} ({size} bytes)"))
    for rel in sorted(present_set - manifest["files"].keys()):
        found.append(Problem("extra", rel, actual=bfiles.digest_file(root / rel)[0]))
    for rel in others:
        found.append(Problem("unsafe", rel, actual="symlink or special file"))
    return found


def verify_dir(root: Path, *, expect_digest: str | None = None, label: str | None = None) -> Verified:
    """Check an unpacked bundle; IntegrityError naming each bad file with both digests."""
    root = Path(root)
    where = label or str(root)
    manifest, digest, _ = read_manifest(root, f"bundle at {where}")
    b = manifest.get("bundle") or {}
    name = f"{b.get('name')}@{b.get('version')}"
    if expect_digest and digest != expect_digest:
        raise IntegrityError(f"bundle {name} at {where}: {bfiles.MANIFEST_NAME} has digest {digest}, "
                             f"expected {expect_digest}; fix: this is a different bundle than the one asked for")
    problems = problems_of(root, manifest)
    if problems:
        raise IntegrityError(
            f"bundle {name} (digest {digest[:12]}) at {where} does not verify: {len(problems)} problem(s):\n  "
            + "\n  ".join(map(str, problems))
            + "\nfix: do not edit built bundles; rebuild from source with `failoverd bundle build`")
    try:
        spec = load_spec(root)
    except BundleError as exc:
        raise BundleError(f"bundle {name} at {where}: its files verify but its bundle.toml does not: {exc}") from None
    if spec != spec_of(manifest):
        raise IntegrityError(f"bundle {name} at {where}: {bfiles.MANIFEST_NAME} does not agree with bundle.toml; "
                             f"fix: rebuild the bundle with `failoverd bundle build`")
    return Verified(root, manifest, digest)


def verify_path(path: Path) -> Verified:
    """Verify an archive (unpacked into a temporary directory, then removed) or a directory.

    The returned ``root`` is only valid for directories; for archives it no longer exists.
    """
    path = Path(path)
    if path.is_dir():
        return verify_dir(path)
    if not path.exists():
        raise BundleError(f"bundle {path}: no such file or directory; fix: pass a .fdb archive or an unpacked bundle")
    with tempfile.TemporaryDirectory(prefix="failoverd-verify-") as tmp:
        archive.unpack(path, Path(tmp) / "b", f"bundle archive {path}")
        return verify_dir(Path(tmp) / "b", label=str(path))
