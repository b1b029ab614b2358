"""Open a verified bundle and run its model: the API the engine and the registry use.

:func:`open_bundle` verifies before anything else. An archive is unpacked (safely) into
``unpack_dir/<digest>/``, reused when already there and still verifying. :class:`Bundle`
then gives the manifest, schemas and data paths, checks the installed environment against
the lock, and instantiates the model class with a :class:`~daemon.model.ModelContext`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from daemon.bundle import archive
from daemon.bundle import files as bfiles
from daemon.bundle.lock import parse_lock, unsatisfied
from daemon.bundle.verify import verify_dir
from daemon.errors import BundleError, IntegrityError
from daemon.model import ModelContext

log = logging.getLogger("failoverd.bundle")

# Code directories of bundles instantiated in this process (see Bundle.instantiate).
_CODE_DIRS: set[str] = set()


def default_unpack_dir() -> Path:
    """``$FAILOVERD_UNPACK_DIR``, else ``$XDG_CACHE_HOME/failoverd/bundles`` (``~/.cache/...``)."""
    if os.environ.get("FAILOVERD_UNPACK_DIR"):
        return Path(os.environ["FAILOVERD_UNPACK_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "failoverd" / "bundles"


class Bundle:
    """A verified, unpacked bundle."""

    def __init__(self, root: Path, manifest: dict[str, Any], digest: str) -> None:
        self.root = Path(root).resolve()
        self.manifest = manifest
        self.digest = digest
        b = manifest["bundle"]
        self.name: str = b["name"]
        self.version: str = b["version"]
        self.entrypoint: str = b["entrypoint"]
        self.python: str = b["python"]
        self.state_schema_version: int = b["state_schema_version"]
        self.code_dir = self.root / b["code"]
        self.data: dict[str, Path] = {k: self.root / v for k, v in manifest["data"].items()}
        self.declared_bindings: dict[str, str] = dict(manifest.get("bindings") or {})
        """Per-environment inputs by name (-> description); bound by the daemon's configuration."""
        self.bindings: dict[str, Path] = {}
        """The bound paths, once :meth:`bind` has checked them."""
        self.input_schema: dict[str, Any] = self._json(manifest["schemas"]["input"])
        self.output_schema: dict[str, Any] = self._json(manifest["schemas"]["output"])
        self.lock_path = self.root / manifest["dependencies"]["lock"]
        wheels = manifest["dependencies"].get("wheels")
        self.wheels_dir: Path | None = self.root / wheels if wheels else None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def label(self) -> str:
        return f"bundle {self.ref} (digest {self.digest[:12]}, {self.root})"

    def __repr__(self) -> str:
        return f"<Bundle {self.ref} {self.digest[:12]} at {self.root}>"

    def _json(self, rel: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.root / rel).read_text(encoding="utf-8"))
        return doc

    def check_environment(self) -> None:
        """BundleError listing every way the running Python and installed packages miss the lock.

        Applies to a bundle run on the daemon's own interpreter (empty lock, in-process worker,
        ``bundle try``). A worker in the release environment built from this lock passes: that
        environment was installed from the lock and checked (daemon.bundle.environments)."""
        from daemon.bundle import environments

        if environments.serving(self):
            return
        problems = []
        running = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if running != self.python:
            problems.append(f"bundle.toml: built for Python {self.python}, running Python {running}")
        lock_rel = self.manifest["dependencies"]["lock"]
        problems += [f"{lock_rel} {p}" for p in unsatisfied(parse_lock(self.lock_path, self.label), self.label,
                                                            self.lock_path)]
        if problems:
            offline = (f" (offline: pip install --no-index --find-links {self.wheels_dir} -r {self.lock_path})"
                       if self.wheels_dir else "")
            raise BundleError(f"{self.label}: the installed environment does not satisfy the bundle:\n  "
                              + "\n  ".join(problems)
                              + f"\nfix: run it with Python {self.python} and `pip install -r {self.lock_path}`"
                              + offline)

    def bind(self, bound: dict[str, Path]) -> dict[str, str]:
        """Bind the declared bindings to this environment's paths (``[bindings]`` of the configuration);
        returns their content digests. BundleError naming every binding that is not bound."""
        from daemon.bundle import bindings

        self.bindings = bindings.resolve(self.declared_bindings, bound, self.label)
        return bindings.digests(self.bindings)

    def context(self) -> ModelContext:
        return ModelContext(name=self.name, version=self.version, digest=self.digest, root=self.root,
                            data=dict(self.data), manifest=self.manifest, bindings=dict(self.bindings))

    def instantiate(self) -> object:
        """Import the entrypoint from the bundle's code directory and construct it with :meth:`context`.

        The code directory goes first on ``sys.path``. Modules imported earlier from another
        bundle's code directory are forgotten first, so two bundles with a module of the same
        name can be instantiated one after the other in one process; a model that imports
        lazily inside ``predict`` should still run one bundle per process (the worker default).
        """
        module_name, class_name = self.entrypoint.split(":", 1)
        rel_file = f"{self.manifest['bundle']['code']}/{module_name.replace('.', '/')}.py"
        module = self._import(module_name, rel_file)
        cls = getattr(module, class_name, None)
        if cls is None or not isinstance(cls, type):
            raise BundleError(f"{self.label}: entrypoint {self.entrypoint!r}: module {module_name!r} ({rel_file}) "
                              f"has no class {class_name!r}; fix: define it there or correct [bundle] entrypoint")
        try:
            model = cls(self.context())
        except Exception as exc:
            raise BundleError(f"{self.label}: constructing {self.entrypoint} ({rel_file}) failed: "
                              f"{type(exc).__name__}: {exc}; fix: the constructor must succeed given the "
                              f"ModelContext (data files: {', '.join(self.data) or 'none'})") from exc
        if not callable(getattr(model, "predict", None)):
            raise BundleError(f"{self.label}: {self.entrypoint} ({rel_file}) has no predict(batch) method; "
                              f"fix: implement the model protocol (docs/bundles.md)")
        return model

    def _import(self, module_name: str, rel_file: str) -> Any:
        code = str(self.code_dir)
        others = [d for d in _CODE_DIRS if d != code]
        for d in others:
            while d in sys.path:
                sys.path.remove(d)
        for name, mod in list(sys.modules.items()):
            f = getattr(mod, "__file__", None) or ""
            if f and any(f.startswith(d + os.sep) for d in others):
                del sys.modules[name]
        top = module_name.split(".", 1)[0]
        existing = sys.modules.get(top)
        if existing is not None:
            f = getattr(existing, "__file__", None) or ""
            if not f.startswith(code + os.sep):
                raise BundleError(f"{self.label}: entrypoint module {top!r} ({rel_file}) has the name of an "
                                  f"already imported module ({f or 'built-in'}); fix: rename the module")
        if code not in sys.path:
            sys.path.insert(0, code)
        _CODE_DIRS.add(code)
        importlib.invalidate_caches()
        # Never write bytecode into the verified directory, now or when the model imports lazily
        # later: a __pycache__ there would be a file the manifest does not list (the directory
        # is then not trusted again). A process that runs a bundle keeps this off for good.
        sys.dont_write_bytecode = True
        try:
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:
            raise BundleError(f"{self.label}: importing entrypoint module {module_name!r} ({rel_file}) failed: "
                              f"{type(exc).__name__}: {exc}; fix: correct {rel_file}, or add the missing "
                              f"package to the lock and install it") from exc
        f = getattr(module, "__file__", None) or ""
        if not f.startswith(code + os.sep):
            raise BundleError(f"{self.label}: entrypoint module {module_name!r} was imported from {f or 'built-in'}, "
                              f"not from {rel_file}; fix: rename the module so it does not clash")
        return module


