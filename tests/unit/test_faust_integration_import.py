"""daemon.integrations.faust without faust-streaming: one ImportError naming the extra."""

import subprocess
import sys

from tests.conftest import ROOT


def test_import_without_faust_names_the_extra():
    code = ("import sys; sys.modules['faust'] = None\n"
            "try:\n    import daemon.integrations.faust\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'failoverd[faust]'" in out.stdout


def test_the_scoring_core_needs_no_faust():
    code = "import sys; sys.modules['faust'] = None\nimport daemon.integrations.scoring, daemon.integrations.metrics\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
