"""The admin HTTP API (daemon/admin.py) and its CLI client (failoverd ctl), over real HTTP.

The controller here is a small recording fake: what is under test is the API (routes, status
codes, token rules, binding), not the engine behind it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from daemon import metrics
from daemon.admin import AdminServer, Controller, load_token, parse_bind
from daemon.errors import ConfigError, RegistryError
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-1f2e3d4c5b6a"


class FakeController:
    def __init__(self) -> None:
        self.is_healthy = True
        self.readiness = (True, "")
        self.calls: list[tuple] = []

    def healthy(self) -> bool:
        return self.is_healthy

    def ready(self) -> tuple[bool, str]:
        return self.readiness

    def status(self) -> dict:
        return {"active": {"name": "fraud", "version": "1.2.0"}, "standby": None, "partitions": [0, 1]}

    async def request_failover(self, reason: str) -> dict:
        self.calls.append(("failover", reason))
        return {"failover": "done", "reason": reason}

    async def request_promote(self, ref: str, channel: str, reason: str) -> dict:
        self.calls.append(("promote", ref, channel, reason))
        if ref == "unknown@9":
            raise RegistryError("no bundle unknown@9 in the registry; `failoverd bundle list` shows what there is")
        return {"promoted": ref, "channel": channel}

    async def request_rollback(self, to: str | None, reason: str, rescore: bool) -> dict:
        self.calls.append(("rollback", to, reason, rescore))
        return {"rolled_back_to": to or "previous", "rescore": rescore}


@pytest.fixture
def controller():
    return FakeController()


@pytest.fixture
async def server(controller):
    srv = AdminServer("127.0.0.1:0", controller, token=TOKEN)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_fake_controller_satisfies_the_protocol(controller):
    assert isinstance(controller, Controller)


# ---- read-only endpoints ------------------------------------------------------------------
async def test_healthz(server, controller, http):
    async with http.get(server.url + "/healthz") as r:
        assert (r.status, await r.text()) == (200, "ok\n")
    controller.is_healthy = False
    async with http.get(server.url + "/healthz") as r:
        assert r.status == 503


async def test_readyz(server, controller, http):
    async with http.get(server.url + "/readyz") as r:
        assert r.status == 200
    controller.readiness = (False, "restoring state: 1200 changelog records left")
    async with http.get(server.url + "/readyz") as r:
        assert r.status == 503
        assert "restoring state: 1200 changelog records left" in await r.text()


async def test_status_is_json(server, http):
    async with http.get(server.url + "/status") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        assert await r.json() == FakeController().status()


async def test_metrics_exposition(server, http):
    async with http.get(server.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    value = metrics.STANDBY_READY._value.get()  # the shared registry: read it, don't change it
    assert f"failoverd_standby_ready {value}" in text
    assert "# TYPE failoverd_records_in_total counter" in text
    # OpenMetrics when the scraper asks for it (Prometheus does)
    async with http.get(server.url + "/metrics", headers={"Accept": "application/openmetrics-text"}) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await r.text()).rstrip().endswith("# EOF")


async def test_metrics_of_a_given_registry(controller, http):
    reg = CollectorRegistry()
    Counter("only_here", "x", registry=reg).inc()
    async with AdminServer("127.0.0.1:0", controller, registry=reg) as srv:
        async with http.get(srv.url + "/metrics") as r:
            text = await r.text()
    assert "only_here_total 1.0" in text and "failoverd_" not in text


# ---- token rules --------------------------------------------------------------------------
async def test_mutations_disabled_without_a_token(controller, http, caplog):
    async with AdminServer("127.0.0.1:0", controller, token=None) as srv:
        for path, body in [("/failover", {"reason": "drill"}),
                           ("/promote", {"ref": "fraud@1.3.0", "channel": "active", "reason": "r"}),
                           ("/rollback", {"to": None, "reason": "r"})]:
            async with http.post(srv.url + path, json=body, headers=auth("anything")) as r:
                assert r.status == 403
                assert "no admin token is configured" in (await r.json())["error"]
        async with http.get(srv.url + "/status") as r:  # read-only endpoints still work
            assert r.status == 200
    assert controller.calls == []
    assert "anything" not in caplog.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-xyz"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer "},
                                     {"Authorization": f"Bearer {TOKEN}x"}])
async def test_missing_or_wrong_token_is_401_and_not_logged(server, controller, http, caplog, headers):
    caplog.set_level(logging.DEBUG)
    async with http.post(server.url + "/failover", json={"reason": "drill"}, headers=headers) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert controller.calls == []
    refusals = [rec for rec in caplog.records if "refused" in rec.getMessage()]
    assert refusals, caplog.text
    for rec in caplog.records:  # not in the message, not in any extra field
        line = rec.getMessage() + " " + " ".join(map(str, rec.__dict__.values()))
        assert "wrong-token-xyz" not in line and TOKEN not in line


async def test_right_token_reaches_the_controller(server, controller, http):
    async with http.post(server.url + "/failover", json={"reason": "drill"}, headers=auth()) as r:
        assert r.status == 200
        assert await r.json() == {"failover": "done", "reason": "drill"}
    async with http.post(server.url + "/promote", headers=auth(),
                         json={"ref": "fraud@1.3.0", "channel": "standby", "reason": "new model"}) as r:
        assert r.status == 200
    async with http.post(server.url + "/rollback", headers=auth(),
                         json={"to": "fraud@1.2.0", "reason": "bad scores", "rescore": True}) as r:
        assert r.status == 200
    async with http.post(server.url + "/rollback", headers=auth(), json={"reason": "bad scores"}) as r:
        assert (await r.json())["rescore"] is False
    assert controller.calls == [
        ("failover", "drill"),
        ("promote", "fraud@1.3.0", "standby", "new model"),
        ("rollback", "fraud@1.2.0", "bad scores", True),
        ("rollback", None, "bad scores", False),
    ]


@pytest.mark.parametrize("path,body,needle", [
    ("/failover", {}, '"reason" is required'),
    ("/failover", {"reason": "  "}, '"reason" is required'),
    ("/failover", [1, 2], "must be a JSON object"),
    ("/promote", {"ref": "a@1", "channel": "primary", "reason": "r"}, "channel must be one of"),
    ("/promote", {"channel": "active", "reason": "r"}, '"ref" is required'),
    ("/rollback", {"reason": "r", "rescore": "yes"}, '"rescore" must be true or false'),
    ("/rollback", {"reason": "r", "to": 3}, '"to" must be a release ref'),
])
async def test_bad_bodies_are_400_with_a_reason(server, controller, http, path, body, needle):
    async with http.post(server.url + path, json=body, headers=auth()) as r:
        assert r.status == 400
        assert needle in (await r.json())["error"]
    assert controller.calls == []


async def test_invalid_json_is_400(server, http):
    async with http.post(server.url + "/failover", data=b"{nope", headers=auth()) as r:
        assert r.status == 400


async def test_controller_refusal_is_409_with_its_message(server, http):
    async with http.post(server.url + "/promote", headers=auth(),
                         json={"ref": "unknown@9", "channel": "active", "reason": "r"}) as r:
        assert r.status == 409
        doc = await r.json()
    assert doc["type"] == "RegistryError" and "no bundle unknown@9" in doc["error"]


async def test_access_log_keeps_probes_quiet(server, http, caplog):
    caplog.set_level(logging.INFO, logger="failoverd.admin.access")
    async with http.get(server.url + "/healthz?verbose=1"):
        pass
    async with http.post(server.url + "/failover", json={"reason": "drill"}, headers=auth()):
        pass
    for _ in range(100):  # the server logs after the response went out
        access = [r.getMessage() for r in caplog.records if r.name == "failoverd.admin.access"]
        if access:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    access = [r.getMessage() for r in caplog.records if r.name == "failoverd.admin.access"]
    assert access == ["POST /failover 200"]


async def test_get_on_a_mutating_route_is_405(server, http):
    async with http.get(server.url + "/failover") as r:
        assert r.status == 405


# ---- binding ------------------------------------------------------------------------------
def _connects(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


async def test_default_bind_is_loopback_only(controller):
    """Bound to 127.0.0.1, not every interface: another local address gets no answer.

    The other address is 127.0.0.2 (also this machine, in the loopback range): a server bound to
    0.0.0.0 answers there, as the control case shows, so a refusal proves the narrow bind.
    Tests here only send traffic to loopback addresses, never to the machine's network interfaces.
    """
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert AdminServer(None, controller).url == "http://127.0.0.1:8080"  # not started: 8080 may be taken here
    async with AdminServer("0", controller) as srv:  # port only: loopback
        assert [addr[0] for addr in srv.sockets] == ["127.0.0.1"]
        assert await asyncio.to_thread(_connects, "127.0.0.1", srv.port)
        assert not await asyncio.to_thread(_connects, "127.0.0.2", srv.port)
    async with AdminServer("0.0.0.0:0", controller) as wide:  # control: a wildcard bind is reachable there
        assert await asyncio.to_thread(_connects, "127.0.0.2", wide.port)


def test_parse_bind():
    assert parse_bind("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_bind("[::1]:8080") == ("::1", 8080)
    for bad in [":8080", "host", "127.0.0.1:http", "127.0.0.1:70000", "[::1]8080"]:
        with pytest.raises(ConfigError, match="admin bind"):
            parse_bind(bad)


async def test_port_in_use_is_a_clear_error(server, controller):
    with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
        await AdminServer(f"127.0.0.1:{server.port}", controller).start()


# ---- load_token ---------------------------------------------------------------------------
def test_load_token(tmp_path):
    f = tmp_path / "admin.token"
    f.write_text("  abc123\n")
    f.chmod(0o600)
    assert load_token(f, None) == "abc123"
    assert load_token(f, "T", environ={"T": "from-env"}) == "abc123"  # the file wins
    assert load_token(None, "T", environ={"T": " from-env \n"}) == "from-env"
    assert load_token(None, "T", environ={}) is None
    assert load_token(None, None) is None
    with pytest.raises(ConfigError, match="does not exist"):
        load_token(tmp_path / "missing.token", None)
    (tmp_path / "empty.token").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_token(tmp_path / "empty.token", None)
    with pytest.raises(ConfigError, match="set but empty"):
        load_token(None, "T", environ={"T": "  "})


# ---- the CLI client -----------------------------------------------------------------------
async def ctl(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    """Run `failoverd ctl ...` as a user would, in a subprocess, while the server keeps serving."""
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVERD_ADMIN")}
    proc_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "ctl", *args, cwd=ROOT, env=proc_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_ctl_against_the_running_server(server, controller, tmp_path):
    rc, out, err = await ctl("--url", server.url, "status")
    assert rc == 0, err
    assert json.loads(out) == controller.status()

    rc, out, err = await ctl("failover", "--url", server.url, "--reason", "drill")  # options after the action
    assert rc != 0 and "needs the admin token" in err
    rc, out, err = await ctl("--url", server.url, "failover", "--reason", "drill",
                             env={"FAILOVERD_ADMIN_TOKEN": "wrong"})
    assert rc != 0 and "HTTP 401" in err and "wrong" not in out

    token_file = tmp_path / "t"
    token_file.write_text(TOKEN + "\n")
    rc, out, err = await ctl("--url", server.url, "--token-file", str(token_file), "failover", "--reason", "drill")
    assert rc == 0, err
    assert json.loads(out) == {"failover": "done", "reason": "drill"}

    env = {"FAILOVERD_ADMIN_TOKEN": TOKEN, "FAILOVERD_ADMIN_URL": server.url}
    rc, out, err = await ctl("promote", "fraud@1.3.0", "--channel", "standby", env=env)
    assert rc == 0, err
    rc, out, err = await ctl("rollback", "--to", "fraud@1.2.0", "--rescore", "--reason", "bad", env=env)
    assert rc == 0, err
    rc, out, err = await ctl("promote", "unknown@9", "--channel", "active", env=env)
    assert rc == 1 and "HTTP 409" in err and "no bundle unknown@9" in err

    assert controller.calls[0] == ("failover", "drill")
    assert controller.calls[1][:3] == ("promote", "fraud@1.3.0", "standby")
    assert "via failoverd ctl" in controller.calls[1][3]  # default reason names the operator
    assert controller.calls[2] == ("rollback", "fraud@1.2.0", "bad", True)


async def test_ctl_says_when_the_daemon_is_unreachable():
    rc, out, err = await ctl("--url", f"http://127.0.0.1:{free_port()}", "status")  # nobody listens
    assert rc == 1
    assert "cannot reach the failoverd admin API" in err and "is the daemon running" in err
