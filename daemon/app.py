"""The application: the only module that wires config, registry, workers, engine, failover
controller, metrics, admin API and systemd notifications together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from daemon import metrics as m
from daemon.engine.engine import Engine
from daemon.engine.release import LoadedRelease, load_release
from daemon.errors import RegistryError

log = logging.getLogger("failoverd.app")


def resolve_bundles(settings, active_bundle: Path | None, standby_bundle: Path | None) -> tuple[Path, Path | None]:
    """Bundle archives for the active and standby channels: explicit paths win, else the registry."""
    if active_bundle is not None:
        return Path(active_bundle), Path(standby_bundle) if standby_bundle else None
    from daemon.registry import Registry

    registry = Registry(settings.registry.path)
    status = registry.status()
    active = status.get("active")
    if active is None:
        raise RegistryError(f"no active release in the registry at {settings.registry.path}: promote one with "
                            "`failoverd release promote NAME@VERSION --channel active --reason TEXT`, or pass "
                            "--active-bundle PATH")
    standby = status.get("standby")
    a = registry.bundle_path(active.digest)
    s = registry.bundle_path(standby.digest) if standby is not None and standby.digest != active.digest else None
    if standby_bundle is not None:
        s = Path(standby_bundle)
    return a, s


class App:
    def __init__(self, settings, *, active_bundle: Path | None = None, standby_bundle: Path | None = None) -> None:
        self.settings = settings
        self.active_bundle = active_bundle
        self.standby_bundle = standby_bundle
        self.engine: Engine | None = None
        self.controller = None
        self._signals = 0

    async def _load(self, path: Path, channel: str) -> LoadedRelease:
        w = self.settings.worker
        return await load_release(path, channel=channel, mode=w.mode,
                                  unpack_dir=Path(self.settings.state.directory) / "bundles",
                                  predict_timeout=w.predict_timeout_ms / 1000,
                                  start_timeout=w.start_timeout_ms / 1000)

    def _on_signal(self, signame: str) -> None:
        self._signals += 1
        if self._signals > 1:
            log.error("second signal: forcing exit", extra={"signal": signame})
            os._exit(130)
        log.info("stopping", extra={"signal": signame})
        if self.engine is not None:
            self.engine.stop()

    async def run(self) -> int:
        from daemon.failover.controller import FailoverController

        s = self.settings
        a_path, s_path = resolve_bundles(s, self.active_bundle, self.standby_bundle)
        active = await self._load(a_path, "active")
        standby = None
        if s_path is not None and s.failover.standby_mode in ("hot", "warm"):
            standby = await self._load(s_path, "standby")
        self.controller = FailoverController(s, loader=self._load, standby_path=s_path)
        self.engine = Engine(s, active=active, standby=standby, on_failure=self.controller.handle,
                             observers=[self.controller.observe])
        self.controller.attach(self.engine)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        servers = await self._start_servers()
        try:
            await self.engine.start()
            await self.engine.run()
        finally:
            for stop in servers:
                try:
                    await stop()
                except Exception:  # noqa: BLE001
                    log.exception("server stop failed")
        if self.engine.failure is not None:
            log.error("stopped after a release failure with no failover", extra={"error": str(self.engine.failure)})
            return 1
        return 0

    async def _start_servers(self) -> list:
        stops = []
        port = self.settings.metrics.port
        if port:
            from prometheus_client import start_http_server

            server, thread = start_http_server(port, addr="127.0.0.1" if self.settings.admin.bind.startswith("127.")
                                               else "0.0.0.0", registry=m.REGISTRY)

            async def stop_metrics() -> None:
                server.shutdown()

            stops.append(stop_metrics)
        return stops
