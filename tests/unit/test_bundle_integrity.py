"""Integrity, whole (issue #13 point 5): every hostile archive is built here and refused.

Two archives with one digest must run the same code: extraction writes only the manifest's
files (``__pycache__``/``*.pyc`` are code, not litter), an unpack cache is trusted only when it
verifies with nothing extra, the store never swaps the bytes under a digest, the loader checks
the digest it was told to expect, and size limits hold even when a header lies.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import orjson
import pytest

from daemon.bundle import open_bundle, verify_dir, verify_path
from daemon.bundle.archive import ENV_MAX_MEMBERS, Limits, extract, unpack
from daemon.engine.loading import load_processor
from daemon.errors import BundleError, IntegrityError, RegistryError
from daemon.model import Record
from daemon.registry import Registry
from tests.conftest import ROOT
from tests.unit.test_bundle import MODEL, _repack, build_tmp, make_source

PYC = "code/__pycache__/model.cpython-311.pyc"
EVIL_MODEL = MODEL.replace('r.value["x"]', '-1')


def _with_extra(src: Path, dest: Path, extra: dict[str, bytes], *, level: int = 9) -> Path:
    """Copy archive ``src`` to ``dest`` (members and manifest unchanged) plus ``extra`` members at the end."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz", compresslevel=level) as tout:
        for m in tin.getmembers():
            tout.addfile(m, io.BytesIO(tin.extractfile(m).read()))
        for name, data in extra.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dest


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


# -- only the manifest's files ------------------------------------------------------------------

def test_a_smuggled_pyc_is_refused_at_unpack_naming_the_member_and_verify_says_not_ok(tmp_path):
    built = build_tmp(tmp_path)
    evil = _with_extra(built.path, tmp_path / "evil.fdb", {PYC: b"\xa7\r\r\n" + b"\0" * 12 + b"smuggled code"})
    dest = tmp_path / "dest"
    with pytest.raises(IntegrityError) as err:
        extract(evil, dest, "test")
    assert f"extra: {PYC} (" in str(err.value) and "not in the manifest" in str(err.value)
    assert not dest.exists() and not list(tmp_path.glob(".tmp-*"))  # nothing was written
    with pytest.raises(IntegrityError, match=f"extra: {PYC}"):
        open_bundle(evil, tmp_path / "unpack")
    assert not (tmp_path / "unpack" / built.digest).exists()
    with pytest.raises(IntegrityError, match=f"extra: {PYC}"):
        verify_path(evil)
    proc = _cli("bundle", "verify", str(evil))
    assert proc.returncode == 1 and not proc.stdout.startswith("ok"), proc.stdout + proc.stderr
    assert PYC in proc.stderr


@pytest.mark.parametrize("name", ["code/model.pyc", "code/backdoor.py", ".DS_Store", "data/__pycache__/x.pyc"])
def test_any_member_the_manifest_does_not_list_is_refused(tmp_path, name):
    built = build_tmp(tmp_path)
    evil = _with_extra(built.path, tmp_path / "evil.fdb", {name: b"import os\n"})
    with pytest.raises(IntegrityError, match=f"extra: {name} "):
        unpack(evil, None, "test")


def test_a_warm_unpack_dir_that_gained_a_pycache_is_not_trusted_and_is_unpacked_again(tmp_path):
    built = build_tmp(tmp_path)
    first = open_bundle(built.path, tmp_path / "u")
    (first.root / "code" / "__pycache__").mkdir()
    (first.root / PYC).write_bytes(b"smuggled")
    with pytest.raises(IntegrityError, match=f"extra: {PYC}"):
        verify_dir(first.root)
    again = open_bundle(built.path, tmp_path / "u")
    assert again.root == first.root and not (again.root / "code" / "__pycache__").exists()


