"""The bundle archive: one deterministic ``.fdb`` file (a gzip-compressed POSIX tar).

Packing is deterministic: ``MANIFEST.json`` first, then files sorted by path; every entry is a
regular file with mode 0644, uid/gid 0, no owner names and a fixed mtime; the gzip header has
no file name and mtime 0. The same files therefore always give the same bytes.

Reading is one streaming pass (:func:`unpack`) that trusts nothing but the manifest, and the
manifest only as far as its digest:

* ``MANIFEST.json`` must be the first member; its digest is checked against the expected one
  (when given) before any other member is read.
* An archive holds **exactly the files its manifest lists**: a member it does not list
  (``__pycache__/``, ``*.pyc`` and ``.DS_Store`` included: nothing is "litter" in an archive)
  is refused by name; so are members with an absolute path, a ``..`` component or a backslash,
  links, devices, fifos, sparse or other special entries, and duplicates.
* **Limits** (:class:`Limits`: total unpacked bytes, member count) are checked against what
  the manifest declares before anything is extracted; each member's header size must equal
  its manifest size; the bytes actually read are counted and never more than the manifest
  size is read. The decompressed stream as a whole is counted too (headers, padding, members
  being skipped), and pax / GNU long-name headers are bounded, so a header that lies cannot
  make the reader inflate or buffer more than the limits allow.
* Files are written only into a fresh directory, which the caller renames into place once
  everything verified: a refused archive leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.bundle.files import MANIFEST_NAME
from daemon.bundle.manifest import parse_manifest
from daemon.errors import BundleError, IntegrityError

SUFFIX = ".fdb"
FIXED_MTIME = 315532800  # 1980-01-01T00:00:00Z, also valid for zip tools
_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20
"""``MANIFEST.json`` itself (100,000 files take about 15 MiB)."""
MAX_HEADER_BYTES = 1 << 20
"""One pax or GNU long-name header block (a long path takes a few hundred bytes)."""
_OVERHEAD_PER_MEMBER = 4096  # tar header + pax header + padding, generously
_OVERHEAD = 1 << 20
_EXTRA_NAMED = 64  # members the manifest does not list, named before reading stops

ENV_MAX_BYTES = "FAILOVERD_REGISTRY__BUNDLE_MAX_UNPACKED_BYTES"
ENV_MAX_MEMBERS = "FAILOVERD_REGISTRY__BUNDLE_MAX_MEMBERS"


@dataclasses.dataclass(frozen=True)
class Limits:
    """How big an archive may be, unpacked (``[registry] bundle_max_*``, docs/configuration.md)."""

    max_unpacked_bytes: int = 4 << 30
    max_members: int = 100_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        """The defaults, overridden by the variables that override the ``[registry]`` keys."""
        values = {}
        for var, field in ((ENV_MAX_BYTES, "max_unpacked_bytes"), (ENV_MAX_MEMBERS, "max_members")):
            text = env.get(var, "").strip()
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                value = 0
            if value < 1:
                raise BundleError(f"environment variable {var}={text!r} is invalid: expected a whole number >= 1; "
                                  f"fix: set it to a positive integer or unset it")
            values[field] = value
        return cls(**values)


_configured: Limits | None = None


def configure(limits: Limits | None) -> None:
    """Set this process's limits (the daemon, from its configuration); None: back to :meth:`Limits.from_env`."""
    global _configured
    _configured = limits


def current_limits() -> Limits:
    return _configured if _configured is not None else Limits.from_env()


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


# ---- reading ---------------------------------------------------------------------------------

class _LimitExceeded(BundleError):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax / GNU long-name header bigger than :data:`MAX_HEADER_BYTES` before tarfile
    reads it into memory (tarfile would buffer whatever size the header claims)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER_BYTES:
            raise _LimitExceeded(f"an extended header of {self.size} bytes (at most {MAX_HEADER_BYTES} allowed)")
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]  # private in typeshed
        return member


