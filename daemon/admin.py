"""The admin HTTP API: health, readiness, status, metrics, and the operator's three levers.

It runs on the daemon's own asyncio event loop (aiohttp): no extra thread or process, and a
``/healthz`` answer proves that loop is turning. It only talks to a :class:`Controller`; the
engine behind it is not its business.

    GET  /healthz    200 "ok" / 503            the loop answers and controller.healthy()
    GET  /readyz     200 "ready[: note]" / 503 reason  controller.ready()
    GET  /status     200 JSON                  controller.status()
    GET  /metrics    Prometheus exposition of the registry
    POST /failover   {"reason"}                            -> controller.request_failover
    POST /promote    {"ref", "channel", "reason"}          -> controller.request_promote
    POST /rollback   {"to": ref|null, "reason", "rescore"} -> controller.request_rollback
    GET  /bundles/<digest>  the archive this instance holds (read-only; admin or read token;
                     range requests): how peers fetch bundles by digest (daemon/distribution)

POST endpoints need ``Authorization: Bearer <token>`` (compared in constant time). With no token
configured they are disabled (403); a missing or wrong token gets 401. The token never reaches a
log line. The default bind address is loopback only.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from daemon import metrics
from daemon.errors import ConfigError, FailoverdError

log = logging.getLogger("failoverd.admin")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_BIND = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
TOKEN_ENV = "FAILOVERD_ADMIN_TOKEN"
CHANNELS = ("active", "standby")
_MAX_BODY = 64 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")
NO_TOKEN_MESSAGE = (
    "mutating admin endpoints are disabled because no admin token is configured; put a random "
    "token in a file readable only by the daemon and set admin.token_file to it, or set "
    "admin.token_env to the name of an environment variable holding it "
    f"(e.g. {TOKEN_ENV}; docs/operations.md#admin-api)"
)


@runtime_checkable
class Controller(Protocol):
    """What the admin API needs from the daemon. Request methods return a JSON-able dict."""

    def healthy(self) -> bool: ...

    def ready(self) -> tuple[bool, str]: ...

    def status(self) -> dict: ...

    async def request_failover(self, reason: str) -> dict: ...

    async def request_promote(self, ref: str, channel: str, reason: str) -> dict: ...

    async def request_rollback(self, to: str | None, reason: str, rescore: bool) -> dict: ...


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (on 127.0.0.1) -> (host, port).

    A bare ``:PORT`` is refused rather than read as "every interface": listening beyond
    loopback has to be written out (``0.0.0.0:8080``).
    """
    text = (bind or "").strip()
    if text.isdigit():
        host, port_text = DEFAULT_HOST, text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"admin bind {bind!r}: write an IPv6 address as [ADDR]:PORT, e.g. [::1]:8080")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"admin bind {bind!r}: expected HOST:PORT, e.g. {DEFAULT_BIND} "
                              "(or 0.0.0.0:8080 to listen on every interface)")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"admin bind {bind!r}: port must be a number from 0 to 65535")
    return host, port


