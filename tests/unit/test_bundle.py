"""Bundle build, manifest and verify: determinism, every tampering named, every manifest error explained.

``make_source`` and ``build_tmp`` are shared by the other test_bundle*.py modules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import orjson
import pytest

from daemon.bundle import build, verify_dir, verify_path
from daemon.bundle.archive import extract
from daemon.bundle.manifest import canonical_json
from daemon.errors import BundleError, IntegrityError
from tests.conftest import ROOT

TOML = """\
[bundle]
name = "echo"
version = "{version}"
entrypoint = "{entrypoint}"
python = "{python}"
state_schema_version = 1

[schemas]
input = "schemas/input.json"
output = "schemas/output.json"

[data]
table = "data/table.csv"

[dependencies]
lock = "requirements.lock"

[metadata]
author = "tests"
trained = 2024-06-02T10:00:00Z
"""

MODEL = """\
from daemon.model import Prediction


class Echo:
    def __init__(self, context):
        self.context = context
        with open(context.data["table"], encoding="utf-8") as fh:
            self.rows = fh.read().splitlines()

    def predict(self, batch):
        return [Prediction({"echo": r.value["x"], "rows": len(self.rows)}, None) for r in batch]
"""

INPUT_SCHEMA = {"type": "object", "required": ["x"], "properties": {"x": {"type": "number"}}}
OUTPUT_SCHEMA = {"type": "object", "required": ["echo"], "properties": {"echo": {"type": "number"},
                                                                        "rows": {"type": "integer"}}}


def make_source(root: Path, *, version: str = "1.0.0", entrypoint: str = "model:Echo", python: str | None = None,
                **files) -> Path:
    """A minimal valid bundle source; ``files`` overrides (path with / as __) or removes (None) files."""
    python = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    content = {
        "bundle.toml": TOML.format(version=version, entrypoint=entrypoint, python=python),
        "code/model.py": MODEL,
        "schemas/input.json": json.dumps(INPUT_SCHEMA),
        "schemas/output.json": json.dumps(OUTPUT_SCHEMA),
        "data/table.csv": "a,b\n1,2\n3,4\n",
        "requirements.lock": "# nothing to pin\n",
    }
    for key, value in files.items():
        content[key.replace("__", "/")] = value
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in content.items():
        if text is None:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def build_tmp(tmp_path: Path, name: str = "src", **kw):
    return build(make_source(tmp_path / name, **kw), tmp_path / f"out-{name}")


# -- determinism --------------------------------------------------------------------------------

def test_same_source_twice_and_a_copy_elsewhere_give_same_digest_and_bytes(tmp_path):
    src = make_source(tmp_path / "src")
    a = build(src, tmp_path / "a")
    b = build(src, tmp_path / "b")
    copy = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(src, copy)
    for p in copy.rglob("*"):  # different mtimes and modes must not matter
        os.utime(p, (1_000_000, 1_000_000))
    os.chmod(copy / "code" / "model.py", 0o755)
    c = build(copy, tmp_path / "c")
    assert a.digest == b.digest == c.digest
    assert a.path.name == b.path.name == c.path.name == f"echo-1.0.0-{a.digest[:12]}.fdb"
    assert a.path.read_bytes() == b.path.read_bytes() == c.path.read_bytes()


def test_litter_is_ignored_and_any_content_change_changes_the_digest(tmp_path):
    src = make_source(tmp_path / "src")
    clean = build(src, tmp_path / "o1")
    (src / "code" / "__pycache__").mkdir()
    (src / "code" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0junk")
    (src / "stray.pyc").write_bytes(b"junk")
    (src / "data" / ".DS_Store").write_bytes(b"junk")
    littered = build(src, tmp_path / "o2")
    assert littered.digest == clean.digest
    assert littered.path.read_bytes() == clean.path.read_bytes()
    (src / "data" / "table.csv").write_text("a,b\n1,2\n3,5\n")
    assert build(src, tmp_path / "o3").digest != clean.digest


def test_archive_is_normalized_tar_gz_with_manifest_first(tmp_path):
    built = build_tmp(tmp_path)
    raw = built.path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip, header mtime 0
    assert not raw[3] & 0x08  # no file name in the gzip header
    with tarfile.open(built.path, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "MANIFEST.json" and names[1:] == sorted(names[1:])
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (315532800, 0, 0, "", "", 0o644, tarfile.REGTYPE)}


def test_manifest_records_every_file_and_its_sha256_is_the_digest(tmp_path):
    built = build_tmp(tmp_path)
    with tarfile.open(built.path, "r:gz") as tar:
        raw = tar.extractfile("MANIFEST.json").read()
    assert hashlib.sha256(raw).hexdigest() == built.digest
    manifest = orjson.loads(raw)
    assert canonical_json(manifest) == raw and b" " not in raw.split(b'"metadata"')[0]
    src = tmp_path / "src"
    assert sorted(manifest["files"]) == ["bundle.toml", "code/model.py", "data/table.csv", "requirements.lock",
                                         "schemas/input.json", "schemas/output.json"]
    for rel, entry in manifest["files"].items():
        data = (src / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest["bundle"] == {"name": "echo", "version": "1.0.0", "entrypoint": "model:Echo", "code": "code",
                                  "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "state_schema_version": 1}
    assert manifest["data"] == {"table": "data/table.csv"}
    assert manifest["metadata"] == {"author": "tests", "trained": "2024-06-02T10:00:00+00:00"}


def test_build_refuses_symlinks_and_an_output_dir_inside_the_source(tmp_path):
    src = make_source(tmp_path / "src")
    with pytest.raises(BundleError, match=r"inside the source"):
        build(src, src / "dist")
    os.symlink("/etc/hostname", src / "data" / "link")
    with pytest.raises(BundleError, match=r"symlinks or special files.*data/link"):
        build(src, tmp_path / "out")


# -- verify: every tampering named -------------------------------------------------------------

def _unpacked(tmp_path: Path) -> tuple[Path, str]:
    built = build_tmp(tmp_path)
    root = tmp_path / "unpacked"
    extract(built.path, root, "test")
    return root, built.digest


def test_verify_accepts_an_untouched_bundle_as_archive_and_as_directory(tmp_path):
    built = build_tmp(tmp_path)
    assert verify_path(built.path).digest == built.digest
    root, digest = _unpacked(tmp_path)
    v = verify_dir(root)
    assert (v.digest, v.ref) == (digest, "echo@1.0.0")


def test_verify_names_a_changed_file_with_expected_and_actual_digest(tmp_path):
    root, _ = _unpacked(tmp_path)
    path = root / "data" / "table.csv"
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[2] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        verify_dir(root)
    msg = str(err.value)
    assert "changed: data/table.csv" in msg
    assert f"expected sha256:{expected}" in msg and f"actual sha256:{hashlib.sha256(data).hexdigest()}" in msg
    assert "echo@1.0.0" in msg and "fix:" in msg


def test_verify_names_a_missing_file(tmp_path):
    root, _ = _unpacked(tmp_path)
    (root / "schemas" / "output.json").unlink()
    with pytest.raises(IntegrityError, match=r"missing: schemas/output\.json"):
        verify_dir(root)


def test_verify_names_an_extra_file(tmp_path):
    root, _ = _unpacked(tmp_path)
    (root / "code" / "backdoor.py").write_text("import os\n")
    with pytest.raises(IntegrityError, match=r"extra: code/backdoor\.py"):
        verify_dir(root)


def test_verify_cli_exits_nonzero_naming_each_bad_file(tmp_path):
    root, _ = _unpacked(tmp_path)
    (root / "data" / "table.csv").write_text("tampered\n")
    (root / "requirements.lock").unlink()
    (root / "extra.txt").write_text("hello\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "bundle", "verify", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for needle in ("changed: data/table.csv", "missing: requirements.lock", "extra: extra.txt", "3 problem(s)"):
        assert needle in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "daemon", "bundle", "verify", str(build_tmp(tmp_path, "b").path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: echo@1.0.0"), ok.stderr


def _repack(src: Path, dest: Path, change: dict[str, bytes | None]) -> None:
    """Copy archive ``src`` to ``dest`` replacing (bytes) or dropping (None) members."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dest, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name in change:
                if change[m.name] is None:
                    continue
                data = change[m.name]
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def test_verify_of_a_tampered_archive_names_the_file(tmp_path):
    built = build_tmp(tmp_path)
    bad = tmp_path / "bad.fdb"
    _repack(built.path, bad, {"code/model.py": MODEL.replace("len(self.rows)", "0").encode()})
    with pytest.raises(IntegrityError, match=r"changed: code/model\.py: expected sha256:"):
        verify_path(bad)
    _repack(built.path, bad, {"data/table.csv": None})
    with pytest.raises(IntegrityError, match=r"missing: data/table\.csv"):
        verify_path(bad)


