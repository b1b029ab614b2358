"""Bindings (issue #18): per-environment inputs a bundle declares by name, bound by each environment's
configuration, recorded by content digest; the bundle digest never depends on them."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from daemon import config
from daemon.bundle import bindings
from daemon.bundle.build import build
from daemon.bundle.manifest import load_spec
from daemon.engine.loading import load_processor
from daemon.errors import BundleError, ConfigError, RegistryError
from daemon.model import Record
from daemon.registry import Registry
from tests.conftest import ROOT

BOUND_MODEL = '''\
"""fraud-scorer with a per-environment reference table: adds its "region" row to every output."""
import csv

from model import FraudScorer


class Bound(FraudScorer):
    def __init__(self, context):
        super().__init__(context)
        with open(context.bindings["reference_table"], newline="", encoding="utf-8") as fh:
            self.table = {row["key"]: row["value"] for row in csv.DictReader(fh)}

    def predict(self, batch):
        results = super().predict(batch)
        for r in results:
            if hasattr(r, "output"):
                r.output["region"] = self.table["region"]
        return results
'''


def bound_source(root: Path, *, version: str = "1.0.0") -> Path:
    """examples/bundles/fraud-v1 as ``fraud-bound``, declaring the binding ``reference_table``."""
    shutil.copytree(ROOT / "examples" / "bundles" / "fraud-v1", root)
    (root / "code" / "bound.py").write_text(BOUND_MODEL)
    out = json.loads((root / "schemas" / "output.json").read_text())
    out["properties"]["region"] = {"type": "string"}
    out["required"].append("region")
    (root / "schemas" / "output.json").write_text(json.dumps(out, indent=2))
    toml = (root / "bundle.toml").read_text()
    toml = toml.replace('name = "fraud-scorer"', 'name = "fraud-bound"').replace(
        'version = "1.0.0"', f'version = "{version}"').replace('"model:FraudScorer"', '"bound:Bound"')
    (root / "bundle.toml").write_text(toml + '\n[bindings]\nreference_table = "merchant region table (CSV: key,value)"\n')
    return root


def table(path: Path, region: str) -> Path:
    path.write_text(f"key,value\nregion,{region}\n")
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- content digest ------------------------------------------------------------------------------

def test_a_file_digest_is_the_sha256_of_its_bytes(tmp_path):
    f = table(tmp_path / "t.csv", "eu")
    assert bindings.digest_of(f) == sha(f)


def test_a_directory_digest_covers_names_and_contents_not_creation_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, order in ((a, ("x.csv", "sub/y.csv")), (b, ("sub/y.csv", "x.csv"))):
        for rel in order:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(rel)
    assert bindings.digest_of(a) == bindings.digest_of(b)
    (b / "x.csv").write_text("changed")
    assert bindings.digest_of(a) != bindings.digest_of(b)
    (b / "x.csv").write_text("x.csv")
    (b / "x.csv").rename(b / "z.csv")
    assert bindings.digest_of(a) != bindings.digest_of(b)


def test_resolve_names_every_unbound_binding_and_the_fix(tmp_path):
    with pytest.raises(BundleError) as exc:
        bindings.resolve({"reference_table": "merchants", "rates": "fx"}, {"rates": tmp_path / "missing"}, "b@1")
    text = str(exc.value)
    assert "'reference_table' (merchants) is not bound" in text and "[bindings]" in text
    assert "FAILOVERD_BINDINGS__REFERENCE_TABLE" in text
    assert "'rates' is bound to" in text and "does not exist" in text


# ---- manifest ------------------------------------------------------------------------------------

def test_manifest_records_declared_bindings_and_other_digests_do_not_change(tmp_path):
    spec = load_spec(bound_source(tmp_path / "src"))
    assert spec["bindings"] == {"reference_table": "merchant region table (CSV: key,value)"}
    assert "bindings" not in load_spec(ROOT / "examples" / "bundles" / "fraud-v1")


@pytest.mark.parametrize("lines, expected", [
    ('"bad name" = "x"', "[bindings] name 'bad name' is malformed; use letters, digits, _ and -"),
    ("reference_table = 3", "[bindings] reference_table must be a string describing the input (got 3)"),
])
def test_manifest_refuses_malformed_bindings(tmp_path, lines, expected):
    src = bound_source(tmp_path / "src")
    toml = (src / "bundle.toml").read_text().split("[bindings]")[0]
    (src / "bundle.toml").write_text(toml + "[bindings]\n" + lines + "\n")
    with pytest.raises(BundleError, match="fix: correct bundle.toml") as exc:
        load_spec(src)
    assert expected in str(exc.value)


# ---- configuration -------------------------------------------------------------------------------

MINIMAL = textwrap.dedent("""\
    [kafka]
    bootstrap_servers = ["127.0.0.1:9092"]
    group_id = "g"
    [app]
    name = "a"
    [inputs]
    topics = ["in"]
    [output]
    topic = "out"
    [dead_letter]
    topic = "dlq"
    """)


def load(tmp_path: Path, extra: str = "", env: dict | None = None):
    path = tmp_path / "failoverd.toml"
    path.write_text(MINIMAL + extra)
    return config.load(path, env=env or {})


def test_config_binds_names_to_absolute_paths_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load(tmp_path, '[bindings]\nreference_table = "tables/m.csv"\nrates = "/srv/rates"\n',
             env={"FAILOVERD_BINDINGS__RATES": "/etc/rates", "FAILOVERD_BINDINGS__NEW-ONE": "x"})
    assert s.bindings == {"reference_table": tmp_path / "tables" / "m.csv", "rates": Path("/etc/rates"),
                          "new-one": tmp_path / "x"}
    assert "FAILOVERD_BINDINGS__RATES" in s.env_overrides
    assert s.to_dict()["bindings"]["rates"] == "/etc/rates"
    assert load(tmp_path).bindings == {} and "bindings" not in load(tmp_path).to_dict()


def test_config_refuses_bad_binding_names_and_values(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, '[bindings]\n"bad name" = "/x"\nempty = ""\n')
    text = str(exc.value)
    assert "bindings.bad name is not a valid binding name: a binding name is letters, digits, _ and -" in text
    assert 'bindings.empty = "" has the wrong type: expected the path of a file or directory' in text


# ---- loading and promotion -----------------------------------------------------------------------

def test_the_model_sees_bound_paths_and_a_missing_binding_refuses_the_load(tmp_path):
    built = build(bound_source(tmp_path / "src"), tmp_path / "dist")
    csv_path = table(tmp_path / "t.csv", "eu-west")
    processor, info = load_processor(built.path, tmp_path / "u", bindings={"reference_table": str(csv_path)})
    assert info["bindings"] == ["reference_table"]
    value = {"card_id": "c1", "amount": 3.0, "features": [0.0] * 8}
    assert processor.model.table == {"region": "eu-west"}
    out = processor.model.predict([Record("c1", value)])
    assert out[0].output["region"] == "eu-west"
    with pytest.raises(BundleError, match="binding 'reference_table'.*is not bound in this environment"):
        load_processor(built.path, tmp_path / "u2", bindings={})


def test_promotion_refuses_an_unbound_binding_and_records_the_digest(tmp_path):
    built = build(bound_source(tmp_path / "src"), tmp_path / "dist")
    registry = Registry(tmp_path / "registry")
    registry.add(built.path)
    with pytest.raises(RegistryError, match="refusing to promote fraud-bound@1.0.0 to active: .*reference_table"):
        registry.promote("fraud-bound@1.0.0", "active", "go", bindings={})
    assert registry.history() == []
    csv_path = table(tmp_path / "t.csv", "eu")
    release = registry.promote("fraud-bound@1.0.0", "active", "go", bindings={"reference_table": csv_path})
    assert release.bindings == {"reference_table": sha(csv_path)}
    assert Registry(tmp_path / "registry").history()[-1].bindings == {"reference_table": sha(csv_path)}
