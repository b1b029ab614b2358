"""The registry: promote, rollback, history (--at), refusals that leave the log untouched, the CLI."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys

import pytest

from daemon.bundle import build
from daemon.control import release_event
from daemon.errors import RegistryError
from daemon.registry import Registry, Release
from tests.conftest import ROOT
from tests.unit.test_bundle import INPUT_SCHEMA, OUTPUT_SCHEMA, _repack, make_source

EXAMPLES = ROOT / "examples" / "bundles"


def _archive(tmp_path, version: str, input_schema=None, output_schema=None, **files):
    src = make_source(tmp_path / f"src-{version}", version=version,
                      **{"schemas__input.json": json.dumps(input_schema or INPUT_SCHEMA),
                         "schemas__output.json": json.dumps(output_schema or OUTPUT_SCHEMA)}, **files)
    return build(src, tmp_path / "dist").path


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


def _at(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def test_promote_status_history_and_history_at(tmp_path, reg):
    d1 = reg.add(_archive(tmp_path, "1.0.0"))
    d2 = reg.add(_archive(tmp_path, "2.0.0"))
    assert reg.find("echo", "1.0.0") == d1 and reg.resolve(d2[:12]) == d2 and reg.resolve("echo@2.0.0") == d2
    assert reg.bundle_path(d1).is_file()
    assert reg.status() == {"active": None, "standby": None} and reg.history() == []

    r1 = reg.promote("echo@1.0.0", "active", "first release", who="alice@laptop")
    r2 = reg.promote("echo@2.0.0", "standby", "shadow it")
    r3 = reg.promote(d2, "active", "v2 looks good")
    assert (r1.ref, r1.channel, r1.kind, r1.who, r1.why, r1.digest) == (
        "echo@1.0.0", "active", "promote", "alice@laptop", "first release", d1)
    assert "@" in r2.who and r1.time.endswith("Z") and r1.epoch < r2.epoch < r3.epoch
    assert reg.status() == {"active": r3, "standby": r2}
    assert reg.history() == [r1, r2, r3]
    assert reg.history(at=_at(r1.epoch - 10)) is None
    assert reg.history(at=_at((r1.epoch + r2.epoch) / 2)) == r1
    assert reg.history(at=_at((r2.epoch + r3.epoch) / 2)) == r1  # a standby change is not an active change
    assert reg.history(at=_at(r3.epoch + 10)) == r3
    naive = _at((r2.epoch + r3.epoch) / 2).replace(tzinfo=None)
    assert reg.history(at=naive) == r1  # naive means UTC

    again = reg.promote("echo@2.0.0", "active", "again")
    assert again == r3 and len(reg.history()) == 3  # already there: nothing written
    assert Registry(reg.path).history() == [r1, r2, r3]  # what is on disk


def test_rollback_defaults_to_the_release_active_before_the_current_one(tmp_path, reg):
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        reg.add(_archive(tmp_path, v))
    with pytest.raises(RegistryError, match="never had a release"):
        reg.rollback(reason="nothing yet")
    reg.promote("echo@1.0.0", "active", "one")
    with pytest.raises(RegistryError, match="nothing to roll back to: echo@1.0.0 is the only release"):
        reg.rollback(reason="only one")
    reg.promote("echo@2.0.0", "active", "two")
    reg.promote("echo@2.0.0", "standby", "two as standby too")
    back = reg.rollback(reason="two is bad", who="bob@ops")
    assert (back.ref, back.kind, back.channel, back.who) == ("echo@1.0.0", "rollback", "active", "bob@ops")
    assert reg.status()["active"] == back and reg.status()["standby"].ref == "echo@2.0.0"
    assert reg.rollback(reason="undo the rollback").ref == "echo@2.0.0"
    reg.promote("echo@3.0.0", "active", "three")
    assert reg.rollback(to="echo@1.0.0", reason="straight to one").ref == "echo@1.0.0"
    with pytest.raises(RegistryError, match="already on channel active"):
        reg.rollback(to="echo@1.0.0", reason="again")
    reg.add(_archive(tmp_path, "4.0.0"))
    with pytest.raises(RegistryError, match="never on channel active; fix: use `failoverd release promote`"):
        reg.rollback(to="echo@4.0.0", reason="never active")
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.rollback(reason=" ")


def test_promote_refuses_a_bundle_that_does_not_verify_and_writes_nothing(tmp_path, reg):
    good = reg.add(_archive(tmp_path, "1.0.0"))
    reg.promote("echo@1.0.0", "active", "ok")
    d2 = reg.add(_archive(tmp_path, "2.0.0"))
    log_before = reg.log.path.read_bytes()
    stored = reg.bundle_path(d2)
    tampered = tmp_path / "tampered.fdb"
    _repack(stored, tampered, {"data/table.csv": b"a,b\n6,6\n6\n"})
    shutil.copyfile(tampered, stored)  # someone edits the stored archive (its unpacked copy is still intact)
    with pytest.raises(RegistryError) as err:
        reg.promote("echo@2.0.0", "active", "should not happen")
    msg = str(err.value)
    assert "refusing to promote echo@2.0.0" in msg and "changed: data/table.csv: expected sha256:" in msg
    assert reg.log.path.read_bytes() == log_before and reg.status()["active"].digest == good
    with pytest.raises(RegistryError, match="refusing to add"):
        Registry(tmp_path / "other").add(tampered)


def test_promote_refuses_incompatible_schemas_and_writes_nothing(tmp_path, reg):
    reg.add(_archive(tmp_path, "1.0.0"))
    reg.promote("echo@1.0.0", "active", "base")
    needs_y = {**INPUT_SCHEMA, "required": ["x", "y"], "properties": {"x": {}, "y": {}}}
    reg.add(_archive(tmp_path, "2.0.0", input_schema=needs_y))
    drops_echo = {**OUTPUT_SCHEMA, "required": ["rows"]}
    reg.add(_archive(tmp_path, "3.0.0", output_schema=drops_echo))
    widened = {**INPUT_SCHEMA, "properties": {"x": {}, "z": {}}}
    reg.add(_archive(tmp_path, "4.0.0", input_schema=widened,
                     output_schema={**OUTPUT_SCHEMA, "required": ["echo", "rows"]}))
    log_before = reg.log.path.read_bytes()
    with pytest.raises(RegistryError, match=r"input schema requires y, which the current input schema does not "
                                            r"declare"):
        reg.promote("echo@2.0.0", "standby", "needs y")
    with pytest.raises(RegistryError, match=r"output schema no longer requires echo"):
        reg.promote("echo@3.0.0", "active", "drops echo")
    assert reg.log.path.read_bytes() == log_before
    assert reg.promote("echo@4.0.0", "active", "compatible: optional input added, output required added").kind == \
        "promote"
    assert reg.promote("echo@3.0.0", "active", "migrated consumers", check_schemas=False).ref == "echo@3.0.0"
    assert reg.rollback(reason="rollbacks are not schema-checked").ref == "echo@4.0.0"


def test_examples_are_mutually_compatible(tmp_path, reg):
    v1 = reg.add(build(EXAMPLES / "fraud-v1", tmp_path / "dist").path)
    v2 = reg.add(build(EXAMPLES / "fraud-v2", tmp_path / "dist").path)
    reg.promote(v2, "active", "v2 first")
    reg.promote(v1, "standby", "v1 as the fallback")
    reg.promote(v1, "active", "swap")
    reg.promote(v2, "standby", "v2 as standby")
    assert [r.ref for r in reg.status().values()] == ["fraud-scorer@1.0.0", "fraud-scorer@2.0.0"]


def test_add_refuses_different_content_under_an_existing_name_and_version(tmp_path, reg):
    reg.add(_archive(tmp_path, "1.0.0"))
    other = make_source(tmp_path / "other", **{"data__table.csv": "changed\n"})
    with pytest.raises(RegistryError, match=r"echo@1\.0\.0 is already stored with digest .* fix: bump"):
        reg.add(build(other, tmp_path / "dist2").path)
    with pytest.raises(RegistryError, match="is a directory"):
        reg.add(other)
    with pytest.raises(RegistryError, match=r"no bundle echo@9"):
        reg.promote("echo@9", "active", "unknown")


def test_a_torn_last_line_is_ignored_and_repaired_on_the_next_append(tmp_path, reg):
    reg.add(_archive(tmp_path, "1.0.0"))
    reg.add(_archive(tmp_path, "2.0.0"))
    r1 = reg.promote("echo@1.0.0", "active", "one")
    with open(reg.log.path, "ab") as fh:
        fh.write(b'{"id":"torn","time":"2024')  # crash mid-write
    assert reg.history() == [r1]
    r2 = reg.promote("echo@2.0.0", "active", "two")
    assert reg.history() == [r1, r2]
    assert all(json.loads(line) for line in reg.log.path.read_text().splitlines())


def test_apply_events_appends_only_unknown_releases_in_time_order(tmp_path, reg):
    reg.add(_archive(tmp_path, "1.0.0"))
    mine = reg.promote("echo@1.0.0", "active", "local")
    theirs = Release(id="b" * 32, time="2030-01-01T00:00:00.000000Z", epoch=1893456000.0, channel="standby",
                     name="echo", version="7.0.0", digest="c" * 64, who="carol@elsewhere", why="remote", kind="promote")
    events = [release_event(mine), release_event(theirs), {"type": "failover", "id": "x"}, release_event(theirs)]
    assert reg.apply_events(events) == [theirs]
    assert reg.apply_events(events) == []
    assert reg.status() == {"active": mine, "standby": theirs}


# -- the CLI ---------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", "release", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_promote_rollback_status_history(tmp_path):
    a1 = build(EXAMPLES / "fraud-v1", tmp_path / "dist").path
    a2 = build(EXAMPLES / "fraud-v2", tmp_path / "dist").path
    r = ["--registry", str(tmp_path / "reg"), "--no-publish"]
    p = _cli("promote", "fraud-scorer@1.0.0", "--channel", "active", "--reason", "first", "--bundle", str(a1), *r)
    assert p.returncode == 0 and "promoted fraud-scorer@1.0.0" in p.stdout, p.stderr
    p = _cli("promote", "fraud-scorer@2.0.0", "--channel", "active", "--reason", "second", "--bundle", str(a2),
             "--who", "ci@runner", *r)
    assert p.returncode == 0, p.stderr
    p = _cli("rollback", "--reason", "v2 misbehaves", *r)
    assert p.returncode == 0 and "rolled back active to fraud-scorer@1.0.0" in p.stdout, p.stderr

    p = _cli("status", "--json", "--registry", str(tmp_path / "reg"))
    status = json.loads(p.stdout)
    assert status["active"]["version"] == "1.0.0" and status["active"]["kind"] == "rollback"
    assert status["standby"] is None
    p = _cli("history", "--json", "--registry", str(tmp_path / "reg"))
    history = json.loads(p.stdout)
    assert [(h["version"], h["kind"], h["why"]) for h in history] == [
        ("1.0.0", "promote", "first"), ("2.0.0", "promote", "second"), ("1.0.0", "rollback", "v2 misbehaves")]
    assert history[1]["who"] == "ci@runner"
    middle = _at((history[1]["epoch"] + history[2]["epoch"]) / 2).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    p = _cli("history", "--json", "--at", middle, "--registry", str(tmp_path / "reg"))
    assert json.loads(p.stdout)["active"]["version"] == "2.0.0", p.stderr

    p = _cli("rollback", "--to", "fraud-scorer@9.9.9", "--reason", "x", *r)
    assert p.returncode == 1 and "no bundle fraud-scorer@9.9.9" in p.stderr
    p = _cli("history", "--at", "yesterday", "--registry", str(tmp_path / "reg"))
    assert p.returncode == 1 and "not an ISO 8601 time" in p.stderr
    p = _cli("status", "--config", str(tmp_path / "missing.toml"))
    assert p.returncode == 2 and "missing.toml does not exist" in p.stderr