def open_bundle(path: Path, unpack_dir: Path | None = None, *, expect_digest: str | None = None) -> Bundle:
    """Verify and open the bundle at ``path`` (a ``.fdb`` archive or an unpacked directory).

    An archive is verified whole every time it is opened (every member against the manifest,
    within the limits of :mod:`daemon.bundle.archive`), even when ``unpack_dir/<digest>/``
    (default :func:`default_unpack_dir`) already holds it: a tampered archive is refused, not
    masked by a good cache. That directory is trusted only after it verifies too, with nothing
    in it the manifest does not list (a ``__pycache__`` included); otherwise it is unpacked
    again. ``expect_digest`` refuses a bundle whose digest differs (IntegrityError naming both),
    before any member other than the manifest is read.
    """
    path = Path(path)
    if path.is_dir():
        v = verify_dir(path, expect_digest=expect_digest)
        return Bundle(v.root, v.manifest, v.digest)
    if not path.exists():
        raise BundleError(f"bundle {path}: no such file or directory; fix: pass a .fdb archive or an unpacked bundle")
    label = f"bundle archive {path}"
    try:
        _, digest = archive.peek_manifest(path, label)
    except BundleError:
        archive.unpack(path, None, label)  # the whole pass names every unsafe entry, which comes first
        raise
    if expect_digest and digest != expect_digest:
        raise IntegrityError(f"{label}: {bfiles.MANIFEST_NAME} has digest {digest}, expected {expect_digest}; "
                             f"fix: this is a different bundle than the one asked for")
    base = Path(unpack_dir) if unpack_dir is not None else default_unpack_dir()
    target = base / digest
    if target.is_dir():
        _, whole = archive.unpack(path, None, label, expect_digest=expect_digest)  # the archive, before its cache
        if whole != digest:
            raise IntegrityError(f"{label}: changed while it was being read (digest {digest}, then {whole}); "
                                 f"fix: do not replace an archive while it is in use")
        try:
            v = verify_dir(target, expect_digest=digest, label=f"{target} (unpacked from {path})")
            return Bundle(v.root, v.manifest, v.digest)
        except BundleError as exc:
            log.warning("unpacked bundle does not verify; unpacking again", extra={"dir": str(target),
                                                                                  "error": str(exc)})
            shutil.rmtree(target)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{digest[:12]}-{uuid.uuid4().hex[:8]}"
    try:
        archive.unpack(path, tmp, label, expect_digest=expect_digest)
        v = verify_dir(tmp, expect_digest=digest, label=str(path))
        try:
            os.rename(tmp, target)
            return Bundle(target, v.manifest, v.digest)
        except OSError:
            if not target.is_dir():  # lost a race with another process unpacking the same bundle
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    v = verify_dir(target, expect_digest=digest, label=f"{target} (unpacked from {path})")
    return Bundle(v.root, v.manifest, v.digest)