class _Counted(io.RawIOBase):
    """The decompressed stream, counted: more than ``cap`` bytes read raises _LimitExceeded."""

    def __init__(self, fileobj: Any, cap: int) -> None:
        self.fileobj = fileobj
        self.cap = cap
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        data: bytes = self.fileobj.read(min(size, self.cap - self.count + 1))
        self.count += len(data)
        if self.count > self.cap:
            raise _LimitExceeded(f"more than {self.cap} bytes once decompressed")
        return data


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
    if member.issparse():
        return "sparse file"
    if not (member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.isdir()):
        return f"special entry (tar type {member.type!r})"
    if p.as_posix() in ("", "."):
        return "empty path"
    return None


def _damaged(path: Path, label: str, exc: BaseException) -> BundleError:
    return BundleError(f"{label}: {path} is a damaged archive: {type(exc).__name__}: {exc}; "
                       f"fix: rebuild or re-download it")


def _not_an_archive(path: Path, label: str, exc: BaseException | str) -> BundleError:
    return BundleError(f"{label}: {path} is not a bundle archive (gzip-compressed tar): {exc}; "
                       f"fix: pass a .fdb file from `failoverd bundle build`, or an unpacked bundle directory")


def _limit_error(path: Path, label: str, what: str) -> BundleError:
    return BundleError(f"{label}: refused: {what} (nothing was extracted); fix: if the bundle is really "
                       f"that big, raise [registry] bundle_max_unpacked_bytes / bundle_max_members (environment "
                       f"{ENV_MAX_BYTES} / {ENV_MAX_MEMBERS}); otherwise do not use this archive")


def _declared(manifest: dict[str, Any], manifest_size: int) -> tuple[int, int]:
    """(unpacked bytes, members) the manifest declares, the manifest included."""
    return sum(e["size"] for e in manifest["files"].values()) + manifest_size, len(manifest["files"]) + 1


def _parents(files: Any) -> set[str]:
    out: set[str] = set()
    for rel in files:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return out


def unpack(path: Path, dest: Path | None, label: str, *, expect_digest: str | None = None,
           limits: Limits | None = None) -> tuple[dict[str, Any], str]:
    """Check every member of the archive at ``path`` against its manifest, in one streaming pass;
    with ``dest`` (a directory that does not exist yet), also write the manifest and the files.

    Returns ``(manifest, digest)``. Raises BundleError for unsafe entries or a limit (naming each
    entry), IntegrityError when the content differs from the manifest (naming each file). On any
    error ``dest`` is removed again. ``limits`` (default :func:`current_limits`) bound what the
    manifest may declare; with ``expect_digest`` the manifest is pinned (it was admitted under the
    limits when stored), so it alone bounds the archive: a worker needs no configuration for it.
    """
    path = Path(path)
    limits = limits or current_limits()
    if dest is not None:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=False)
    try:
        return _unpack(path, dest, label, expect_digest, limits)
    except BaseException:
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _unpack(path: Path, dest: Path | None, label: str, expect_digest: str | None, limits: Limits
            ) -> tuple[dict[str, Any], str]:
    try:
        raw_file = open(path, "rb")
    except OSError as exc:
        raise BundleError(f"{label}: cannot read {path}: {exc}; fix: pass a readable .fdb archive") from None
    with raw_file:
        if raw_file.read(2) != b"\x1f\x8b":
            raise _not_an_archive(path, label, "no gzip header")
        raw_file.seek(0)
        gz = gzip.GzipFile(fileobj=raw_file, mode="rb")
        stream = _Counted(gz, limits.max_unpacked_bytes + _OVERHEAD_PER_MEMBER * limits.max_members + _OVERHEAD)
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo)
        except _LimitExceeded as exc:
            raise _limit_error(path, label, f"the archive holds {exc}") from None
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise _not_an_archive(path, label, exc) from None
        with tar:
            try:
                return _members(tar, stream, path, dest, label, expect_digest, limits)
            except _LimitExceeded as exc:
                raise _limit_error(path, label, f"the archive holds {exc}") from None
            except BundleError:
                raise
            except (tarfile.TarError, OSError, EOFError, zlib.error, RecursionError) as exc:
                raise _damaged(path, label, exc) from None


