"""examples/bundles/fraud-avro is fraud-v1's model on Avro: a copy, and it must stay one.

A bundle is self-contained (its code directory is packed into its archive; ``[bundle] code`` must
lie inside the bundle and may not be a symlink), so fraud-avro cannot import or point at
fraud-v1's code: it carries a copy. docs/bundles.md and bench/formats.py (Avro vs JSON on "the same
model code") rely on the copy being faithful; this test fails the day the two drift apart.
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples" / "bundles"
SAME_FILES = ("data/weights.json", "data/merchant_risk.csv", "requirements.lock")


def _code_without_docstring(path) -> str:
    """The module's code as an AST dump, without its docstring (each copy says what it is)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return "\n".join(ast.dump(node) for node in body)


def test_fraud_avro_runs_fraud_v1s_model_code_on_fraud_v1s_data():
    v1, avro = EXAMPLES / "fraud-v1", EXAMPLES / "fraud-avro"
    assert sorted(p.name for p in (avro / "code").iterdir() if p.suffix == ".py") == ["model.py"]
    assert _code_without_docstring(avro / "code" / "model.py") == _code_without_docstring(v1 / "code" / "model.py"), \
        "fraud-avro/code/model.py no longer matches fraud-v1/code/model.py: change both, or say in docs/bundles.md " \
        "and bench/formats.py that the Avro example runs a different model"
    for rel in SAME_FILES:
        assert (avro / rel).read_bytes() == (v1 / rel).read_bytes(), f"fraud-avro/{rel} differs from fraud-v1/{rel}"
