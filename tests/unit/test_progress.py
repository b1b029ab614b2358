"""Progress on a terminal (daemon.progress): shown only there, never mixed into results."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys

import pytest

from daemon.bundle import build
from daemon.progress import Progress, wanted
from tests.bundlesmith import pypi_reachable
from tests.unit.test_bundle import make_source


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_and_clears_it():
    out = Terminal()
    with Progress("task", stream=out, interval=0) as p:
        p.step("phase one")
        p.update(5, 10, " items")
        p.update(10, 10, " items")
    text = out.getvalue()
    assert text.startswith("\rtask: phase one") and "\rtask: 5/10 items (50%)" in text
    assert "\rtask: 10/10 items (100%)" in text and text.endswith("\r")
    assert "\n" not in text  # one line, rewritten in place


def test_progress_is_silent_unless_stderr_is_a_terminal(monkeypatch):
    monkeypatch.delenv("FAILOVERD_PROGRESS", raising=False)
    assert not wanted(io.StringIO()) and wanted(Terminal())
    monkeypatch.setenv("FAILOVERD_PROGRESS", "0")
    assert not wanted(Terminal())
    monkeypatch.setenv("FAILOVERD_PROGRESS", "1")
    assert wanted(io.StringIO())
    quiet = io.StringIO()
    with Progress("task", stream=quiet, enabled=False) as p:
        p.step("x")
        p.update(1, 2)
    assert quiet.getvalue() == ""


def test_updates_are_throttled_but_the_last_one_is_shown():
    out = Terminal()
    p = Progress("t", stream=out, interval=60)
    p.step("start")
    for i in range(1, 1001):
        p.update(i, 1000)
    assert out.getvalue().count("\r") == 2 and "1000/1000" in out.getvalue()


def test_bundle_build_reports_its_phases_on_stderr_and_prints_the_same_result(tmp_path):
    src = make_source(tmp_path / "src")
    cmd = [sys.executable, "-m", "daemon", "bundle", "build", str(src), "--out"]
    env = {**os.environ, "FAILOVERD_PROGRESS": "1"}
    shown = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True, env=env, timeout=60)
    plain = subprocess.run([*cmd, str(tmp_path / "b")], capture_output=True, text=True, timeout=60)
    assert shown.returncode == plain.returncode == 0, shown.stderr + plain.stderr
    assert "hashing" in shown.stderr and "files hashed" in shown.stderr and "packing" in shown.stderr
    assert plain.stderr == ""
    assert shown.stdout.split("digest")[1].split()[0] == plain.stdout.split("digest")[1].split()[0]


@pytest.mark.skipif(not pypi_reachable(), reason="pypi.org is not reachable: --with-wheels needs an index")
def test_with_wheels_counts_the_wheels_as_pip_saves_them(tmp_path):
    pin = f"iniconfig=={importlib.metadata.version('iniconfig')}"
    src = make_source(tmp_path / "src", **{"requirements.lock": pin + "\n"})
    out = Terminal()
    build(src, tmp_path / "out", with_wheels=True, progress=Progress("b", stream=out, interval=0))
    assert "b: downloading 1 wheel(s) of requirements.lock" in out.getvalue()
    assert "b: 1/1 wheels (100%)" in out.getvalue(), out.getvalue()