def _members(tar: tarfile.TarFile, stream: _Counted, path: Path, dest: Path | None, label: str, expect_digest: str | None,
             limits: Limits) -> tuple[dict[str, Any], str]:
    unsafe: list[str] = []
    problems: list[str] = []
    manifest: dict[str, Any] | None = None
    digest = ""
    manifest_error: BundleError | None = None
    files: dict[str, Any] = {}
    parents: set[str] = set()
    seen: set[str] = set()
    count = 0
    member_cap = limits.max_members
    stopped = ""
    try:
        for m in tar:
            count += 1
            if count > member_cap:
                raise _LimitExceeded(f"more than {member_cap} members")
            reason = _unsafe_reason(m)
            rel = PurePosixPath(m.name).as_posix()
            if reason is None and not m.isdir():
                if rel in seen:
                    reason = "appears more than once"
                seen.add(rel)
            if reason:
                unsafe.append(f"{m.name!r}: {reason}")
                continue
            if count == 1:
                if rel != MANIFEST_NAME or not m.isfile():
                    manifest_error = IntegrityError(
                        f"{label}: the first member of {path} is {m.name!r}, not {MANIFEST_NAME}; "
                        f"fix: build the archive with `failoverd bundle build`")
                    continue
                if m.size > MAX_MANIFEST_BYTES:
                    raise _LimitExceeded(f"a {MANIFEST_NAME} of {m.size} bytes (at most {MAX_MANIFEST_BYTES})")
                raw = _read_exact(tar, m, m.size)
                try:
                    manifest, digest = parse_manifest(raw, label)
                except BundleError as exc:
                    manifest_error = exc
                    continue
                if expect_digest and digest != expect_digest:
                    raise IntegrityError(f"{label}: {MANIFEST_NAME} has digest {digest}, expected {expect_digest}; "
                                         f"fix: this is a different bundle than the one asked for")
                total, members = _declared(manifest, len(raw))
                if not expect_digest:  # a pinned manifest was admitted under the limits when it was stored
                    if total > limits.max_unpacked_bytes:
                        raise _limit_error(path, label, f"its manifest declares {total} bytes unpacked, more than "
                                                        f"the limit of {limits.max_unpacked_bytes}")
                    if members > limits.max_members:
                        raise _limit_error(path, label, f"its manifest declares {members} members, more than "
                                                        f"the limit of {limits.max_members}")
                # From here on the manifest bounds everything: its members (a few unlisted ones are
                # named before reading stops), its sizes, and the stream.
                member_cap = members + _EXTRA_NAMED
                stream.cap = stream.count + total + _OVERHEAD_PER_MEMBER * members + _OVERHEAD
                files = manifest["files"]
                parents = _parents(files)
                if dest is not None:
                    _write(dest / MANIFEST_NAME, raw)
                continue
            if manifest is None or unsafe or manifest_error:
                continue  # keep listing unsafe entries; nothing more is read or written
            if m.isdir():
                if rel not in parents:
                    problems.append(f"extra: {rel}/ (a directory the manifest does not list; not extracted)")
                continue
            entry = files.get(rel)
            if entry is None or rel == MANIFEST_NAME:
                problems.append(f"extra: {rel} ({m.size} bytes, not in the manifest; not extracted)")
                continue
            expected = f"sha256:{entry['sha256']} ({entry['size']} bytes)"
            if m.size != entry["size"]:
                problems.append(f"changed: {rel}: expected {expected}, actual {m.size} bytes in the archive header "
                                f"(not read)")
                continue
            actual, size = _copy(tar, m, entry["size"], None if problems or dest is None else dest / rel)
            if actual != entry["sha256"] or size != entry["size"]:
                problems.append(f"changed: {rel}: expected {expected}, actual sha256:{actual} ({size} bytes)")
    except _LimitExceeded as exc:
        if not (unsafe or problems or manifest_error):
            raise
        stopped = f"\n  (stopped reading there: the archive holds {exc})"  # the problems found say enough
    if unsafe:
        raise BundleError(f"{label}: refusing to unpack {path}: unsafe archive entries (nothing was extracted):\n  "
                          + "\n  ".join(unsafe) + stopped
                          + "\nfix: bundles contain only regular files with relative paths; rebuild with "
                            "`failoverd bundle build`")
    if manifest_error is not None:
        raise manifest_error
    if manifest is None:
        raise IntegrityError(f"{label}: no {MANIFEST_NAME} in {path}; fix: build it with `failoverd bundle build`")
    for rel in sorted(files.keys() - seen):
        entry = files[rel]
        problems.append(f"missing: {rel} (expected sha256:{entry['sha256']} ({entry['size']} bytes))")
    if problems:
        b = manifest.get("bundle") or {}
        raise IntegrityError(
            f"bundle {b.get('name')}@{b.get('version')} (digest {digest[:12]}) at {path} does not verify: "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(problems) + stopped
            + "\nfix: do not edit built bundles; rebuild from source with `failoverd bundle build`")
    return manifest, digest


