"""Open a bundle and build the BatchProcessor that runs it (in whichever process calls it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from daemon.engine.batch import BatchProcessor, IsolationLimits

_STORED_NAME = re.compile(r"^[0-9a-f]{64}\.fdb$")


def expected_digest_of(bundle_path: Path) -> str | None:
    """The digest the registry's store names its archives by (``bundles/<digest>.fdb``), or None."""
    name = Path(bundle_path).name
    return name[:-4] if _STORED_NAME.match(name) else None


def load_processor(bundle_path: Path, unpack_dir: Path | None, isolation: IsolationLimits | None = None,
                   expected_digest: str | None = None, formats: dict[str, Any] | None = None,
                   bindings: dict[str, str] | None = None) -> tuple[BatchProcessor, dict[str, Any]]:
    """Verify, then load. ``expected_digest`` (from the release the daemon was told to run) is
    checked against the archive's manifest before any other member is read and before anything
    is imported; without it, an archive named ``<digest>.fdb`` (the registry's store) is
    expected to have that digest. A different digest is an IntegrityError naming both. ``formats``:
    the worker's format spec (:func:`daemon.formats.spec_of`); None or empty: JSON both ways.
    ``bindings``: this environment's ``[bindings]`` (name -> path); a binding the bundle declares
    and this leaves out is a BundleError before anything is imported. The info names the declared
    bindings (``bindings``: a sorted list); the daemon digests their content itself."""
    from daemon.bundle import open_bundle

    expected = expected_digest or expected_digest_of(bundle_path)
    bundle = open_bundle(Path(bundle_path), unpack_dir=Path(unpack_dir) if unpack_dir else None,
                         expect_digest=expected)
    bundle.bind({name: Path(path) for name, path in (bindings or {}).items()})
    bundle.check_environment()
    model = bundle.instantiate()
    warm_up = getattr(model, "warm_up", None)
    if callable(warm_up):
        warm_up()
    info = {
        "name": bundle.name,
        "version": bundle.version,
        "digest": bundle.digest,
        "state_schema_version": int(bundle.state_schema_version),
    }
    if bundle.bindings:
        info["bindings"] = sorted(bundle.bindings)
    codecs = _formats(bundle, formats or {})
    return BatchProcessor(model, bundle.input_schema, bundle.output_schema, isolation, *codecs), info


def _formats(bundle: Any, spec: dict[str, Any]) -> tuple[Any, ...]:
    """``(input format, output format)`` for the batch: None for plain JSON with JSON Schemas (the
    batch's own fast path), else a :mod:`daemon.formats` object."""
    from daemon import formats

    out = []
    for side, schema in (("input", bundle.input_schema), ("output", bundle.output_schema)):
        kind = spec.get(side) or "json"
        schema_kind = "avro" if bundle.manifest["schemas"][side].endswith(".avsc") else "json"
        out.append(None if kind == "json" and schema_kind == "json" else
                   formats.make(kind, side, schema, schema_kind, spec))
    return tuple(out)
