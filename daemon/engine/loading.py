"""Open a bundle and build the BatchProcessor that runs it (in whichever process calls it)."""

from __future__ import annotations

from pathlib import Path

from daemon.engine.batch import BatchProcessor, IsolationLimits


def load_processor(bundle_path: Path, unpack_dir: Path | None,
                   isolation: IsolationLimits | None = None) -> tuple[BatchProcessor, dict]:
    from daemon.bundle import open_bundle

    bundle = open_bundle(Path(bundle_path), unpack_dir=Path(unpack_dir) if unpack_dir else None)
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
