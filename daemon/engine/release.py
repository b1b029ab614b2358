"""A loaded model release: its worker plus what every output says about it."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from daemon.engine.batch import IsolationLimits
from daemon.engine.headers import release_headers
from daemon.engine.worker import Worker, current_bindings, make_worker
from daemon.errors import BundleError


@dataclasses.dataclass
class LoadedRelease:
    worker: Worker
    info: dict[str, Any]
    bundle_path: Path
    channel: str

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def version(self) -> str:
        return str(self.info["version"])

    @property
    def digest(self) -> str:
        return str(self.info["digest"])

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def ns(self) -> str:
        """State namespace: release name and state-schema version."""
        return f"{self.name}/s{self.info.get('state_schema_version', 1)}"

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return release_headers(self.info)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest,
                "state_schema_version": self.info.get("state_schema_version"), "channel": self.channel,
                "pid": self.worker.pid, **({"pids": pids} if (pids := getattr(self.worker, "pids", None)) else {})}


async def load_release(bundle_path: Path, *, channel: str, mode: str, unpack_dir: Path | None,
                       predict_timeout: float, start_timeout: float, isolate_max_records: int = 10,
                       isolate_max_fraction: float = 0.1) -> LoadedRelease:
    """``isolate_max_*``: the ``[failover]`` limits on poison records per batch (daemon.engine.batch).
    The content digests of the release's bindings (``info["binding_digests"]``, on every output as
    ``fd.binding.<name>``) are computed here, in the daemon, not taken from the worker."""
    bound = current_bindings()
    worker = make_worker(mode, bundle_path, unpack_dir, predict_timeout=predict_timeout,
                         start_timeout=start_timeout, label=channel,
                         isolation=IsolationLimits(isolate_max_records, isolate_max_fraction))
    info = await worker.start()
    try:
        info["binding_digests"] = await asyncio.to_thread(_digests, info.get("bindings"), bound, channel)
    except BaseException:
        await worker.close()
        raise
    return LoadedRelease(worker=worker, info=info, bundle_path=Path(bundle_path), channel=channel)


def _digests(names: object, bound: dict[str, str], channel: str) -> dict[str, str]:
    """{name: content digest} of the bindings the worker reports its bundle declares."""
    from daemon.bundle import bindings

    if names is None:
        return {}
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in bound for n in names):
        raise BundleError(f"{channel}: the worker reported bindings {str(names)[:200]}, not names this "
                          f"environment binds ({', '.join(sorted(bound)) or 'none'})")
    try:
        return bindings.digests({name: Path(bound[name]) for name in names})
    except OSError as exc:
        raise BundleError(f"{channel}: cannot read a binding to digest it: {exc}; fix: check [bindings] of the "
                          f"failoverd configuration") from exc
