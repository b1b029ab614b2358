"""Per-release Python environments: a bundle whose lock pins packages runs in a venv of its own.

Why: two releases pinning different versions of a package (numpy 1.26 and 2.1) must be able
to run side by side as active and standby, and a rollback to older pins must not need a
rebuilt host. So every non-empty lock gets a virtual environment built from exactly its pins
(``uv pip install --no-deps``: the lock is the whole truth, nothing is resolved), checked with
``uv pip check``, and cached under ``<envs>/<lockdigest16>-py<XY>/``, where ``<envs>`` sits next to
the unpack directory (the daemon: ``<[state] directory>/envs``). Releases with the same pins
share one environment; it survives restarts.

* **Offline.** A bundle built with ``--with-wheels`` installs with ``--no-index --find-links
  <bundle>/wheels``: no index is contacted. Without wheels, uv uses the configured index
  (``UV_INDEX_URL``, ``UV_FIND_LINKS``...; config files are not read). uv's cache is ``<envs>/.uv-cache`` (same filesystem:
  installs are hard links) unless ``UV_CACHE_DIR`` says otherwise.
* **Atomic.** An environment is built in ``<envs>/.tmp-<key>-<random>/`` and renamed into place
  only after it installed and checked, so a directory named ``<key>`` is always a whole, checked
  environment. Builds of one key are serialized by ``flock`` on ``<envs>/.<key>.lock`` (two
  releases with one lock starting at once build it once); leftovers of a crashed build are
  removed by the next build under the same lock.
* **The worker runtime.** The worker (``daemon.engine.worker_main``: framing, batch, loading,
  the model protocol, the bundle loader) needs the ``daemon`` package and four compiled
  packages: orjson, jsonschema_rs, msgpack and fastavro (the Avro format). They reach every environment through a *runtime
  directory* ``<envs>/runtime-<key>/`` of symlinks to exactly those packages in the daemon's own
  installation, put on the worker's ``PYTHONPATH``. Nothing else of the daemon's dependency set
  (aiokafka, aiohttp, prometheus_client, ...) is importable in a release's worker, and nothing
  is downloaded for it.
* **Wheels only.** ``--only-binary :all:``: installing never builds an sdist, which would run a
  package's code in the daemon's context; uv gets the daemon's environment minus ``FAILOVERD_*``. The environment is created from the daemon's own interpreter, so the
  compiled runtime packages match its ABI (a bundle for another Python minor is refused).
* **Which copy wins.** ``PYTHONPATH`` comes before the environment's site-packages, so the
  runtime's packages win: a lock that pins orjson, jsonschema_rs or msgpack still gets its pin
  installed (and ``pip check`` counts it), but the worker imports the daemon's copy, which is
  what the frame format and output encoding were tested with; the build logs a warning naming it.

A bundle with an empty lock runs on the daemon's interpreter, as before, and
:meth:`~daemon.bundle.loader.Bundle.check_environment` applies to it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from daemon.bundle.lock import Pin, normalize_version, parse_lock
from daemon.errors import BundleError

log = logging.getLogger("failoverd.bundle")

MARKER = "failoverd-env.json"
"""Written into an environment when it is whole and checked; names the lock it was built from."""
RUNTIME_DISTS = ("orjson", "jsonschema_rs", "msgpack", "fastavro")
"""The compiled packages the worker runtime imports (besides ``daemon`` itself)."""
BUILD_TIMEOUT_S = 900.0
"""One install step may take this long (a cold download of big wheels from an index)."""
PY_TAG = f"py{sys.version_info[0]}{sys.version_info[1]}"
RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"


@dataclasses.dataclass(frozen=True)
class WorkerPython:
    """How to start a bundle's worker: the interpreter and the ``PYTHONPATH`` entries."""

    executable: str
    pythonpath: list[str]
    env_dir: Path | None = None
    """The release environment, or None: the daemon's own interpreter (empty lock)."""


def envs_dir_for(unpack_dir: Path | None) -> Path:
    """Environments live next to the unpacked bundles: ``<state>/bundles`` -> ``<state>/envs``."""
    if unpack_dir is None:
        from daemon.bundle.loader import default_unpack_dir

        unpack_dir = default_unpack_dir()
    return Path(unpack_dir).resolve().parent / "envs"


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_digest(pins: list[Pin]) -> str:
    """The identity of a lock: its pins, normalized and sorted (comments, order, hashes do not count)."""
    lines = sorted(f"{_canon(p.name)}=={normalize_version(p.version)}" + (f"; {p.marker}" if p.marker else "")
                   for p in pins)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def pins_of(bundle: Any) -> list[Pin]:
    return parse_lock(bundle.lock_path, bundle.label)


