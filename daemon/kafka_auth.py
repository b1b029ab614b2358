"""Kafka credentials kept out of the configuration file: a password file, and OAUTHBEARER tokens.

aiokafka asks an :class:`~aiokafka.abc.AbstractTokenProvider` for a token each time a connection
authenticates (every client, every broker, every reconnect). A token file is read each time (a
token a sidecar rotates there is used from the next connection on); a command's token is held
until it is about to expire (its JWT ``exp`` claim) and only then is the command run again, so
an identity provider is not asked once per connection. Tokens and passwords never appear in a log line, a message
or a ``repr``.

    kwargs["sasl_oauth_token_provider"] = token_provider("/run/secrets/kafka-token", None)
    kwargs["sasl_oauth_token_provider"] = token_provider(None, "vault read -field=token kafka/creds")
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import shlex
import time
from pathlib import Path

from aiokafka.abc import AbstractTokenProvider

from daemon.errors import ConfigError

COMMAND_TIMEOUT_S = 30.0
"""How long a token command may run before the connection attempt fails."""
NO_EXPIRY_TTL_S = 60.0
"""How long a command's token without an ``exp`` claim is reused before the command runs again."""
REFRESH_MARGIN_S = 30.0
"""A token is replaced this long before it expires (or at 80% of its lifetime, if that is sooner)."""


def read_secret(key: str, path: str) -> str:
    """The secret held in the file ``path`` (one trailing newline stripped); ConfigError naming ``key``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key} = \"{path}\" does not exist: expected a file holding the secret "
                          "(mount the Secret there, or fix the path)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key} = \"{path}\" cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret.strip():
        raise ConfigError(f"{key} = \"{path}\" is empty: expected the secret in it")
    return secret


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim (epoch seconds) of a JWT, unverified (the broker verifies), or None."""
    parts = token.split(".")
    if len(parts) < 2:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def refresh_at(token: str, now: float, default_ttl: float | None) -> float:
    """When a token read at ``now`` is read again: before its expiry, else after ``default_ttl``
    (None: never on time alone)."""
    exp = token_expiry(token)
    if exp is None:
        return now + default_ttl if default_ttl is not None else float("inf")
    return exp - min(REFRESH_MARGIN_S, max(0.0, (exp - now) / 5))


class FileTokenProvider(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """The token in a file, read at every authentication: a few reads of a small file per
    connection cost nothing, and a token rotated in the file (by a sidecar, before its expiry) is
    used from the next connection on, without relying on the file's modification time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"FileTokenProvider({self.path!r})"

    async def token(self) -> str:
        return read_secret("kafka.sasl_oauth_token_file", self.path).strip()


class CommandTokenProvider(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
    """The token a command prints on stdout, run again when the token is about to expire."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.argv = shlex.split(command)
        self._token = ""
        self._refresh_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"CommandTokenProvider({self.argv[0]!r})"

    async def token(self) -> str:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:  # a lock belongs to one event loop
            self._lock, self._lock_loop = asyncio.Lock(), loop
        async with self._lock:  # many connections at once start one command
            now = time.time()
            if not self._token or now >= self._refresh_at:
                self._token = await self._run()
                self._refresh_at = refresh_at(self._token, now, NO_EXPIRY_TTL_S)
            return self._token

    async def _run(self) -> str:
        what = f"kafka.sasl_oauth_token_command ({self.argv[0]})"
        try:
            proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise ConfigError(f"{what} cannot be started: {exc.strerror}; fix the command") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise ConfigError(f"{what} did not finish within {COMMAND_TIMEOUT_S:.0f}s") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output on stderr"]
            raise ConfigError(f"{what} exited with code {proc.returncode}: {tail[0][:300]}")
        token = out.decode(errors="replace").strip()
        if not token or len(token.split()) != 1:
            raise ConfigError(f"{what} printed {'nothing' if not token else 'more than one word'}: "
                              "expected the token alone on stdout")
        return token


def token_provider(token_file: str | None, token_command: str | None) -> AbstractTokenProvider:
    """The provider of ``[kafka] sasl_oauth_token_file`` or ``sasl_oauth_token_command`` (one is set)."""
    if token_file is not None:
        return FileTokenProvider(token_file)
    if token_command is not None:
        return CommandTokenProvider(token_command)
    raise ConfigError("kafka.sasl_mechanism = \"OAUTHBEARER\" needs kafka.sasl_oauth_token_file or "
                      "kafka.sasl_oauth_token_command")
