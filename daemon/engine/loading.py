"""Open a bundle and build the BatchProcessor that runs it (in whichever process calls it)."""

from __future__ import annotations

import re
from pathlib import Path

from daemon.engine.batch import BatchProcessor, IsolationLimits

_STORED_NAME = re.compile(r"^[0-9a-f]{64}\.fdb$")


def expected_digest_of(bundle_path: Path) -> str | None:
    """The digest the registry's store names its archives by (``bundles/<digest>.fdb``), or None."""
    name = Path(bundle_path).name
    return name[:-4] if _STORED_NAME.match(name) else None


def load_processor(bundle_path: Path, unpack_dir: Path | None, isolation: IsolationLimits | None = None,
                   expected_digest: str | None = None) -> tuple[BatchProcessor, dict]:
    """Verify, then load. ``expected_digest`` (from the release the daemon was told to run) is
    checked against the archive's manifest before any other member is read and before anything
    is imported; without it, an archive named ``<digest>.fdb`` (the registry's store) is
    expected to have that digest. A different digest is an IntegrityError naming both."""
    from daemon.bundle import open_bundle

    expected = expected_digest or expected_digest_of(bundle_path)
    bundle = open_bundle(Path(bundle_path), unpack_dir=Path(unpack_dir) if unpack_dir else None,
                         expect_digest=expected)
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
    return BatchProcessor(model, bundle.input_schema, bundle.output_schema, isolation), info