def test_a_model_that_imports_lazily_writes_no_bytecode_into_its_bundle(tmp_path):
    lazy = MODEL.replace("    def predict(self, batch):\n",
                         "    def predict(self, batch):\n        import helper  # noqa: F401\n")
    built = build_tmp(tmp_path, **{"code/model.py": lazy, "code/helper.py": "X = 1\n"})
    b = open_bundle(built.path, tmp_path / "u")
    b.instantiate().predict([Record(None, {"x": 1}, None)])
    assert sys.modules["helper"].__file__.startswith(str(b.root))
    assert not list(b.root.rglob("__pycache__")) and not list(b.root.rglob("*.pyc"))
    inode = b.root.stat().st_ino
    assert open_bundle(built.path, tmp_path / "u").root.stat().st_ino == inode  # still trusted: reused


# -- bundle try with a warm cache ---------------------------------------------------------------

def test_bundle_try_refuses_a_tampered_archive_whose_digest_is_already_unpacked(tmp_path):
    built = build_tmp(tmp_path)
    unpack_dir = tmp_path / "cache"
    open_bundle(built.path, unpack_dir)  # warm: the cache holds the good bundle under its digest
    tampered = tmp_path / "tampered.fdb"
    _repack(built.path, tampered, {"code/model.py": EVIL_MODEL.encode()})  # same manifest, so same digest
    records = tmp_path / "in.jsonl"
    records.write_text('{"x": 2}\n')
    proc = _cli("bundle", "try", str(tampered), "--unpack-dir", str(unpack_dir), "--input", str(records))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "changed: code/model.py" in proc.stderr and proc.stdout == ""
    ok = _cli("bundle", "try", str(built.path), "--unpack-dir", str(unpack_dir), "--input", str(records))
    assert ok.returncode == 0 and orjson.loads(ok.stdout)["output"]["echo"] == 2, ok.stderr


# -- the store ----------------------------------------------------------------------------------

def test_the_store_never_replaces_the_bytes_under_a_digest(tmp_path):
    built = build_tmp(tmp_path)
    reg = Registry(tmp_path / "registry")
    digest = reg.add(built.path)
    stored = reg.bundle_path(digest)
    before = stored.read_bytes()
    assert reg.add(built.path) == digest and stored.read_bytes() == before  # same bytes: a no-op
    other = _with_extra(built.path, tmp_path / "other.fdb", {}, level=1)  # same files, other compression
    assert other.read_bytes() != before and verify_path(other).digest == digest
    with pytest.raises(RegistryError) as err:
        reg.add(other)
    msg = str(err.value)
    assert str(other) in msg and str(stored) in msg and "never replaced" in msg and "fix:" in msg
    assert stored.read_bytes() == before


# -- the expected digest ------------------------------------------------------------------------

def test_the_loader_refuses_a_bundle_whose_digest_is_not_the_expected_one(tmp_path):
    built = build_tmp(tmp_path)
    other = "ab" * 32
    with pytest.raises(IntegrityError) as err:
        load_processor(built.path, tmp_path / "u", expected_digest=other)
    assert built.digest in str(err.value) and other in str(err.value)
    assert not (tmp_path / "u" / built.digest).exists()  # refused before anything was unpacked or imported
    # The store names archives by digest: a worker given bundles/<digest>.fdb expects that digest.
    store = tmp_path / "bundles"
    store.mkdir()
    shutil.copyfile(built.path, store / f"{other}.fdb")
    with pytest.raises(IntegrityError, match=f"has digest {built.digest}, expected {other}"):
        load_processor(store / f"{other}.fdb", tmp_path / "u")
    shutil.copyfile(built.path, store / f"{built.digest}.fdb")
    _, info = load_processor(store / f"{built.digest}.fdb", tmp_path / "u")
    assert info["digest"] == built.digest


# -- limits -------------------------------------------------------------------------------------

