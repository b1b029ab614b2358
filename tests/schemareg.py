"""A local Schema Registry (Apicurio) for tests, through ``failoverd schema-registry up|down``, and Avro helpers."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import fastavro

from daemon.formats.avro import frame, schema_text
from daemon.formats.registry import RegistryClient
from daemon.schema_registry_local import API_PATH
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


class LocalRegistryProc:
    def __init__(self, port: int, persist: bool = False) -> None:
        self.port = port
        self.persist = persist

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PATH}"

    def client(self) -> RegistryClient:
        return RegistryClient(self.url)

    def _cli(self, action: str) -> str:
        extra = ["--persist"] if self.persist and action == "up" else []
        proc = subprocess.run([sys.executable, "-m", "daemon", "schema-registry", action, "--port", str(self.port),
                               *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"failoverd schema-registry {action} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    @classmethod
    def start_new(cls, persist: bool = False) -> "LocalRegistryProc":
        registry = cls(free_port(), persist)
        registry.up()
        return registry

    def up(self) -> str:
        return self._cli("up")

    def stop(self) -> str:
        return self._cli("down")

    def remove(self) -> None:
        """Stop it and delete its directory (log, pid file, data): a test session's port is never reused."""
        import shutil

        from daemon.schema_registry_local import DEFAULT_PORT, LocalSchemaRegistry

        self.stop()
        if self.port != DEFAULT_PORT:  # the default port's directory also holds the unpacked app
            shutil.rmtree(LocalSchemaRegistry(ROOT, self.port).home, ignore_errors=True)


def encoder(schema: dict, schema_id: int):
    """value dict -> Confluent wire-format bytes with ``schema`` under ``schema_id``."""
    parsed = fastavro.parse_schema(schema)

    def encode(value: dict) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, value)
        return frame(schema_id, buf.getvalue())

    return encode


def decode(value: bytes, schema: dict) -> tuple[int, dict]:
    """(schema id, value) of a wire-format output, read with ``schema``."""
    assert value[0] == 0, value[:8]
    return int.from_bytes(value[1:5], "big"), fastavro.schemaless_reader(io.BytesIO(value[5:]),
                                                                       fastavro.parse_schema(schema))


def register(url: str, subject: str, schema: dict) -> int:
    return RegistryClient(url).register(subject, schema_text(schema))