def _read_exact(tar: tarfile.TarFile, member: tarfile.TarInfo, size: int) -> bytes:
    fh = tar.extractfile(member)
    data = fh.read(size + 1) if fh else b""
    if len(data) != size:
        raise BundleError(f"damaged archive: member {member.name!r} holds {len(data)} bytes where its header says "
                          f"{size}; fix: rebuild or re-download it")
    return data


def _write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "xb") as out:
        out.write(data)
    os.chmod(target, 0o644)


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, size: int, target: Path | None) -> tuple[str, int]:
    """(sha256, bytes read) of a member, reading at most ``size + 1`` bytes; written to ``target`` if given."""
    h = hashlib.sha256()
    read = 0
    src = tar.extractfile(member)
    assert src is not None, "a regular file member"  # _members passes only regular files
    out = None
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "xb")
    try:
        while read <= size:
            chunk = src.read(min(_CHUNK, size + 1 - read))
            if not chunk:
                break
            read += len(chunk)
            h.update(chunk)
            if out is not None and read <= size:
                out.write(chunk)
    finally:
        if out is not None and target is not None:
            out.close()
            os.chmod(target, 0o644)
    return h.hexdigest(), read


def peek_manifest(path: Path, label: str) -> tuple[dict[str, Any], str]:
    """``(manifest, digest)`` from the first member alone (``bundle inspect``; not a verification)."""
    path = Path(path)
    try:
        with tarfile.open(path, mode="r|gz", tarinfo=_BoundedTarInfo) as tar:
            first = tar.next()
            if first is None or PurePosixPath(first.name).as_posix() != MANIFEST_NAME or not first.isfile():
                raise IntegrityError(f"{label}: the first member of {path} is not {MANIFEST_NAME}; fix: build the "
                                     f"archive with `failoverd bundle build`")
            if first.size > MAX_MANIFEST_BYTES:
                raise _limit_error(path, label, f"a {MANIFEST_NAME} of {first.size} bytes")
            raw = _read_exact(tar, first, first.size)
    except _LimitExceeded as exc:
        raise _limit_error(path, label, f"the archive holds {exc}") from None
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _not_an_archive(path, label, exc) from None
    return parse_manifest(raw, label)


def extract(path: Path, dest: Path, label: str, *, expect_digest: str | None = None,
            limits: Limits | None = None) -> tuple[dict[str, Any], str]:
    """Verify and unpack the archive at ``path`` into ``dest`` (which must not exist yet, or be empty).

    Unpacks into a sibling temporary directory and renames it, so a refused archive leaves no
    ``dest``. Returns ``(manifest, digest)``.
    """
    dest = Path(dest)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    result = unpack(path, tmp, label, expect_digest=expect_digest, limits=limits)
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"{label}: cannot unpack {path} into {dest}: {exc}; fix: remove {dest} or choose an "
                          f"empty directory") from None
    return result
