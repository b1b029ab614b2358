"""Build a bundle: check ``bundle.toml``, hash every file, write the manifest, pack one archive.

Building the same source twice (or a copy of it elsewhere) gives the same digest and the same
archive bytes. ``with_wheels`` adds the lock's wheels (``pip download --no-deps``: the lock lists
every package) under ``wheels/``, so a host without a package index builds the release's own
environment from them (``daemon.bundle.environments``: ``uv pip install --no-index --find-links``).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemon.bundle import archive
from daemon.bundle import files as bfiles
from daemon.bundle.manifest import FORMAT, TOML_NAME, canonical_json, load_spec
from daemon.errors import BundleError
from daemon.progress import QUIET, Progress

WHEELS_DIR = "wheels"


@dataclasses.dataclass(frozen=True)
class Built:
    path: Path
    digest: str
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.manifest['bundle']['name']}@{self.manifest['bundle']['version']}"


def _download_wheels(src: Path, spec: dict[str, Any], dest: Path, label: str, progress: Progress = QUIET) -> None:
    lock = src / spec["dependencies"]["lock"]
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
           "--no-deps", "--only-binary=:all:", "--python-version", spec["bundle"]["python"],
           "--dest", str(dest), "-r", str(lock)]
    pins = sum(1 for line in lock.read_text().splitlines() if line.strip() and line.strip()[0] not in "#-")
    progress.step(f"downloading {pins} wheel(s) of {lock.name}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    got = 0
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:  # pip says "Saved ..." or "File was already downloaded ..." per wheel
        out.append(line)
        if line.startswith(("Saved ", "File was already downloaded")):
            got += 1
            progress.update(got, pins, " wheels")
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise BundleError(f"{label}: pip download of {lock} failed (exit {proc.returncode}):\n"
                          f"{(err or ''.join(out[-20:])).strip()}\n"
                          f"fix: check that every pin exists as a wheel for Python {spec['bundle']['python']} "
                          f"and that the package index is reachable, or build without --with-wheels")


def build(src: Path, out: Path, *, with_wheels: bool = False, progress: Progress = QUIET) -> Built:
    """Build the bundle in directory ``src`` into ``out/{name}-{version}-{digest12}.fdb``
    (``progress``: what it is doing, for a terminal)."""
    src = Path(src).resolve()
    out = Path(out).resolve()
    if not src.is_dir():
        raise BundleError(f"bundle source {src} is not a directory; fix: pass the directory holding {TOML_NAME}")
    if out == src or src in out.parents:
        raise BundleError(f"bundle source {src}: --out {out} is inside the source, so the archive would end up "
                          f"in the next build; fix: choose an output directory outside it (e.g. dist/)")
    spec = load_spec(src)
    b = spec["bundle"]
    label = f"bundle {b['name']}@{b['version']} ({src})"
    files, others = bfiles.scan(src)
    if others:
        raise BundleError(f"{label}: symlinks or special files cannot be part of a bundle: "
                          + ", ".join(others) + "; fix: replace them with regular files or remove them")
    files = [f for f in files if f != bfiles.MANIFEST_NAME]  # rebuilding from an unpacked bundle
    with tempfile.TemporaryDirectory(prefix="failoverd-build-") as tmp:
        roots = {f: src for f in files}
        if with_wheels:
            if any(f.startswith(WHEELS_DIR + "/") for f in files):
                raise BundleError(f"{label}: the source already has a {WHEELS_DIR}/ directory; fix: remove it "
                                  f"(--with-wheels fills it from the lock) or build without --with-wheels")
            wheel_dir = Path(tmp) / WHEELS_DIR
            wheel_dir.mkdir()
            _download_wheels(src, spec, wheel_dir, label, progress)
            for w in sorted(p.name for p in wheel_dir.iterdir()):
                roots[f"{WHEELS_DIR}/{w}"] = Path(tmp)
            spec["dependencies"]["wheels"] = WHEELS_DIR
        entries = {}
        progress.step(f"hashing {len(roots)} file(s)")
        for i, rel in enumerate(sorted(roots), 1):
            digest, size = bfiles.digest_file(roots[rel] / rel)
            entries[rel] = {"sha256": digest, "size": size}
            progress.update(i, len(roots), " files hashed")
        manifest = {"format": FORMAT, **spec, "files": entries}
        manifest_bytes = canonical_json(manifest)
        digest = bfiles.digest_bytes(manifest_bytes)
        out.mkdir(parents=True, exist_ok=True)
        dest = out / archive.archive_name(b["name"], b["version"], digest)
        staging = Path(tmp) / "stage"
        if with_wheels:  # one root to pack from: copy the source and the wheels side by side
            for rel, root in roots.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, staging / rel)
        progress.step(f"packing {dest.name}")
        archive.pack(staging if with_wheels else src, list(roots), manifest_bytes, dest)
    progress.done()
    return Built(dest, digest, manifest)
