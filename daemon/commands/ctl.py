"""``failoverd ctl status|failover|promote|rollback``: talk to a running daemon's admin API.

A thin HTTP client (stdlib only) of daemon/admin.py. It prints the daemon's JSON answer. The
token for the mutating commands comes from ``--token-file`` or ``FAILOVERD_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from daemon.errors import ConfigError, FailoverdError

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "FAILOVERD_ADMIN_URL"
TOKEN_ENV = "FAILOVERD_ADMIN_TOKEN"  # same name as daemon.admin.TOKEN_ENV (not imported: aiohttp is heavy)


def register(sub) -> None:
    p = sub.add_parser(
        "ctl", help="control a running daemon through its admin API (status, failover, promote, rollback)",
        description="Talk to a running failoverd's admin HTTP API and print its JSON answer. "
                    f"Mutating commands need the admin token: --token-file FILE or ${TOKEN_ENV}.")
    _add_connection_options(p, defaults=True)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    st = actions.add_parser("status", help="the daemon's status: releases, partitions, checkpoints, failovers")

    fo = actions.add_parser("failover", help="fail over to the standby release now")
    fo.add_argument("--reason", default=None, help="why (recorded in the failover event; default names you)")

    pr = actions.add_parser("promote", help="place a bundle on a channel")
    pr.add_argument("ref", help="bundle ref: name@version or sha256 digest")
    pr.add_argument("--channel", required=True, choices=["active", "standby"],
                    help="active: produces the outputs; standby: takes over when the active release fails")
    pr.add_argument("--reason", default=None, help="why (recorded in the release log; default names you)")

    rb = actions.add_parser("rollback", help="return to an earlier release")
    rb.add_argument("--to", default=None, help="release ref to return to (default: the previous active release)")
    rb.add_argument("--reason", default=None, help="why (recorded in the release log; default names you)")
    rb.add_argument("--rescore", action="store_true",
                    help="also reprocess the records the rolled-back release produced")
    for action in (st, fo, pr, rb):  # accepted after the action too: `failoverd ctl status --url ...`
        _add_connection_options(action, defaults=False)
    p.set_defaults(func=run)


def _add_connection_options(p, *, defaults: bool) -> None:
    def default(value):
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--url", default=default(os.environ.get(URL_ENV, DEFAULT_URL)),
                   help=f"admin API base URL (default: ${URL_ENV} or {DEFAULT_URL})")
    p.add_argument("--token-file", type=Path, default=default(None),
                   help=f"file holding the admin token (default: ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=default(60.0),
                   help="seconds to wait for an answer (default 60)")


def run(args) -> int:
    reason = getattr(args, "reason", None) or _default_reason()
    if args.action == "status":
        doc = request(args.url, "GET", "/status", timeout=args.timeout)
    elif args.action == "failover":
        doc = request(args.url, "POST", "/failover", {"reason": reason}, token=_token(args), timeout=args.timeout)
    elif args.action == "promote":
        doc = request(args.url, "POST", "/promote", {"ref": args.ref, "channel": args.channel, "reason": reason},
                      token=_token(args), timeout=args.timeout)
    else:
        doc = request(args.url, "POST", "/rollback", {"to": args.to, "reason": reason, "rescore": args.rescore},
                      token=_token(args), timeout=args.timeout)
    print(json.dumps(doc, indent=2, sort_keys=True))
    return 0


def request(base_url: str, method: str, path: str, body: dict | None = None, *,
            token: str | None = None, timeout: float = 60.0) -> dict:
    """One admin API call; returns the decoded JSON answer or raises FailoverdError saying why not."""
    url = base_url.rstrip("/") + path
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw).get("error") or raw.decode(errors="replace").strip()
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace").strip()
        hint = ""
        if exc.code == 401:
            hint = f" (check --token-file or ${TOKEN_ENV})"
        raise FailoverdError(f"{method} {url}: HTTP {exc.code}: {message}{hint}") from None
    except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:
        why = getattr(exc, "reason", exc)
        raise FailoverdError(
            f"cannot reach the failoverd admin API at {base_url}: {why}; is the daemon running, and is "
            f"--url (or ${URL_ENV}) its admin address?") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise FailoverdError(f"{method} {url}: the answer is not JSON: {raw[:200]!r}") from None


def _token(args) -> str:
    if args.token_file:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"this command needs the admin token: pass --token-file FILE or set {TOKEN_ENV}")
    return token


def _default_reason() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in a minimal container
        user = str(os.getuid())
    return f"manual, by {user}@{socket.gethostname()} via failoverd ctl"
