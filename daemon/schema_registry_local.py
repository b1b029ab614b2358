"""A real Schema Registry on loopback (Apicurio Registry 3, in-memory), for the Avro example and the tests.

Apicurio Registry's Quarkus distribution comes from Maven Central through
``deploy/schema-registry-local/pom.xml``, unpacked under ``.local/schema-registry/app/``; logs and
the pid file live under ``.local/schema-registry[-PORT]/`` (git-ignored). Java 17+ and Maven are
the prerequisites outside Python, as for ``failoverd kafka``. Clients use its Confluent-compatible
API: :meth:`LocalSchemaRegistry.url` (``http://127.0.0.1:PORT/apis/ccompat/v7``).

``up`` fetches (once) and starts it, then waits until the API answers (about 7 s; ~260 MB RSS);
running it again while it is up does nothing. ``down`` stops it with SIGTERM (SIGKILL after a
deadline). Storage is in memory by default: every start begins empty, so a test session registers
what it uses; ``persist=True`` (``up --persist``) keeps it in an H2 database file under the
registry's directory instead, so schemas and their ids survive a restart (as a production
registry's do). Note its default compatibility level is NONE (Confluent's is BACKWARD).

Why ``dependency:get`` and not ``dependency:unpack``: the app's parent POM
(``io.apicurio:apicurio-registry:3.0.9``) is not on Maven Central, so Maven cannot read the
artifact's descriptor and every goal that resolves it through the project refuses;
``dependency:get -Dtransitive=false`` fetches the archive alone into the local Maven repository,
and it is unpacked from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

from daemon import localservice
from daemon.errors import BrokerError

DEFAULT_PORT = 8081
"""The local registry's HTTP port; ``FAILOVERD_SCHEMA_REGISTRY_PORT`` changes what the command uses by default."""
API_PATH = "/apis/ccompat/v7"


def default_port() -> int:
    return int(os.environ.get("FAILOVERD_SCHEMA_REGISTRY_PORT") or DEFAULT_PORT)


class SchemaRegistryError(BrokerError):
    """The local schema registry cannot be fetched or started."""


def _pom_value(pom: Path, tag: str) -> str:
    found = re.search(rf"<{tag}>([^<]+)</{tag}>", pom.read_text())
    if not found:
        raise SchemaRegistryError(f"{pom} has no <{tag}>")
    return found.group(1).strip()


@dataclasses.dataclass(frozen=True)
class LocalSchemaRegistry:
    root: Path
    port: int = DEFAULT_PORT
    persist: bool = False

    # ---- paths -------------------------------------------------------------------------
    @property
    def pom(self) -> Path:
        return self.root / "deploy" / "schema-registry-local" / "pom.xml"

    @property
    def app(self) -> Path:
        return self.root / ".local" / "schema-registry" / "app"

    @property
    def home(self) -> Path:
        base = self.root / ".local"
        return base / "schema-registry" if self.port == DEFAULT_PORT else base / f"schema-registry-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "registry.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "registry.log"

    @property
    def data(self) -> Path:
        """The H2 database of a persistent registry (``persist=True``)."""
        return self.home / "data"

    @property
    def url(self) -> str:
        """The Confluent-compatible API: what ``[schema_registry] url`` names."""
        return f"http://127.0.0.1:{self.port}{API_PATH}"

    @property
    def version(self) -> str:
        return _pom_value(self.pom, "apicurio.version")

    @property
    def runner(self) -> Path:
        return self.app / f"apicurio-registry-app-{self.version}-runner.jar"

    # ---- state -------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The registry's pid from its pid file, if that process is alive (a zombie counts as gone)."""
        return localservice.read_pid(self.pid_file)

    def port_open(self) -> bool:
        return localservice.port_open(self.port)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/subjects", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def status(self) -> dict:
        pid = self.pid()
        return {"running": pid is not None and self.port_open() and self.answers(), "pid": pid, "url": self.url,
                "log": str(self.log_file)}

    # ---- steps -------------------------------------------------------------------------
    def _require(self, tool: str, why: str) -> str:
        return localservice.require(tool, why, SchemaRegistryError)

    def _local_repository(self) -> Path:
        settings = Path.home() / ".m2" / "settings.xml"
        if settings.is_file():
            found = re.search(r"<localRepository>([^<]+)</localRepository>", settings.read_text())
            if found:
                return Path(os.path.expanduser(found.group(1).strip()))
        return Path.home() / ".m2" / "repository"

    def fetch(self) -> None:
        """Download Apicurio Registry from Maven Central and unpack it (once per pom)."""
        with localservice.installing(self.app):
            self._fetch()

    def _fetch(self) -> None:
        stamp = self.app.parent / "app.sha256"
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()
        if self.runner.is_file() and stamp.is_file() and stamp.read_text() == digest:
            return
        mvn = self._require("mvn", "Maven fetches Apicurio Registry (apt-get install maven)")
        version = self.version
        coords = f"io.apicurio:apicurio-registry-app:{version}:tar.gz:all"
        cmd = [mvn, "-q", "-B", "-f", str(self.pom), "dependency:get", f"-Dartifact={coords}", "-Dtransitive=false"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SchemaRegistryError(f"fetching Apicurio Registry failed ({' '.join(cmd)}):\n"
                                      f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        archive = (self._local_repository() / "io" / "apicurio" / "apicurio-registry-app" / version /
                   f"apicurio-registry-app-{version}-all.tar.gz")
        if not archive.is_file():
            raise SchemaRegistryError(f"Maven fetched {coords} but {archive} does not exist; if your local "
                                      "repository is elsewhere, set <localRepository> in ~/.m2/settings.xml")
        if self.app.exists():
            shutil.rmtree(self.app)
        self.app.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(self.app, filter="data")
        if not self.runner.is_file():
            raise SchemaRegistryError(f"{archive} holds no {self.runner.name}")
        stamp.write_text(digest)

    def up(self, timeout: float = 90.0) -> str:
        if self.pid() is not None and self.answers():
            return f"already up: {self.url} (pid {self.pid()})"
        if self.pid() is None and self.port_open():
            raise SchemaRegistryError(f"port {self.port} is taken by another process; stop it or pass --port")
        java = self._require("java", "Apicurio Registry needs Java 17+ (apt-get install openjdk-17-jre-headless)")
        self.fetch()
        cmd = [java, "-Xmx256m", "-XX:+UseSerialGC", *localservice.java_opts(), "-Dquarkus.http.host=127.0.0.1",
               f"-Dquarkus.http.port={self.port}", "-Dquarkus.log.level=WARN"]
        if self.persist:
            self.data.mkdir(parents=True, exist_ok=True)
            cmd.append(f"-Dapicurio.datasource.url=jdbc:h2:file:{self.data / 'registry'};DB_CLOSE_ON_EXIT=FALSE")
        cmd += ["-jar", str(self.runner)]
        pid = localservice.start(cmd, home=self.home, pid_file=self.pid_file, log_file=self.log_file,
                                 what="schema registry", address=self.url, timeout=timeout, ready=self.answers,
                                 error=SchemaRegistryError)
        return f"up: {self.url} (pid {pid})"

    def down(self, timeout: float = 30.0) -> str:
        return localservice.stop(self.pid_file, timeout)
