"""A small client of the Confluent-compatible Schema Registry REST API (plain ``urllib``).

Used where records are decoded (the model worker: writer schemas by id, the output schema's id)
and by ``failoverd release promote`` (compatibility of a release's output schema). Apicurio
Registry serves this API under ``/apis/ccompat/v7``; Confluent Schema Registry at its root.

Errors::

    RegistryError                the registry answered, and the answer says no (4xx other than auth)
    RegistryUnavailable          no answer, a 5xx, or 401/403: try again later (records wait, never
                                 dead-letter on it)

Only the endpoints failoverd needs: ``GET /schemas/ids/{id}``, ``POST /subjects/{s}`` (look up),
``POST /subjects/{s}/versions`` (register), ``POST /compatibility/subjects/{s}/versions/latest``,
``GET|PUT /config[/{s}]``.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
NOT_FOUND_CODES = (40401, 40402, 40403, 40408)
"""Confluent error codes for subject, version, schema (and subject-config) not found."""


class RegistryError(Exception):
    """The registry answered and refused (a 4xx that is not about credentials)."""

    def __init__(self, message: str, status: int = 0, code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def not_found(self) -> bool:
        return self.status == 404 or self.code in NOT_FOUND_CODES


class RegistryUnavailable(Exception):
    """No usable answer (connection refused, timeout, 5xx, 401/403): retry later."""


class RegistryClient:
    def __init__(self, url: str, *, username: str = "", password: str = "", timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": CONTENT_TYPE, "Content-Type": CONTENT_TYPE}
        if username or password:
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def __repr__(self) -> str:  # never the credentials
        return f"RegistryClient({self.url!r})"

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read() or b"{}")
            except ValueError:
                answer = {}
            message = answer.get("message") if isinstance(answer, dict) else None
            text = f"schema registry {self.url}: {method} {path} -> HTTP {exc.code}: {message or exc.reason}"
            if exc.code >= 500 or exc.code in (401, 403, 408, 429):
                raise RegistryUnavailable(text) from None
            raise RegistryError(text, exc.code, answer.get("error_code", 0) if isinstance(answer, dict) else 0) \
                from None
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, reset, timeout, not JSON
            reason = getattr(exc, "reason", exc)
            raise RegistryUnavailable(f"schema registry {self.url} unavailable: {reason}") from None

    @staticmethod
    def _subject(subject: str) -> str:
        return urllib.parse.quote(subject, safe="")

    def schema_by_id(self, schema_id: int) -> str | None:
        """The schema text registered under ``schema_id``; None when the registry has no such id."""
        try:
            answer = self._request("GET", f"/schemas/ids/{int(schema_id)}")
        except RegistryError as exc:
            if exc.not_found:
                return None
            raise
        kind = answer.get("schemaType", "AVRO")
        if kind != "AVRO":
            raise RegistryError(f"schema id {schema_id} is a {kind} schema, not AVRO")
        return answer["schema"]

    def lookup(self, subject: str, schema: str) -> int | None:
        """The id of ``schema`` under ``subject``, or None when it is not registered there."""
        try:
            return int(self._request("POST", f"/subjects/{self._subject(subject)}", {"schema": schema})["id"])
        except RegistryError as exc:
            if exc.not_found:
                return None
            raise

    def register(self, subject: str, schema: str) -> int:
        """Register ``schema`` under ``subject`` (an identical one keeps its id); its id."""
        return int(self._request("POST", f"/subjects/{self._subject(subject)}/versions", {"schema": schema})["id"])

    def check_compatibility(self, subject: str, schema: str) -> tuple[bool, list[str]]:
        """Whether ``schema`` may follow the latest version of ``subject`` under the subject's level
        (a subject with no versions accepts anything); the registry's messages when it says no."""
        try:
            answer = self._request("POST", f"/compatibility/subjects/{self._subject(subject)}/versions/latest"
                                   "?verbose=true", {"schema": schema})
        except RegistryError as exc:
            if exc.not_found:
                return True, []
            raise
        return bool(answer.get("is_compatible")), [str(m) for m in answer.get("messages") or ()]

    def compatibility(self, subject: str | None = None) -> str | None:
        """The compatibility level set on ``subject`` (None: not set there), or the global one."""
        path = f"/config/{self._subject(subject)}" if subject else "/config"
        try:
            answer = self._request("GET", path)
        except RegistryError as exc:
            if exc.not_found:
                return None
            raise
        return answer.get("compatibilityLevel") or answer.get("compatibility")

    def set_compatibility(self, level: str, subject: str | None = None) -> None:
        path = f"/config/{self._subject(subject)}" if subject else "/config"
        self._request("PUT", path, {"compatibility": level})
