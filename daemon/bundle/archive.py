"""The bundle archive: one deterministic ``.fdb`` file (a gzip-compressed POSIX tar).

Packing is deterministic: ``MANIFEST.json`` first, then files sorted by path; every entry is a
regular file with mode 0644, uid/gid 0, no owner names and a fixed mtime; the gzip header has
no file name and mtime 0. The same files therefore always give the same bytes.

Unpacking is safe: every member is checked before anything is written, and the archive is
refused (nothing extracted) if any member has an absolute path, a ``..`` component, a
backslash, is a symlink, hardlink, device, fifo or anything but a regular file or directory,
or appears twice.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path, PurePosixPath

from daemon.bundle.files import MANIFEST_NAME
from daemon.errors import BundleError

SUFFIX = ".fdb"
FIXED_MTIME = 315532800  # 1980-01-01T00:00:00Z, also valid for zip tools
_CHUNK = 1 << 20


def archive_name(name: str, version: str, digest: str) -> str:
    return f"{name}-{version}-{digest[:12]}{SUFFIX}"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def pack(root: Path, files: list[str], manifest_bytes: bytes, dest: Path) -> None:
    """Write the archive of ``files`` (relative to ``root``) plus the manifest to ``dest`` atomically."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_info(MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
                    for rel in sorted(files):
                        path = root / rel
                        with open(path, "rb") as fh:
                            tar.addfile(_info(rel, os.fstat(fh.fileno()).st_size), fh)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in p.parts:
        return "'..' path component"
    if "\\" in name:
        return "backslash in path"
    if member.issym():
        return f"symlink (to {member.linkname!r})"
    if member.islnk():
        return f"hardlink (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "fifo"
    if not (member.isreg() or member.isdir()):
        return f"special entry (tar type {member.type!r})"
    if p.as_posix() in ("", "."):
        return "empty path"
    return None


def open_archive(path: Path, label: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{label}: {path} is not a bundle archive (gzip-compressed tar): {exc}; "
                          f"fix: pass a .fdb file from `failoverd bundle build`, or an unpacked bundle directory"
                          ) from None


def safe_members(tar: tarfile.TarFile, path: Path, label: str) -> list[tarfile.TarInfo]:
    """All members, after checking every one; BundleError listing each unsafe member otherwise."""
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{label}: {path} is a damaged archive: {exc}; fix: rebuild or re-download it") from None
    problems, seen = [], set()
    for m in members:
        reason = _unsafe_reason(m)
        key = PurePosixPath(m.name).as_posix()
        if reason is None and m.isreg():
            if key in seen:
                reason = "appears more than once"
            seen.add(key)
        if reason:
            problems.append(f"{m.name!r}: {reason}")
    if problems:
        raise BundleError(f"{label}: refusing to unpack {path}: unsafe archive entries (nothing was extracted):\n  "
                          + "\n  ".join(problems)
                          + "\nfix: bundles contain only regular files with relative paths; rebuild with "
                            "`failoverd bundle build`")
    return members


def read_member(tar: tarfile.TarFile, members: list[tarfile.TarInfo], name: str) -> bytes | None:
    for m in members:
        if m.isreg() and PurePosixPath(m.name).as_posix() == name:
            fh = tar.extractfile(m)
            return fh.read() if fh else None
    return None


def extract(path: Path, dest: Path, label: str) -> None:
    """Safely unpack the archive at ``path`` into the (new or empty) directory ``dest``."""
    dest = Path(dest)
    with open_archive(path, label) as tar:
        members = safe_members(tar, path, label)
        dest.mkdir(parents=True, exist_ok=True)
        base = dest.resolve()
        for m in members:
            rel = PurePosixPath(m.name).as_posix()
            target = (base / rel).resolve()
            if base != target and base not in target.parents:  # defence in depth; checked above
                raise BundleError(f"{label}: archive entry {m.name!r} escapes {dest}")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with open(target, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                os.chmod(target, 0o644)
            except (OSError, tarfile.TarError, EOFError) as exc:
                raise BundleError(f"{label}: cannot unpack entry {m.name!r} of {path} into {dest}: {exc}; "
                                  f"fix: rebuild the archive, or check free space and permissions") from None
