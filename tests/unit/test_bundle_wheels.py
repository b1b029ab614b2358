"""``bundle build --with-wheels``: the lock's wheels travel inside the bundle (needs PyPI; skipped offline)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from daemon.bundle import build, open_bundle
from daemon.errors import BundleError
from tests.bundlesmith import pypi_reachable
from tests.unit.test_bundle import make_source

pytestmark = pytest.mark.skipif(not pypi_reachable(), reason="pypi.org is not reachable: --with-wheels needs an index")

PIN = f"iniconfig=={importlib.metadata.version('iniconfig')}"  # small, pure Python, installed with pytest


def test_with_wheels_bundles_the_locked_wheels_for_an_offline_install(tmp_path):
    src = make_source(tmp_path / "src", **{"requirements.lock": PIN + "\n"})
    built = build(src, tmp_path / "out", with_wheels=True)
    wheels = [f for f in built.manifest["files"] if f.startswith("wheels/")]
    assert len(wheels) == 1 and wheels[0].startswith("wheels/iniconfig-") and wheels[0].endswith(".whl")
    assert built.manifest["dependencies"] == {"lock": "requirements.lock", "wheels": "wheels"}
    assert build(src, tmp_path / "again", with_wheels=True).path.read_bytes() == built.path.read_bytes()
    assert build(src, tmp_path / "plain").digest != built.digest  # the wheels are part of the identity

    b = open_bundle(built.path, tmp_path / "u")
    assert b.wheels_dir == b.root / "wheels"
    b.check_environment()
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-index", "--find-links", str(b.wheels_dir), "-r", str(b.lock_path),
                           "--target", str(target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (target / "iniconfig").is_dir()


def test_with_wheels_fails_clearly_when_a_pin_has_no_wheel(tmp_path):
    src = make_source(tmp_path / "src", **{"requirements.lock": "iniconfig==0.0.0.0.1\n"})
    with pytest.raises(BundleError, match=r"(?s)pip download of .*requirements\.lock failed .*fix: check that"):
        build(src, tmp_path / "out", with_wheels=True)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.fdb"))