def test_an_edited_manifest_does_not_verify(tmp_path):
    root, _ = _unpacked(tmp_path)
    manifest = orjson.loads((root / "MANIFEST.json").read_bytes())
    (root / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(IntegrityError, match="not in canonical form"):
        verify_dir(root)
    manifest["bundle"]["entrypoint"] = "model:Other"  # canonical, but disagrees with bundle.toml
    (root / "MANIFEST.json").write_bytes(canonical_json(manifest))
    with pytest.raises(IntegrityError, match="does not agree with bundle.toml"):
        verify_dir(root)
    (root / "MANIFEST.json").unlink()
    with pytest.raises(IntegrityError, match="MANIFEST.json is missing"):
        verify_dir(root)


def test_verify_refuses_an_unexpected_digest(tmp_path):
    root, digest = _unpacked(tmp_path)
    with pytest.raises(IntegrityError, match=f"has digest {digest}, expected 0000"):
        verify_dir(root, expect_digest="0000" + digest[4:])


# -- manifest errors: each names the bundle, the file and the fix -------------------------------

MANIFEST_ERRORS = {
    "bad TOML": ({"bundle.toml": "[bundle\nname = 1\n"}, r"bundle\.toml is not valid TOML"),
    "missing field": ({"bundle.toml": TOML.replace('version = "{version}"\n', "")},
                      r"\[bundle\] version is missing"),
    "bad entrypoint syntax": ({"entrypoint": "model.Echo"},
                              r"\[bundle\] entrypoint = 'model\.Echo' is malformed; e\.g\. entrypoint = \"model:"),
    "entrypoint module file missing": ({"entrypoint": "scorer:Echo"},
                                       r"module 'scorer' not found: expected code/scorer\.py"),
    "missing schema file": ({"schemas__output.json": None},
                            r"\[schemas\] output = 'schemas/output\.json': file .*output\.json does not exist"),
    "schema not JSON": ({"schemas__input.json": "{not json"}, r"\[schemas\] input = .* is not JSON"),
    "invalid JSON Schema": ({"schemas__input.json": json.dumps({"type": 12})},
                            r"\[schemas\] input = 'schemas/input\.json': not a valid JSON Schema at type"),
    "missing data file": ({"data__table.csv": None}, r"\[data\] table = 'data/table\.csv': file .* does not exist"),
    "lock not pinned": ({"requirements.lock": "orjson>=3\n"}, r"line 1: 'orjson>=3' is not an exact pin"),
    "missing lock": ({"requirements.lock": None}, r"\[dependencies\] lock = 'requirements\.lock': file"),
    "unknown key": ({"bundle.toml": TOML.replace("[schemas]", "[schemas]\nexample = 'x'")},
                    r"\[schemas\] unknown key 'example'"),
    "path escapes": ({"bundle.toml": TOML.replace('table = "data/table.csv"', 'table = "../secret"')},
                     r"must be a relative path inside the bundle"),
    "state schema version": ({"bundle.toml": TOML.replace("state_schema_version = 1", 'state_schema_version = "1"')},
                             r"state_schema_version must be an integer"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_ERRORS))
def test_manifest_errors_name_bundle_file_and_fix(tmp_path, case):
    overrides, pattern = MANIFEST_ERRORS[case]
    kw = {k: v for k, v in overrides.items() if k in ("entrypoint", "version")}
    files = {k: v for k, v in overrides.items() if k not in kw}
    if "{entrypoint}" in (files.get("bundle.toml") or ""):
        files["bundle.toml"] = files["bundle.toml"].format(version="1.0.0", entrypoint="model:Echo",
                                                           python=f"{sys.version_info[0]}.{sys.version_info[1]}")
    src = make_source(tmp_path / "src", **kw, **{k.replace("/", "__"): v for k, v in files.items()})
    with pytest.raises(BundleError) as err:
        build(src, tmp_path / "out")
    msg = str(err.value)
    assert re.search(pattern, msg), msg
    assert "bundle.toml" in msg and "fix" in msg
    if case != "bad TOML":
        assert "bundle echo" in msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_manifest_errors_are_all_reported_at_once(tmp_path):
    src = make_source(tmp_path / "src", entrypoint="model.Echo", **{"data__table.csv": None,
                                                                    "schemas__input.json": '{"type": 12}'})
    with pytest.raises(BundleError) as err:
        build(src, tmp_path / "out")
    msg = str(err.value)
    assert "entrypoint" in msg and "data/table.csv" in msg and "schemas/input.json" in msg
