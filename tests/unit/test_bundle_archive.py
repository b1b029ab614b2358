"""Unsafe archive entries are refused before anything is extracted."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from daemon.bundle import open_bundle, verify_path
from daemon.bundle.archive import extract
from daemon.errors import BundleError
from tests.unit.test_bundle import build_tmp


def _craft(path: Path, bad: tarfile.TarInfo) -> Path:
    """A tar.gz whose first members are harmless files and whose last member is ``bad``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("MANIFEST.json", b"{}"), ("harmless.txt", b"extracted too early\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.addfile(bad, io.BytesIO(b"x" * bad.size) if bad.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


UNSAFE = {
    "absolute path": (_member("/tmp/failoverd-evil-abs", data=b"x"), "absolute path"),
    "dot-dot": (_member("../evil", data=b"x"), "'..' path component"),
    "nested dot-dot": (_member("code/../../evil", data=b"x"), "'..' path component"),
    "symlink": (_member("code/model.py", tarfile.SYMTYPE, "/etc/passwd"), "symlink (to '/etc/passwd')"),
    "hardlink": (_member("data/w.json", tarfile.LNKTYPE, "/etc/passwd"), "hardlink (to '/etc/passwd')"),
    "char device": (_member("dev/null", tarfile.CHRTYPE), "device file"),
    "block device": (_member("dev/sda", tarfile.BLKTYPE), "device file"),
    "fifo": (_member("pipe", tarfile.FIFOTYPE), "fifo"),
    "duplicate": (_member("harmless.txt", data=b"second copy"), "appears more than once"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_member_is_refused_and_nothing_is_extracted(tmp_path, case):
    bad, reason = UNSAFE[case]
    archive = _craft(tmp_path / "evil.fdb", bad)
    dest = tmp_path / "dest"
    with pytest.raises(BundleError) as err:
        extract(archive, dest, "bundle archive evil.fdb")
    msg = str(err.value)
    assert f"{bad.name!r}: {reason}" in msg and "nothing was extracted" in msg and "fix:" in msg
    assert not dest.exists()
    assert not (tmp_path / "evil").exists() and not Path("/tmp/failoverd-evil-abs").exists()

    unpack = tmp_path / "unpack"
    with pytest.raises(BundleError, match="unsafe archive entries"):
        open_bundle(archive, unpack)
    assert not unpack.exists() or not any(unpack.iterdir())
    with pytest.raises(BundleError, match="unsafe archive entries"):
        verify_path(archive)


def test_every_unsafe_member_is_listed(tmp_path):
    path = tmp_path / "evil.fdb"
    with tarfile.open(path, "w:gz") as tar:
        for info, _ in UNSAFE.values():
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    with pytest.raises(BundleError) as err:
        extract(path, tmp_path / "dest", "test")
    for info, reason in UNSAFE.values():
        if reason != "appears more than once":
            assert f"{info.name!r}: {reason}" in str(err.value)


def test_a_file_that_is_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "x.fdb"
    path.write_bytes(b"PK\x03\x04 not a tar.gz")
    with pytest.raises(BundleError, match=r"is not a bundle archive \(gzip-compressed tar\)"):
        open_bundle(path, tmp_path / "u")


def test_a_built_archive_extracts_to_regular_files_only(tmp_path):
    built = build_tmp(tmp_path)
    extract(built.path, tmp_path / "x", "test")
    files = sorted(p.relative_to(tmp_path / "x").as_posix() for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert files == sorted(["MANIFEST.json", *built.manifest["files"]])
    assert all(not p.is_symlink() for p in (tmp_path / "x").rglob("*"))
