"""The application: the only module that wires config, registry, workers, engine, failover
controller, control topic, metrics, admin API and systemd notifications together."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import metrics as m
from daemon.engine.engine import Engine
from daemon.engine.release import LoadedRelease, load_release
from daemon.engine.worker import configure as configure_workers
from daemon.errors import RegistryError

if TYPE_CHECKING:
    from daemon.distribution.fetch import Fetcher
    from daemon.failover.controller import FailoverController

log = logging.getLogger("failoverd.app")

STOP_GRACE_S = 5.0
"""After SIGTERM, how long the loop may keep waiting on one step before it is interrupted."""
STOP_BACKSTOP_S = 27.0
"""After SIGTERM, exit no matter what (systemd's TimeoutStopSec is 30 s)."""


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
    # a standby not fetched yet: its registry path; the loader fetches it, the standby keeper retries
    s = (registry.bundle_path(standby.digest, missing_ok=True)
         if standby is not None and standby.digest != active.digest else None)
    if standby_bundle is not None:
        s = Path(standby_bundle)
    return a, s


class _StoppedWhileStarting(Exception):
    """A requested stop (SIGTERM) before the daemon served anything: a clean exit (0)."""


async def _first_of(*coros) -> None:
    """Wait until one of ``coros`` ends; cancel the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class AppControl:
    """What the admin API sees of the running daemon (daemon.admin.Controller)."""

    def __init__(self, app: "App") -> None:
        self.app = app

    def healthy(self) -> bool:
        task = self.app.engine_task
        return task is not None and not task.done()

    def ready(self) -> tuple[bool, str]:
        """The engine's readiness. A missing standby does not make the daemon unready (the active
        serves every record), but the reason says so: ``standby unavailable, ...``."""
        if self.app.engine is None:
            return False, "starting"
        ok, why = self.app.engine.ready()
        gap = self.app.controller.standby_gap() if ok and self.app.controller else None
        return (ok, gap) if gap else (ok, why)

    def status(self) -> dict:
        engine, controller = self.app.engine, self.app.controller
        doc: dict[str, Any] = engine.status() if engine else {"starting": True}
        doc["standby_mode"] = self.app.settings.failover.standby_mode
        doc["standby_ready"] = bool(engine and engine.releases.standby_ready)
        if engine and controller:
            doc["standby"] = self._standby_block(engine, controller, doc.get("standby"), doc["standby_ready"])
        doc["failovers"] = controller.recent() if controller else []
        if self.app.fetcher is not None:
            doc["bundle_fetches"] = self.app.fetcher.status()
        doc["ready"], doc["ready_reason"] = self.ready()
        return doc

    @staticmethod
    def _standby_block(engine, controller, loaded: dict | None, ready: bool) -> dict | None:
        """The loaded standby with ``state: ready``; or, while the wanted one is not loaded (loading,
        failed and retrying, died), ``state: loading|unavailable`` with the load error and the next
        retry; null when no standby is wanted (none configured, cold mode, after a failover)."""
        pending = controller.keeper.pending(engine) if controller.mode != "cold" else None
        if loaded is not None and ready:
            return dict(loaded, state="ready", **({"replacement": pending} if pending else {}))
        if pending is None:
            return loaded
        state = "loading" if pending["error"] is None else "unavailable"
        return dict(name=None, version=None, digest=None, pid=None, state=state, **pending)

    async def request_failover(self, reason: str) -> dict:
        assert self.app.controller is not None, "the admin API starts after the controller"
        self.app.controller.request(reason)
        return {"accepted": True, "reason": reason,
                "note": "handled at the next loop iteration of this instance"}

    async def _registry_change(self, fn, event_extra: dict | None = None) -> dict:
        from daemon import control

        from daemon.distribution.peers import advertise_url

        release = await asyncio.to_thread(fn)
        event = dict(control.release_event(release), holders=[advertise_url(self.app.settings)], **(event_extra or {}))
        await control.publish(self.app.settings.kafka.client_kwargs(), self.app.settings.registry.control_topic, event)
        return {"accepted": True, "release": release.to_dict(),
                "note": "takes effect at the next checkpoint boundary on every instance"}

    async def request_promote(self, ref: str, channel: str, reason: str) -> dict:
        from daemon.registry import Registry

        registry = Registry(self.app.settings.registry.path)
        bound = dict(self.app.settings.bindings)
        return await self._registry_change(lambda: registry.promote(ref, channel, reason, bindings=bound))

    async def request_rollback(self, to: str | None, reason: str, rescore: bool) -> dict:
        from daemon.registry import Registry

        registry = Registry(self.app.settings.registry.path)
        return await self._registry_change(lambda: registry.rollback(to, reason), {"rescore": rescore})


class App:
    def __init__(self, settings, *, active_bundle: Path | None = None, standby_bundle: Path | None = None) -> None:
        self.settings = settings
        self.active_bundle = active_bundle
        self.standby_bundle = standby_bundle
        self.engine: Engine | None = None
        self.engine_task: asyncio.Task | None = None
        self.controller: FailoverController | None = None
        self.fetcher: Fetcher | None = None
        self._signals = 0

    async def _load(self, path: Path, channel: str) -> LoadedRelease:
        if self.fetcher is not None:  # a registry archive not held yet is fetched by digest first
            path = await self.fetcher.ensure_path(path)
        w, f = self.settings.worker, self.settings.failover
        configure_workers(self.settings)  # boundary, formats, bindings (daemon.engine.worker.configure)
        return await load_release(path, channel=channel, mode=w.mode,
                                  unpack_dir=Path(self.settings.state.directory) / "bundles",
                                  predict_timeout=w.predict_timeout_ms / 1000,
                                  start_timeout=w.start_timeout_ms / 1000,
                                  isolate_max_records=f.isolate_max_records,
                                  isolate_max_fraction=f.isolate_max_fraction)

    def _on_signal(self, signame: str) -> None:
        self._signals += 1
        if self._signals > 1:
            log.error("second signal: forcing exit", extra={"signal": signame})
            if self.engine is not None:
                self.engine.kill_workers()  # no model process outlives the daemon
            os._exit(130)
        log.info("stopping", extra={"signal": signame})
        self.notifier.stopping()
        if self.engine is not None:
            self.engine.stop()
        loop = asyncio.get_running_loop()
        # A step that waits on the broker (a commit while it is down) must not hold the stop:
        # interrupt the loop after a grace period; close() then runs on one shared deadline.
        loop.call_later(STOP_GRACE_S, self._interrupt_engine)
        loop.call_later(STOP_BACKSTOP_S, self._force_exit, "shutdown deadline passed")

    def _interrupt_engine(self) -> None:
        task = self.engine_task
        if task is not None and not task.done() and not self.engine_closing():
            log.warning("the loop is still busy (broker down?): interrupting it to shut down")
            task.cancel()

    def engine_closing(self) -> bool:
        return self.engine is not None and self.engine.closing

    def _force_exit(self, why: str) -> None:
        log.error("forcing exit", extra={"why": why})
        if self.engine is not None:
            self.engine.kill_workers()
        os._exit(1)

    async def _start_engine(self) -> None:
        """Connect, waiting for the broker with backoff (as long as it takes, unless stopped)."""
        from aiokafka.errors import KafkaConnectionError

        engine = self.engine
        assert engine is not None
        delay = 0.5
        while True:
            try:
                await engine.start()
                return
            except KafkaConnectionError as exc:
                if not engine.stopping.is_set():
                    log.warning("Kafka not reachable; retrying", extra={"in_s": delay, "error": str(exc)})
                    self.notifier.status(f"waiting for Kafka at {self.settings.kafka.bootstrap_servers}")
                    await _first_of(asyncio.sleep(delay), engine.stopping.wait())  # a stop ends the wait
                if engine.stopping.is_set():
                    raise _StoppedWhileStarting("while waiting for Kafka") from exc
                delay = min(delay * 2, 10.0)

    async def run(self) -> int:
        from daemon.admin import AdminServer, load_token
        from daemon.coordination import ControlWatcher, ReleaseRecorder
        from daemon.failover.controller import FailoverController
        from daemon.sdnotify import Notifier, watchdog_loop

        s = self.settings
        from daemon.bundle import archive

        archive.configure(archive.Limits(s.registry.bundle_max_unpacked_bytes, s.registry.bundle_max_members))
        self.notifier = Notifier.from_env()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        token = load_token(s.admin.token_file, s.admin.token_env)
        read_token = load_token(s.registry.read_token_file, None)
        from daemon.distribution.fetch import Fetcher
        from daemon.registry import Registry

        self.fetcher = Fetcher.from_settings(s, read_token or token)
        admin = AdminServer(s.admin.bind, AppControl(self), token, bundles=Registry(s.registry.path).store.path,
                            read_token=read_token)
        await admin.start()
        stops = [admin.stop, *self._start_metrics()]
        background: list[asyncio.Task] = []
        try:
            self.notifier.status("loading releases")
            if self.active_bundle is None:
                await self._sync_registry()
                await self._fetch_releases()
            a_path, s_path = resolve_bundles(s, self.active_bundle, self.standby_bundle)
            # The active's model process starts while Kafka connects, joins the group and restores
            # state. The standby (hot/warm) loads beside it in the background: one that cannot load
            # is retried, and never keeps the active from serving (daemon/failover/standby.py).
            loading = asyncio.ensure_future(self._load(a_path, "active"))
            recorder = ReleaseRecorder(s)
            controller = self.controller = FailoverController(s, loader=self._load, standby_path=s_path,
                                                              recorder=recorder.record_failover)
            # the loader restarts and probes a worker after a record killed the model process
            engine = self.engine = Engine(s, active=None, standby=None, on_failure=controller.handle,
                                          observers=[controller.observe], on_change=controller.apply_change,
                                          loader=self._load)
            controller.attach(engine)
            keeper = controller.keep_standby()
            if keeper is not None:
                background.append(keeper)
            self.notifier.status("loading releases, joining the consumer group and restoring state")
            try:
                await self._start_engine()
                await _first_of(asyncio.shield(loading), engine.stopping.wait())
                if not loading.done():
                    raise _StoppedWhileStarting("while the active release loaded")
                active = loading.result()
                if keeper is not None and s.failover.standby_mode == "hot":
                    # a hot standby shadows from the first batch on (its state stays exact): wait
                    # for its first load to end; if that fails, the active starts alone
                    await _first_of(controller.keeper.first_attempt.wait(), engine.stopping.wait())
            except BaseException:
                loading.cancel()
                await asyncio.gather(loading, return_exceptions=True)
                await controller.stop_standby()
                await engine.close()
                raise
            self.engine.set_releases(active, self.engine.releases.standby)  # the standby, if it loaded already
            watcher = ControlWatcher(s, self.engine, self.controller)
            background.append(asyncio.create_task(watcher.follow(), name="control-watcher"))
            background.append(asyncio.create_task(self._notify_ready(), name="sd-ready"))
            stop_watchdog = asyncio.Event()
            background.append(asyncio.create_task(
                watchdog_loop(self.notifier, lambda: AppControl(self).healthy(),
                              stop_watchdog), name="sd-watchdog"))
            self.engine_task = asyncio.create_task(self.engine.run(), name="engine")
            try:
                await self.engine_task
            except asyncio.CancelledError:
                if not self.engine.stopping.is_set():
                    raise  # not our interruption
        except _StoppedWhileStarting as exc:  # everything started so far was closed (above)
            log.info("stopped before serving", extra={"when": str(exc)})
            return 0
        finally:
            self.notifier.stopping()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for stop in stops:
                try:
                    await stop()
                except Exception:  # noqa: BLE001
                    log.exception("server stop failed")
        if self.engine.fatal is not None:
            log.error("stopped on a fatal error", extra={"error": repr(self.engine.fatal)})
            return 1
        if self.engine.failure is not None:
            log.error("stopped after a release failure with no failover", extra={"error": str(self.engine.failure)})
            return 1
        return 0

    async def _sync_registry(self) -> None:
        """Append the releases other instances recorded on the control topic (their failovers,
        promotions from another host) so this instance starts on the release the group is on."""
        from daemon.registry import Registry

        s = self.settings
        try:
            added = await Registry(s.registry.path).sync_from_topic(s.kafka.client_kwargs(), s.registry.control_topic,
                                                                    timeout=10)
            if added:
                log.info("release log synced from the control topic", extra={"added": len(added)})
        except Exception as exc:  # noqa: BLE001 - the local log still names a release to start with
            log.warning("could not sync the release log from the control topic", extra={"error": str(exc)})

    async def _fetch_releases(self) -> None:
        """Fetch the archives of the current releases this registry lacks (a new host joining, a
        host that missed promotions while down). The active must arrive; a standby that cannot be
        fetched is left to the standby keeper ("standby unavailable", retried)."""
        from daemon.registry import Registry

        assert self.fetcher is not None
        status = Registry(self.settings.registry.path).status()
        active, standby = status.get("active"), status.get("standby")
        if active is not None:
            self.notifier.status(f"fetching the active bundle {active.ref}")
            await self.fetcher.ensure(active.digest)
        if standby is not None and (active is None or standby.digest != active.digest):
            try:
                await self.fetcher.ensure(standby.digest)
            except RegistryError as exc:
                log.warning("standby bundle not fetched yet; the standby keeper retries",
                            extra={"release": standby.ref, "error": str(exc)})

    async def _notify_ready(self) -> None:
        """READY=1 once partitions are assigned and state restored; STATUS= lines on changes."""
        engine = self.engine
        assert engine is not None
        last, sent_ready = None, False
        while True:
            ok, why = engine.ready()
            text = "processing" if ok else why
            if text != last:
                self.notifier.status(text)
                last = text
            if ok and not sent_ready:
                self.notifier.ready()
                sent_ready = True
            await asyncio.sleep(0.2)

    def _start_metrics(self) -> list:
        port = self.settings.metrics.port
        if not port:
            return []
        from prometheus_client import start_http_server

        host = self.settings.admin.bind.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        server, _thread = start_http_server(port, addr=host, registry=m.REGISTRY)

        async def stop_metrics() -> None:
            server.shutdown()

        return [stop_metrics]