def test_an_archive_over_the_member_or_size_limit_is_refused_before_anything_is_extracted(tmp_path):
    built = build_tmp(tmp_path)
    members = len(built.manifest["files"]) + 1
    with pytest.raises(BundleError, match=f"declares {members} members, more than the limit of 3"):
        extract(built.path, tmp_path / "a", "test", limits=Limits(max_members=3))
    with pytest.raises(BundleError, match=r"declares \d+ bytes unpacked, more than the limit of 100 "):
        extract(built.path, tmp_path / "b", "test", limits=Limits(max_unpacked_bytes=100))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The same limit from the environment (the CLI has no configuration file for bundle commands).
    proc = _cli("bundle", "verify", str(built.path), env={ENV_MAX_MEMBERS: "3"})
    assert proc.returncode == 1 and "more than the limit of 3" in proc.stderr and ENV_MAX_MEMBERS in proc.stderr
    bad = _cli("bundle", "verify", str(built.path), env={ENV_MAX_MEMBERS: "many"})
    assert bad.returncode == 1 and f"{ENV_MAX_MEMBERS}='many' is invalid" in bad.stderr
    # A pinned digest (the daemon's worker) is bounded by its admitted manifest, not the local limit.
    manifest, digest = unpack(built.path, None, "test", expect_digest=built.digest, limits=Limits(max_members=3))
    assert digest == built.digest


def _gz_tar(dest: Path, parts: list) -> Path:
    """A .fdb written block by block: ``parts`` are (TarInfo, data) or raw bytes (written as they are)."""
    with gzip.open(dest, "wb", compresslevel=1) as gz:
        for part in parts:
            if isinstance(part, bytes):
                gz.write(part)
                continue
            info, data = part
            gz.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            gz.write(data + b"\0" * (-len(data) % 512))
        gz.write(b"\0" * 1024)
    return dest


def _manifest_part(built) -> tuple:
    with tarfile.open(built.path, "r:gz") as tar:
        raw = tar.extractfile("MANIFEST.json").read()
    info = tarfile.TarInfo("MANIFEST.json")
    info.size = len(raw)
    return info, raw


def test_a_bomb_whose_header_lies_is_stopped_by_counting_bytes(tmp_path):
    """data/table.csv: 16 bytes says the tar header, 64 MiB says a pax override (the size tarfile
    uses), 16 says the manifest; 64 MiB of zeros follow. Refused, reading no more than the limit."""
    built = build_tmp(tmp_path)
    big = 64 << 20
    lying = tarfile.TarInfo("data/table.csv")
    lying.size = built.manifest["files"]["data/table.csv"]["size"]
    lying.pax_headers = {"size": str(big)}
    bomb = _gz_tar(tmp_path / "bomb.fdb", [_manifest_part(built),
                                           lying.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")]
                   + [b"\0" * (1 << 20)] * 64)
    assert bomb.stat().st_size < 1 << 20
    started = time.monotonic()
    with pytest.raises(BundleError) as err:
        extract(bomb, tmp_path / "x", "test", limits=Limits(max_unpacked_bytes=1 << 20))
    assert time.monotonic() - started < 5
    msg = str(err.value)
    assert "changed: data/table.csv: expected sha256:" in msg and f"actual {big} bytes in the archive header" in msg
    assert "(stopped reading there: the archive holds more than" in msg and "bytes once decompressed" in msg
    assert not (tmp_path / "x").exists()


def test_an_oversized_extended_header_is_refused_before_it_is_buffered(tmp_path):
    built = build_tmp(tmp_path)
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 8 << 20
    header = pax.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    bomb = _gz_tar(tmp_path / "pax.fdb", [_manifest_part(built), header] + [b"\0" * (1 << 20)] * 8)
    with pytest.raises(BundleError, match=f"an extended header of {8 << 20} bytes"):
        unpack(bomb, None, "test")


def test_a_member_larger_than_its_manifest_entry_is_not_read(tmp_path):
    built = build_tmp(tmp_path)
    big = tmp_path / "big.fdb"
    _repack(built.path, big, {"data/table.csv": b"\0" * (32 << 20)})
    with pytest.raises(IntegrityError, match=r"changed: data/table\.csv: expected sha256:\w+ \(\d+ bytes\), "
                                             r"actual 33554432 bytes in the archive header \(not read\)"):
        unpack(big, None, "test")
