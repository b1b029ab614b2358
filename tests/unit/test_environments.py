"""Per-release environments (daemon/bundle/environments.py), offline: hand-made wheels, no index.

``bundle build --with-wheels`` runs ``pip download``; PIP_NO_INDEX/PIP_FIND_LINKS point it at a
local directory of wheels made by tests/wheelsmith.py, so the real build and install paths run
without a network.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from pathlib import Path

import orjson
import pytest

from daemon.bundle import build, environments, open_bundle
from daemon.engine.worker import SubprocessWorker
from daemon.errors import BundleError
from tests.unit.test_bundle import make_source
from tests.wheelsmith import make_wheel

PROBE = """\
import importlib.util
import os
import sys

import tinypkg

from daemon.model import Prediction

DAEMON_DEPS = ("aiokafka", "aiohttp", "prometheus_client", "jsonschema", "uv")


class Echo:
    def __init__(self, context):
        self.context = context

    def predict(self, batch):
        seen = [m for m in DAEMON_DEPS if importlib.util.find_spec(m) is not None]
        out = {"echo": tinypkg.__version__, "rows": len(seen), "prefix": sys.prefix, "deps": seen}
        return [Prediction(out, None) for r in batch]
"""
OUTPUT = '{"type": "object", "required": ["echo"]}'


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch) -> Path:
    """A local "index" for pip download: tinypkg 1.0 and 2.0, needy 1.0 (needs a missing package)."""
    wh = tmp_path / "wheelhouse"
    make_wheel(wh, "tinypkg", "1.0")
    make_wheel(wh, "tinypkg", "2.0")
    make_wheel(wh, "needy", "1.0", requires=("missingdep>=1",))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wh))
    return wh


def pinned(tmp_path: Path, name: str, lock: str, *, version: str = "1.0.0", wheels: bool = True) -> Path:
    src = make_source(tmp_path / f"src-{name}", version=version, **{
        "requirements.lock": lock, "code/model.py": PROBE, "schemas/output.json": OUTPUT})
    return build(src, tmp_path / "out", with_wheels=wheels).path


def state(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bundles"


def run_in(wp: environments.WorkerPython, code: str) -> str:
    proc = subprocess.run([wp.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(wp.pythonpath)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_pinned_bundle_gets_its_own_env_offline_with_only_the_worker_runtime(tmp_path, wheelhouse):
    wp = environments.worker_python(pinned(tmp_path, "a", "tinypkg==1.0\n"), state(tmp_path))
    assert wp.env_dir is not None and wp.env_dir.parent == tmp_path / "state" / "envs"
    assert wp.env_dir.name.endswith(f"-{environments.PY_TAG}")
    out = run_in(wp, "import importlib.util as u, tinypkg, daemon.engine.worker_main, daemon.engine.batch, "
                     "orjson, jsonschema_rs, msgpack; print(tinypkg.__version__, "
                     "[m for m in ('aiokafka', 'aiohttp', 'prometheus_client', 'jsonschema', 'uv') if u.find_spec(m)])")
    assert out == "1.0 []"  # the pin, the runtime, and none of the daemon's other packages
    marker = json.loads((wp.env_dir / environments.MARKER).read_text())
    assert marker["pins"] == ["tinypkg==1.0"] and marker["offline"] is True


def test_an_empty_lock_keeps_the_daemons_interpreter(tmp_path):
    plain = build(make_source(tmp_path / "src"), tmp_path / "out").path
    wp = environments.worker_python(plain, state(tmp_path))
    assert wp.env_dir is None and wp == environments.daemon_python()
    assert not (tmp_path / "state" / "envs").exists()


def test_conflicting_pins_get_two_envs_and_one_lock_is_shared_and_reused(tmp_path, wheelhouse, monkeypatch):
    one = environments.worker_python(pinned(tmp_path, "one", "tinypkg==1.0\n"), state(tmp_path))
    two = environments.worker_python(pinned(tmp_path, "two", "tinypkg==2.0\n", version="2.0.0"), state(tmp_path))
    # same pins, other comments and another bundle: the same environment
    same = environments.worker_python(pinned(tmp_path, "same", "# again\ntinypkg==1.0.0  # trailing zero\n",
                                             version="3.0.0"), state(tmp_path))
    assert one.env_dir != two.env_dir and same.env_dir == one.env_dir
    assert run_in(one, "import tinypkg; print(tinypkg.__version__)") == "1.0"
    assert run_in(two, "import tinypkg; print(tinypkg.__version__)") == "2.0"

    def no_build(*a, **k):
        raise AssertionError("a cached environment was rebuilt")

    monkeypatch.setattr(environments, "_build", no_build)  # a restart: reused as it is
    assert environments.worker_python(pinned(tmp_path, "one", "tinypkg==1.0\n"), state(tmp_path)) == one


def test_concurrent_starts_of_one_lock_build_it_once(tmp_path, wheelhouse, monkeypatch):
    bundle = open_bundle(pinned(tmp_path, "c", "tinypkg==1.0\n"), state(tmp_path))
    envs = tmp_path / "state" / "envs"
    real, builds = environments._build, []

    def counted(*a, **k):
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(environments, "_build", counted)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(environments.ensure_env(bundle, envs)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 3 and len(set(results)) == 1 and len(builds) == 1


def test_a_half_built_env_is_never_taken_for_ready(tmp_path, wheelhouse):
    bundle = open_bundle(pinned(tmp_path, "h", "tinypkg==1.0\n"), state(tmp_path))
    envs = tmp_path / "state" / "envs"
    key = environments.env_key(bundle)
    # what a crash mid-build leaves: a temp dir, and (worse) a target without the checked marker
    (envs / f".tmp-{key}-deadbeef" / "bin").mkdir(parents=True)
    (envs / key / "bin").mkdir(parents=True)
    (envs / key / "bin" / "python").write_text("not a python")
    env = environments.ensure_env(bundle, envs)
    assert env == envs / key and (env / environments.MARKER).is_file()
    assert not list(envs.glob(".tmp-*"))
    assert run_in(environments.WorkerPython(str(env / "bin" / "python"), []), "print(1)") == "1"


def test_a_pin_the_index_lacks_is_a_clear_error_naming_the_package(tmp_path, wheelhouse, monkeypatch):
    """A bundle without wheels installs from the configured index (here: the wheelhouse, via uv's
    own UV_NO_INDEX/UV_FIND_LINKS), which has no tinypkg 3.0."""
    monkeypatch.setenv("UV_NO_INDEX", "1")
    monkeypatch.setenv("UV_FIND_LINKS", str(wheelhouse))
    envs = tmp_path / "state" / "envs"
    with pytest.raises(BundleError, match=r"(?s)from the package index.*tinypkg.*fix: correct the pin in "
                                          r"requirements.lock.*--with-wheels"):
        environments.worker_python(pinned(tmp_path, "bad", "tinypkg==3.0\n", wheels=False), state(tmp_path))
    assert ready_dirs(envs) == [] and not list(envs.glob(".tmp-*"))  # nothing that looks ready
    ok = environments.worker_python(pinned(tmp_path, "ok", "tinypkg==2.0\n", wheels=False), state(tmp_path))
    assert run_in(ok, "import tinypkg; print(tinypkg.__version__)") == "2.0"


def ready_dirs(envs: Path) -> list[str]:
    return [p.name for p in envs.iterdir() if not p.name.startswith(".")]


def test_a_lock_missing_a_dependency_fails_the_check_naming_it(tmp_path, wheelhouse):
    with pytest.raises(BundleError, match=r"(?s)uv pip check.*missingdep.*fix: add the missing"):
        environments.worker_python(pinned(tmp_path, "needy", "needy==1.0\n"), state(tmp_path))
    assert ready_dirs(tmp_path / "state" / "envs") == []


def test_a_bundle_for_another_python_minor_is_refused(tmp_path, wheelhouse):
    src = make_source(tmp_path / "src", python="3.99", **{"requirements.lock": "tinypkg==1.0\n"})
    with pytest.raises(BundleError, match=r"Python 3\.99, but the daemon runs Python 3\.\d+.*fix: rebuild"):
        environments.ensure_env(open_bundle(build(src, tmp_path / "out").path, state(tmp_path)), tmp_path / "envs")


def test_the_daemons_interpreter_still_refuses_an_unsatisfied_lock(tmp_path, wheelhouse):
    bundle = open_bundle(pinned(tmp_path, "d", "tinypkg==1.0\n"), state(tmp_path))
    with pytest.raises(BundleError, match="tinypkg==1.0 is not installed"):
        bundle.check_environment()


async def test_subprocess_worker_runs_each_release_in_its_env(tmp_path, wheelhouse):
    """Two releases pinning tinypkg 1.0 and 2.0 run side by side, each importing its own."""
    workers = [SubprocessWorker(pinned(tmp_path, v, f"tinypkg=={v}\n", version=f"{v}.0"), state(tmp_path),
                                predict_timeout=30, start_timeout=60, label=v) for v in ("1.0", "2.0")]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        for v, w in zip(("1.0", "2.0"), workers):
            results, _, _ = await w.process([(b"k", b'{"x": 1}', 0)], [None], ())
            out = orjson.loads(results[0][1])
            assert out["echo"] == v and out["deps"] == []
            assert Path(out["prefix"]).parent == tmp_path / "state" / "envs"
    finally:
        for w in workers:
            await w.close()


def test_promote_refuses_a_release_whose_environment_cannot_be_built(tmp_path, wheelhouse):
    """`failoverd release promote` builds the environment first; a pin nothing provides refuses it."""
    import sys

    bad = pinned(tmp_path, "bad", "tinypkg==3.0\n", wheels=False)
    good = pinned(tmp_path, "good", "tinypkg==2.0\n", version="2.0.0", wheels=False)
    env = dict(os.environ, UV_NO_INDEX="1", UV_FIND_LINKS=str(wheelhouse), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def promote(path: Path, ref: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon", "release", "promote", ref, "--bundle", str(path),
                               "--registry", str(tmp_path / "reg"), "--channel", "active", "--reason", "t",
                               "--no-publish"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    proc = promote(bad, "echo@1.0.0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tinypkg" in proc.stderr and "fix: correct the pin in requirements.lock" in proc.stderr
    assert "promoted" not in proc.stdout
    proc = promote(good, "echo@2.0.0")
    assert proc.returncode == 0, proc.stderr
    assert "environment of echo@2.0.0 ready" in proc.stdout and "promoted echo@2.0.0" in proc.stdout
    assert (tmp_path / "cache" / "failoverd" / "envs").is_dir()  # no configuration: next to the unpack cache