def env_key(bundle: Any) -> str | None:
    """``<lockdigest16>-py<XY>``, or None for an empty lock (the daemon's interpreter runs it)."""
    pins = pins_of(bundle)
    return f"{lock_digest(pins)[:16]}-{PY_TAG}" if pins else None


def serving(bundle: Any) -> bool:
    """True when this process runs in the release environment built from ``bundle``'s lock.

    Used by :meth:`Bundle.check_environment`, which then has nothing to check (the environment
    was checked when it was built); a process in an environment of another lock is refused."""
    marker = Path(sys.prefix) / MARKER
    if not marker.is_file():
        return False
    try:
        built = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = lock_digest(pins_of(bundle))
    if built.get("lock") != want:
        raise BundleError(f"{bundle.label}: this worker runs in the environment {sys.prefix}, built for another "
                          f"lock ({str(built.get('lock'))[:16]}, not {want[:16]}); fix: let the daemon choose the "
                          f"environment (do not start workers by hand with another environment's python)")
    return True


# -- building --------------------------------------------------------------------------------

def uv_bin() -> str:
    """The uv executable of the ``uv`` package (a failoverd dependency), else ``uv`` on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise BundleError("the `uv` tool is not installed, and it builds release environments; "
                      "fix: pip install uv (it is a failoverd dependency: reinstall failoverd)")


def _uv(args: list[str], envs: Path, what: str, label: str, timeout: float = BUILD_TIMEOUT_S) -> str:
    # the daemon's secrets are not uv's business (an index URL with credentials is: UV_*/PIP_* stay)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVERD_")}
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    env.setdefault("UV_CACHE_DIR", str(envs / ".uv-cache"))
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run([uv_bin(), *args], capture_output=True, text=True, cwd=envs, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{label}: {what} did not finish within {timeout:.0f}s; fix: check the package index "
                          f"is reachable, or build the bundle with --with-wheels") from None
    if proc.returncode != 0:
        detail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BundleError(f"{label}: {what} failed (uv exit {proc.returncode}):\n    {detail}")
    return proc.stdout + proc.stderr


def _base_python() -> str:
    """The interpreter the daemon runs on, behind any venv it runs in."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _build(bundle: Any, pins: list[Pin], key: str, envs: Path, target: Path) -> None:
    tmp = envs / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    label = bundle.label
    lock_rel = bundle.manifest["dependencies"]["lock"]
    t0 = time.monotonic()
    try:
        _uv(["venv", "--no-config", "--relocatable", "--quiet", "--python", _base_python(), str(tmp)], envs,
            f"creating a Python {RUNNING} environment", label)
        python = tmp / "bin" / "python"
        # wheels only: building an sdist would run a package's own code here, in the daemon's context
        install = ["pip", "install", "--no-config", "--python", str(python), "--no-deps", "--only-binary", ":all:",
                   "--compile-bytecode", "--quiet", "-r", str(bundle.lock_path)]
        offline = bundle.wheels_dir is not None and bundle.wheels_dir.is_dir()
        if offline:
            install += ["--no-index", "--find-links", str(bundle.wheels_dir)]
        fix = (f"fix: rebuild the bundle with --with-wheels after correcting {lock_rel}" if offline else
               f"fix: correct the pin in {lock_rel}, make the package index reachable, or build the bundle "
               f"with --with-wheels so it installs offline")
        try:
            _uv(install, envs, f"installing {lock_rel} ({len(pins)} pins"
                + (f", offline from {bundle.wheels_dir}" if offline else ", from the package index") + ")", label)
        except BundleError as exc:
            raise BundleError(f"{exc}\n{fix}") from None
        try:
            _uv(["pip", "check", "--no-config", "--python", str(python)], envs,
                f"checking the environment of {lock_rel} (uv pip check)", label, timeout=120)
        except BundleError as exc:
            raise BundleError(f"{exc}\nfix: add the missing or conflicting packages to {lock_rel} as exact pins "
                              f"(pip-compile or `pip freeze` of a working environment writes a whole lock)") from None
        (tmp / MARKER).write_text(json.dumps({
            "lock": lock_digest(pins), "python": RUNNING, "pins": [str(p) for p in pins],
            "offline": offline, "built_for": bundle.ref, "build_seconds": round(time.monotonic() - t0, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shadowed = sorted({_canon(p.name) for p in pins} & {_canon(d) for d in RUNTIME_DISTS})
    if shadowed:
        log.warning("the lock pins packages of the worker runtime: the worker imports the daemon's copy",
                    extra={"release": bundle.ref, "packages": shadowed})
    log.info("release environment built", extra={"release": bundle.ref, "env": str(target),
                                                 "seconds": round(time.monotonic() - t0, 2), "offline": offline})


def _ready(target: Path, pins: list[Pin]) -> bool:
    try:
        built = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return built.get("lock") == lock_digest(pins) and (target / "bin" / "python").exists()


class _Locked:
    """``flock`` on a file: serializes builds of one key across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> "_Locked":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def ensure_env(bundle: Any, envs: Path) -> Path | None:
    """The checked environment of ``bundle``'s lock, built if needed; None for an empty lock.

    BundleError (naming the package, with the fix) when it cannot be built or does not check."""
    pins = pins_of(bundle)
    if not pins:
        return None
    if bundle.python != RUNNING:
        raise BundleError(f"{bundle.label}: bundle.toml says Python {bundle.python}, but the daemon runs Python "
                          f"{RUNNING}, and the worker runtime (orjson, jsonschema_rs, msgpack) is the daemon's; "
                          f"fix: rebuild the bundle with python = \"{RUNNING}\"")
    key = f"{lock_digest(pins)[:16]}-{PY_TAG}"
    envs = Path(envs)
    target = envs / key
    if _ready(target, pins):
        return target
    envs.mkdir(parents=True, exist_ok=True)
    with _Locked(envs / f".{key}.lock"):
        if _ready(target, pins):  # another process or thread built it while we waited
            return target
        for stale in envs.glob(f".tmp-{key}-*"):  # a build that crashed (we hold the lock: nobody builds it)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # not ready: not ours to trust; rebuild
            shutil.rmtree(target)
        _build(bundle, pins, key, envs, target)
    return target


# -- the worker runtime ----------------------------------------------------------------------

def _runtime_entries() -> dict[str, Path]:
    """name -> path of every top-level module the worker runtime needs from the daemon's installation."""
    import daemon

    entries = {"daemon": Path(daemon.__file__).resolve().parent}
    for dist_name in RUNTIME_DISTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            if dist_name == "msgpack":
                continue  # only needed once the frame format uses it
            raise BundleError(f"the worker runtime needs {dist_name}, which the daemon's environment lacks; "
                              f"fix: reinstall failoverd (pip install failoverd)") from None
        for f in dist.files or ():
            top = f.parts[0]
            if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            path = Path(str(dist.locate_file(top)))
            if path.exists():
                entries[top] = path
    return entries


def runtime_dir(envs: Path) -> Path:
    """``<envs>/runtime-<key>/``: symlinks to the worker runtime's packages (see the module doc)."""
    entries = _runtime_entries()
    ident = json.dumps({"python": sys.version, "entries": {k: str(v) for k, v in sorted(entries.items())},
                        "versions": {d: _version(d) for d in RUNTIME_DISTS}}, sort_keys=True)
    target = Path(envs) / f"runtime-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    if target.is_dir():
        return target
    Path(envs).mkdir(parents=True, exist_ok=True)
    tmp = Path(envs) / f".tmp-runtime-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, path in entries.items():
            os.symlink(path, tmp / name)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # lost a race with another process making the same one: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def daemon_python(inherited: str | None = None) -> WorkerPython:
    """Today's path: the daemon's interpreter, its source root first on PYTHONPATH, then
    ``inherited`` (the PYTHONPATH the worker would otherwise get)."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    return WorkerPython(sys.executable, [root, *[p for p in (inherited or "").split(os.pathsep) if p]])


def worker_python(bundle_path: Path, unpack_dir: Path | None, inherited: str | None = None) -> WorkerPython:
    """Open (verify, unpack) the bundle and give the interpreter its worker must run on.

    A release environment gets only the runtime directory on its PYTHONPATH (``inherited`` is
    dropped: it would reach past the boundary). Blocking (it may build an environment): call it
    in a thread from the event loop."""
    from daemon.bundle.loader import open_bundle

    bundle = open_bundle(Path(bundle_path), unpack_dir=Path(unpack_dir) if unpack_dir else None)
    envs = envs_dir_for(unpack_dir)
    try:
        env = ensure_env(bundle, envs)
        if env is None:
            return daemon_python(inherited)
        return WorkerPython(str(env / "bin" / "python"), [str(runtime_dir(envs))], env)
    except OSError as exc:  # a full disk, a read-only state directory: a load failure, not a daemon crash
        raise BundleError(f"{bundle.label}: cannot build its environment under {envs}: {exc}; fix: make the "
                          f"[state] directory writable and give it room") from None
