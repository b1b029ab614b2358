"""open_bundle, Bundle.instantiate and Bundle.check_environment."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from daemon.bundle import open_bundle
from daemon.errors import BundleError, IntegrityError
from daemon.model import ModelContext, Prediction, Record
from tests.unit.test_bundle import MODEL, _repack, build_tmp


def test_open_unpacks_into_digest_dir_with_all_attributes(tmp_path):
    built = build_tmp(tmp_path)
    b = open_bundle(built.path, tmp_path / "unpack")
    assert b.root == (tmp_path / "unpack" / built.digest).resolve()
    assert (b.name, b.version, b.digest, b.entrypoint, b.state_schema_version) == (
        "echo", "1.0.0", built.digest, "model:Echo", 1)
    assert b.manifest == built.manifest
    assert b.input_schema["required"] == ["x"] and b.output_schema["required"] == ["echo"]
    assert b.data == {"table": b.root / "data" / "table.csv"} and b.data["table"].is_file()
    ctx = b.context()
    assert isinstance(ctx, ModelContext)
    assert (ctx.name, ctx.version, ctx.digest, ctx.root, ctx.manifest) == (b.name, b.version, b.digest, b.root,
                                                                           b.manifest)
    assert open_bundle(b.root).digest == built.digest  # an unpacked directory opens too


def test_reopen_reuses_a_verified_dir_and_repairs_a_tampered_one(tmp_path):
    built = build_tmp(tmp_path)
    first = open_bundle(built.path, tmp_path / "u")
    marker = first.root.stat().st_ino
    second = open_bundle(built.path, tmp_path / "u")
    assert second.root == first.root and second.root.stat().st_ino == marker  # reused
    (first.root / "data" / "table.csv").write_text("tampered\n")
    third = open_bundle(built.path, tmp_path / "u")
    assert (third.root / "data" / "table.csv").read_text() == "a,b\n1,2\n3,4\n"  # unpacked again


def test_a_tampered_archive_is_refused_and_leaves_nothing_unpacked(tmp_path):
    built = build_tmp(tmp_path)
    bad = tmp_path / "bad.fdb"
    _repack(built.path, bad, {"data/table.csv": b"a,b\n9,9\n"})
    with pytest.raises(IntegrityError) as err:
        open_bundle(bad, tmp_path / "u")
    assert "changed: data/table.csv: expected sha256:" in str(err.value) and str(bad) in str(err.value)
    assert list((tmp_path / "u").iterdir()) == []


def test_expected_digest_mismatch_is_refused(tmp_path):
    built = build_tmp(tmp_path)
    with pytest.raises(IntegrityError, match=f"has digest {built.digest}, expected"):
        open_bundle(built.path, tmp_path / "u", expect_digest="f" * 64)


def test_instantiate_imports_the_entrypoint_and_passes_the_context(tmp_path):
    b = open_bundle(build_tmp(tmp_path).path, tmp_path / "u")
    model = b.instantiate()
    assert model.context == b.context()
    out = model.predict([Record("k", {"x": 4.5})])
    assert out == [Prediction({"echo": 4.5, "rows": 3}, None)]
    assert not list(b.root.rglob("__pycache__"))  # the verified tree stays clean
    open_bundle(b.root)  # and still verifies


def test_two_bundles_with_the_same_module_name_load_their_own_code(tmp_path):
    a = open_bundle(build_tmp(tmp_path, "a").path, tmp_path / "u")
    other = MODEL.replace('"rows": len(self.rows)', '"rows": -1')
    b = open_bundle(build_tmp(tmp_path, "b", version="2.0.0",
                              **{"code__model.py": other}).path, tmp_path / "u")
    assert a.instantiate().predict([Record(None, {"x": 1})])[0].output["rows"] == 3
    assert b.instantiate().predict([Record(None, {"x": 1})])[0].output["rows"] == -1
    assert a.instantiate().predict([Record(None, {"x": 1})])[0].output["rows"] == 3


BROKEN_CODE = {
    "missing import": ("import no_such_package_failoverd_test\n" + MODEL,
                       r"importing entrypoint module 'model' \(code/model\.py\) failed: ModuleNotFoundError: "
                       r"No module named 'no_such_package_failoverd_test'"),
    "syntax error": (MODEL + "\ndef broken(:\n", r"importing entrypoint module 'model' \(code/model\.py\) failed: "
                                                 r"SyntaxError"),
    "missing class": (MODEL.replace("class Echo", "class Other"),
                      r"module 'model' \(code/model\.py\) has no class 'Echo'"),
    "constructor raises": (MODEL.replace("self.context = context", "raise ValueError('no weights')"),
                           r"constructing model:Echo \(code/model\.py\) failed: ValueError: no weights"),
    "no predict": (MODEL.replace("def predict", "def guess"), r"has no predict\(batch\) method"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CODE))
def test_entrypoint_failures_name_bundle_module_and_file(tmp_path, case):
    code, pattern = BROKEN_CODE[case]
    b = open_bundle(build_tmp(tmp_path, **{"code__model.py": code}).path, tmp_path / "u")
    with pytest.raises(BundleError, match=pattern) as err:
        b.instantiate()
    assert "bundle echo@1.0.0" in str(err.value) and "fix:" in str(err.value)


# -- the lock against the installed environment ----------------------------------------------

def _with_lock(tmp_path, lock: str, **kw):
    return open_bundle(build_tmp(tmp_path, **{"requirements.lock": lock}, **kw).path, tmp_path / "u")


def test_a_lock_the_environment_satisfies_passes(tmp_path):
    orjson_version = importlib.metadata.version("orjson")
    lock = (f"# pinned\nORJSON=={orjson_version} \\\n    --hash=sha256:{'0' * 64}\n"
            f"typing_extensions=={importlib.metadata.version('typing-extensions')}\n"
            "--index-url https://pypi.org/simple\n"
            'no-such-package-failoverd==1.0 ; sys_platform == "no-such-platform"\n')
    _with_lock(tmp_path, lock).check_environment()


def test_a_missing_package_and_a_wrong_version_are_both_named(tmp_path):
    installed = importlib.metadata.version("orjson")
    b = _with_lock(tmp_path, "no-such-package-failoverd==1.0\norjson==0.0.1\n")
    with pytest.raises(BundleError) as err:
        b.check_environment()
    msg = str(err.value)
    assert "requirements.lock line 1: no-such-package-failoverd==1.0 is not installed" in msg
    assert f"requirements.lock line 2: orjson==0.0.1 is pinned but orjson=={installed} is installed" in msg
    assert "bundle echo@1.0.0" in msg and "fix: run it with Python" in msg and "pip install -r" in msg


def test_a_different_python_is_refused(tmp_path):
    b = _with_lock(tmp_path, "", python="3.9")
    with pytest.raises(BundleError, match=rf"built for Python 3\.9, running Python {sys.version_info[0]}\."
                                          rf"{sys.version_info[1]}"):
        b.check_environment()