def load_token(token_file: Path | str | None, token_env: str | None, *,
               environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token from ``token_file`` (preferred) or the environment variable ``token_env``.

    Returns None when neither is configured (mutating endpoints then stay disabled). Surrounding
    whitespace is stripped. A configured file that is missing, unreadable or empty, or an empty
    variable, is a :class:`ConfigError`: an operator who set a token expects it to be enforced.
    """
    env = os.environ if environ is None else environ
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ConfigError(f"admin token file {path} does not exist; create it, e.g. "
                              f"`umask 077; openssl rand -hex 32 > {path}`, or remove the token_file setting") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"admin token file {path} cannot be read: {exc}") from None
        if not token:
            raise ConfigError(f"admin token file {path} is empty; write a random token into it, "
                              f"e.g. `openssl rand -hex 32 > {path}`")
        try:
            if path.stat().st_mode & 0o004:
                log.warning("admin token file is readable by every user; chmod 600 it",
                            extra={"token_file": str(path)})
        except OSError:
            pass
        return token
    if token_env:
        value = env.get(token_env)
        if value is None:
            return None
        token = value.strip()
        if not token:
            raise ConfigError(f"environment variable {token_env} is set but empty; "
                              "put a random token in it or unset it")
        return token
    return None


class AdminServer:
    """The admin API on ``bind`` serving ``controller``.

    ``bind`` is ``HOST:PORT``, ``[IPv6]:PORT``, or just ``PORT`` for 127.0.0.1; None means
    127.0.0.1:8080. Port 0 picks a free port (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, bind: str | None, controller: Controller, token: str | None = None,
                 registry: CollectorRegistry = metrics.REGISTRY, *,
                 bundles: Callable[[str], Path | None] | None = None, read_token: str | None = None) -> None:
        self.host, self._requested_port = parse_bind(bind or DEFAULT_BIND)
        self.controller = controller
        self._token = token.encode() if token else None
        self._read_token = read_token.encode() if read_token else None
        self._bundles = bundles
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = self._make_app()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("admin server already started")
        runner = web.AppRunner(self.app, access_log_class=_AccessLogger,
                               access_log=logging.getLogger("failoverd.admin.access"),
                               handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"admin API cannot listen on {self.host}:{self._requested_port}: "
                              f"{exc.strerror or exc}") from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        if not _is_loopback(self.host):
            log.warning("admin API listens beyond loopback: /status and /metrics need no token there",
                        extra={"bind": f"{self.host}:{self.port}"})
        log.info("admin API listening", extra={"url": self.url,
                                               "mutations": "enabled" if self._token else "disabled (no token)"})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port if self.port is not None else self._requested_port}"

    @property
    def sockets(self) -> list:
        """Addresses actually bound (for tests and the startup log)."""
        return list(self._runner.addresses) if self._runner else []

    # ---- routes ---------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.add_routes([
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/status", self._status),
            web.get("/metrics", self._metrics),
            web.post("/failover", self._failover),
            web.post("/promote", self._promote),
            web.post("/rollback", self._rollback),
            web.get("/bundles/{digest}", self._bundle),
        ])
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            ok = bool(self.controller.healthy())
        except Exception:
            log.exception("controller.healthy() raised")
            ok = False
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ok, reason = self.controller.ready()
        except Exception as exc:
            log.exception("controller.ready() raised")
            ok, reason = False, f"readiness check failed: {exc}"
        if ok:  # ready, with a note when something is degraded (e.g. the standby is unavailable)
            return web.Response(text="ready\n" if reason in ("", "ok") else f"ready: {reason}\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self.controller.status())

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def _bundle(self, request: web.Request) -> web.StreamResponse:
        """The archive stored under a digest, for a peer to fetch (it verifies the bytes itself)."""
        tokens = [t for t in (self._token, self._read_token) if t]
        where = {"path": request.path, "remote": request.remote}
        if not tokens:
            raise _error(web.HTTPForbidden, "serving bundles is disabled because no admin or read token is "
                         "configured; set admin.token_file or registry.read_token_file (docs/operations.md)")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given.strip().encode(), t) for t in tokens)
        if not ok:
            log.warning("bundle request refused: missing or wrong token", extra=where)
            raise _error(web.HTTPUnauthorized, "missing or wrong `Authorization: Bearer <token>` (admin or read token)",
                         headers={"WWW-Authenticate": 'Bearer realm="failoverd"'})
        digest = request.match_info["digest"]
        if not _DIGEST.fullmatch(digest):
            raise _bad_request("a bundle is named by its full digest (64 lowercase hex characters)")
        path = self._bundles(digest) if self._bundles is not None else None
        if path is None:
            raise _error(web.HTTPNotFound, f"bundle {digest[:12]} is not held by this instance")
        log.info("serving bundle", extra={"digest": digest[:12], **where})
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def _failover(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request)
        reason = _text(body, "reason")
        return await self._call(request, "failover", self.controller.request_failover(reason), reason=reason)

    async def _promote(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request)
        ref, reason = _text(body, "ref"), _text(body, "reason")
        channel = _text(body, "channel")
        if channel not in CHANNELS:
            raise _bad_request(f"channel must be one of {', '.join(CHANNELS)}, not {channel!r}")
        return await self._call(request, "promote", self.controller.request_promote(ref, channel, reason),
                                ref=ref, channel=channel, reason=reason)

    async def _rollback(self, request: web.Request) -> web.Response:
        body = await self._authorized_body(request)
        to = body.get("to")
        if to is not None and (not isinstance(to, str) or not to.strip()):
            raise _bad_request('"to" must be a release ref (name@version or digest) or null for the previous release')
        reason = _text(body, "reason")
        rescore = body.get("rescore", False)
        if not isinstance(rescore, bool):
            raise _bad_request('"rescore" must be true or false')
        return await self._call(request, "rollback",
                                self.controller.request_rollback(to.strip() if to else None, reason, rescore),
                                to=to, reason=reason, rescore=rescore)

    # ---- helpers --------------------------------------------------------------------------
    async def _authorized_body(self, request: web.Request) -> dict[str, Any]:
        where = {"path": request.path, "remote": request.remote}
        if self._token is None:
            log.warning("admin request refused: no admin token configured", extra=where)
            raise _error(web.HTTPForbidden, NO_TOKEN_MESSAGE)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            log.warning("admin request refused: missing bearer token", extra=where)
            raise _error(web.HTTPUnauthorized, "missing `Authorization: Bearer <token>` header",
                         headers={"WWW-Authenticate": 'Bearer realm="failoverd"'})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            log.warning("admin request refused: wrong token", extra=where)
            raise _error(web.HTTPUnauthorized, "wrong admin token",
                         headers={"WWW-Authenticate": 'Bearer realm="failoverd", error="invalid_token"'})
        try:
            body = await request.json() if request.can_read_body else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad_request("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad_request("request body must be a JSON object")
        return body

    async def _call(self, request: web.Request, action: str, coro, **fields: Any) -> web.Response:
        log.info("admin %s requested", action, extra={"remote": request.remote, **fields})
        try:
            # Shielded: a client that hangs up must not cancel a failover halfway.
            result = await asyncio.shield(coro)
        except FailoverdError as exc:  # refused or failed for a reason the message explains
            log.warning("admin %s refused: %s", action, exc)
            return _json({"error": str(exc), "type": type(exc).__name__}, status=409)
        except Exception:
            log.exception("admin %s crashed", action)
            return _json({"error": f"{action} failed with an internal error; see the daemon log"}, status=500)
        return _json(result)


class _AccessLogger(AbstractAccessLogger):
    """Probes and scrapes (GET) at DEBUG, operator actions (POST) at INFO; path only, no query."""

    def log(self, request, response, time: float) -> None:
        level = logging.DEBUG if request.method in ("GET", "HEAD") else logging.INFO
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "%s %s %s", request.method, request.path, response.status,
                            extra={"remote": request.remote, "seconds": round(time, 4)})


def _text(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise _bad_request(f'"{field}" is required and must be a non-empty string')
    return value.strip()


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        text=json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def _error(cls: type[web.HTTPException], message: str, **kwargs: Any) -> web.HTTPException:
    return cls(text=json.dumps({"error": message}) + "\n", content_type="application/json", **kwargs)


def _bad_request(message: str) -> web.HTTPException:
    return _error(web.HTTPBadRequest, message)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
