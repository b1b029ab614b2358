"""A real single-node Apache Kafka (KRaft) broker on loopback, for the demo and the tests.

The broker jars come from Maven Central through ``deploy/kafka-local/pom.xml``; data,
logs and the pid file live under ``.local/kafka/`` in the repository (git-ignored).
Java 17+ and Maven are the prerequisites outside Python.

``up`` fetches (once), formats storage (once) and starts the broker, then waits until it
answers a metadata request; running it again while the broker is up does nothing.
``down`` stops it with SIGTERM (SIGKILL after a deadline). Data survives ``kill -9``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import base64
from pathlib import Path
from typing import Any

from daemon.errors import BrokerError

DEFAULT_PORT = 9092
"""The local broker's client port; ``FAILOVERD_KAFKA_PORT`` changes what ``failoverd kafka`` uses by default."""


def default_port() -> int:
    return int(os.environ.get("FAILOVERD_KAFKA_PORT") or DEFAULT_PORT)
CONTROLLER_PORT_OFFSET = 1


def find_repo_root(start: Path | None = None) -> Path:
    """The directory holding ``deploy/kafka-local/pom.xml``: the repository root."""
    env = os.environ.get("FAILOVERD_HOME")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in [here, *here.parents, Path(__file__).resolve().parent.parent]:
        if (candidate / "deploy" / "kafka-local" / "pom.xml").is_file():
            return candidate
    raise BrokerError(
        "cannot find deploy/kafka-local/pom.xml: run `failoverd kafka` from inside the failoverd "
        "repository, or set FAILOVERD_HOME to the repository root"
    )


@dataclasses.dataclass(frozen=True)
class LocalBroker:
    root: Path
    port: int = DEFAULT_PORT

    # ---- paths -------------------------------------------------------------------------
    @property
    def pom(self) -> Path:
        return self.root / "deploy" / "kafka-local" / "pom.xml"

    @property
    def home(self) -> Path:
        """Data, config, log and pid of this broker (one directory per client port)."""
        base = self.root / ".local"
        return base / "kafka" if self.port == DEFAULT_PORT else base / f"kafka-{self.port}"

    @property
    def lib(self) -> Path:
        return self.root / ".local" / "kafka" / "lib"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- state -------------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        # a zombie child of ours counts as gone
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            if state == "Z":
                return None
        except (FileNotFoundError, IndexError):
            pass
        return pid

    def port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def status(self) -> dict[str, Any]:
        pid = self.pid()
        return {
            "running": pid is not None and self.port_open(),
            "pid": pid,
            "bootstrap": self.bootstrap,
            "data": str(self.data),
            "log": str(self.log_file),
        }

    # ---- steps -------------------------------------------------------------------------
    def _require(self, tool: str, why: str) -> str:
        path = shutil.which(tool)
        if not path:
            raise BrokerError(f"`{tool}` not found on PATH: {why}")
        return path

    def _pom_digest(self) -> str:
        return hashlib.sha256(self.pom.read_bytes()).hexdigest()

    def fetch(self) -> None:
        """Download the broker jars from Maven Central (once per pom version)."""
        stamp = self.lib.parent / "lib.sha256"
        if self.lib.is_dir() and stamp.is_file() and stamp.read_text() == self._pom_digest():
            return
        mvn = self._require("mvn", "Maven fetches the Kafka broker jars (apt-get install maven)")
        self._require("java", "the local Kafka broker needs Java 17+ (apt-get install openjdk-17-jre-headless)")
        if self.lib.exists():
            shutil.rmtree(self.lib)
        self.lib.parent.mkdir(parents=True, exist_ok=True)
        cmd = [mvn, "-q", "-B", "-f", str(self.pom), "dependency:copy-dependencies",
               f"-DoutputDirectory={self.lib}", "-DincludeScope=runtime"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BrokerError(f"fetching Kafka jars failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        stamp.write_text(self._pom_digest())

    def _write_configs(self) -> Path:
        cport = self.port + CONTROLLER_PORT_OFFSET
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            # one node: every internal topic with replication 1 and min ISR 1
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "8",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            "default.replication.factor": "1",
            # tests and the demo start consumers often: no initial rebalance delay
            "group.initial.rebalance.delay.ms": "0",
            # abort transactions of dead producers quickly
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "2000",
            "log.retention.check.interval.ms": "60000",
        }
        server = self.home / "server.properties"
        server.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        log4j = self.home / "log4j2.properties"
        log4j.write_text(
            "status = warn\n"
            "appender.out.type = Console\nappender.out.name = OUT\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = WARN\nrootLogger.appenderRef.out.ref = OUT\n"
            "logger.server.name = kafka.server.KafkaRaftServer\nlogger.server.level = INFO\n"
            "logger.broker.name = kafka.server.BrokerServer\nlogger.broker.level = INFO\n"
        )
        return server

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        java = self._require("java", "the local Kafka broker needs Java 17+ (apt-get install openjdk-17-jre-headless)")
        return [java, f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                "-cp", str(self.lib / "*"), main, *args]

    def _check_java_version(self) -> None:
        java = self._require("java", "the local Kafka broker needs Java 17+ (apt-get install openjdk-17-jre-headless)")
        out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
        try:
            quoted = out.split('"')[1]
            major = int(quoted.split(".")[0]) if not quoted.startswith("1.") else 8
        except (IndexError, ValueError):
            return
        if major < 17:
            raise BrokerError(f"Kafka 4 needs Java 17 or newer; `java -version` says {quoted!r}")

    def format(self, server: Path) -> None:
        if (self.data / "meta.properties").is_file():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        proc = subprocess.run(self._java("kafka.tools.StorageTool", "format", "-t", cluster_id,
                                         "-c", str(server), "--ignore-formatted"),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BrokerError(f"formatting KRaft storage failed:\n{proc.stdout}{proc.stderr}")

    def up(self, timeout: float = 90.0) -> str:
        if self.pid() is not None and self.port_open():
            return f"already up: {self.bootstrap} (pid {self.pid()})"
        if self.pid() is None and self.port_open():
            raise BrokerError(f"port {self.port} is taken by another process; stop it or pass --port")
        self._check_java_version()
        self.fetch()
        self.home.mkdir(parents=True, exist_ok=True)
        server = self._write_configs()
        self.format(server)
        log = open(self.log_file, "ab")
        proc = subprocess.Popen(self._java("kafka.Kafka", str(server), heap="768m"), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.home)
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:]
                raise BrokerError(f"broker exited with code {proc.returncode}; last log lines:\n{tail}")
            if self.port_open() and _metadata_ok(self.bootstrap):
                return f"up: {self.bootstrap} (pid {proc.pid}, data {self.data})"
            time.sleep(0.25)
        raise BrokerError(f"broker did not answer on {self.bootstrap} within {timeout:.0f}s; see {self.log_file}")

    def down(self, timeout: float = 60.0) -> str:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return "already down"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.1)
            self.pid_file.unlink(missing_ok=True)
            return f"killed pid {pid} after {timeout:.0f}s without a clean shutdown"
        self.pid_file.unlink(missing_ok=True)
        return f"down (pid {pid} stopped)"


def _metadata_ok(bootstrap: str) -> bool:
    """True when the broker answers a metadata request (listener up and controller ready)."""
    import asyncio

    from daemon import clients  # aiokafka loads only when a broker is probed

    async def probe() -> bool:
        admin = clients.admin(bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            try:
                await admin.close()
            except Exception:
                pass

    return asyncio.run(probe())
