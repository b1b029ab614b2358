"""A real single-node Apache Kafka (KRaft) broker on loopback, for the demo and the tests.

The broker jars come from Maven Central through ``deploy/kafka-local/pom.xml``; data,
logs and the pid file live under ``.local/kafka/`` in the repository (git-ignored).
Java 17+ and Maven are the prerequisites outside Python.

``up`` fetches (once), formats storage (once) and starts the broker, then waits until it
answers a metadata request; running it again while the broker is up does nothing.
``down`` stops it with SIGTERM (SIGKILL after a deadline). Data survives ``kill -9``.

``secure=True`` (``failoverd kafka up --secure``) starts a second, separate broker (its own ports
and ``.local/kafka-secure-<port>/``) whose only client listener is SASL_SSL: a throwaway CA and a
broker certificate for 127.0.0.1 made with ``openssl`` (kept under ``tls/``), PLAIN, SCRAM-SHA-256
and SCRAM-SHA-512 for the user :data:`SECURE_USER` (SCRAM credentials written at format time with
``kafka-storage format --add-scram``), and OAUTHBEARER in the broker's unsecured-JWS mode (it
accepts any unsigned JWT with a ``sub`` and an unexpired ``exp``: :func:`unsecured_token`). Local
testing only: the password is public and the broker trusts unsigned tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
import base64
from pathlib import Path
from collections.abc import Callable
from typing import Any

from daemon import localservice
from daemon.errors import BrokerError

DEFAULT_PORT = 9092
"""The local broker's client port; ``FAILOVERD_KAFKA_PORT`` changes what ``failoverd kafka`` uses by default."""


def default_port() -> int:
    return int(os.environ.get("FAILOVERD_KAFKA_PORT") or DEFAULT_PORT)
CONTROLLER_PORT_OFFSET = 1
SECURE_PORT = 9192
"""The secure broker's SASL_SSL port (controller on port+1); ``FAILOVERD_KAFKA_SECURE_PORT`` changes it."""
SECURE_USER = "failoverd"
SECURE_PASSWORD = "failoverd-secret"
"""The secure local broker's one user (PLAIN and both SCRAMs): throwaway, loopback only."""
_INTER_BROKER = ("broker", "broker-secret")
SECURE_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


def default_secure_port() -> int:
    return int(os.environ.get("FAILOVERD_KAFKA_SECURE_PORT") or SECURE_PORT)


def unsecured_token(subject: str = SECURE_USER, lifetime_s: float = 3600.0, now: float | None = None) -> str:
    """An unsigned JWT (``alg: none``) as the secure local broker's OAUTHBEARER accepts it."""
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")

    issued = time.time() if now is None else now
    return f"{part({'alg': 'none'})}.{part({'sub': subject, 'iat': int(issued), 'exp': int(issued + lifetime_s)})}."


def new_cluster_id(random: Callable[[], uuid.UUID] = uuid.uuid4) -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64. Never one that starts with "-" (as
    Kafka's Uuid.randomUuid): kafka-storage would read it as a flag, one format in 64 failing."""
    while True:
        cluster_id = base64.urlsafe_b64encode(random().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


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
    secure: bool = False
    """Only a SASL_SSL client listener (see the module docstring)."""

    # ---- paths -------------------------------------------------------------------------
    @property
    def pom(self) -> Path:
        return self.root / "deploy" / "kafka-local" / "pom.xml"

    @property
    def home(self) -> Path:
        """Data, config, log and pid of this broker (one directory per client port)."""
        base = self.root / ".local"
        if self.secure:
            return base / f"kafka-secure-{self.port}"
        return base / "kafka" if self.port == DEFAULT_PORT else base / f"kafka-{self.port}"

    @property
    def tls(self) -> Path:
        """The secure broker's throwaway CA (``ca.pem``: give it to clients as ssl_cafile) and certificate."""
        return self.home / "tls"

    @property
    def ca_file(self) -> Path:
        return self.tls / "ca.pem"

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
        return localservice.read_pid(self.pid_file)

    def port_open(self) -> bool:
        return localservice.port_open(self.port)

    def status(self) -> dict[str, Any]:
        pid = self.pid()
        st: dict[str, Any] = {
            "running": pid is not None and self.port_open(),
            "pid": pid,
            "bootstrap": self.bootstrap,
            "data": str(self.data),
            "log": str(self.log_file),
        }
        if self.secure:
            st.update(security_protocol="SASL_SSL", ssl_cafile=str(self.ca_file), user=SECURE_USER,
                      mechanisms=list(SECURE_MECHANISMS))
        return st

    def client_kwargs(self, mechanism: str = "PLAIN") -> dict[str, Any]:
        """aiokafka kwargs that reach this broker: PLAINTEXT, or for a secure one SASL_SSL as
        :data:`SECURE_USER` (an unsecured token for OAUTHBEARER) trusting its CA."""
        if not self.secure:
            return {"bootstrap_servers": self.bootstrap}
        from aiokafka.helpers import create_ssl_context

        kwargs: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": "SASL_SSL",
                                  "ssl_context": create_ssl_context(cafile=str(self.ca_file)),
                                  "sasl_mechanism": mechanism}
        if mechanism == "OAUTHBEARER":
            from aiokafka.abc import AbstractTokenProvider

            class Unsecured(AbstractTokenProvider):  # type: ignore[misc]  # aiokafka is untyped
                async def token(self) -> str:
                    return unsecured_token()

            kwargs["sasl_oauth_token_provider"] = Unsecured()
        else:
            kwargs.update(sasl_plain_username=SECURE_USER, sasl_plain_password=SECURE_PASSWORD)
        return kwargs

    # ---- steps -------------------------------------------------------------------------
    def _require(self, tool: str, why: str) -> str:
        return localservice.require(tool, why)

    def _pom_digest(self) -> str:
        return hashlib.sha256(self.pom.read_bytes()).hexdigest()

    def fetch(self) -> None:
        """Download the broker jars from Maven Central (once per pom version)."""
        with localservice.installing(self.lib):
            self._fetch()

    def _fetch(self) -> None:
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

    def _make_certificates(self) -> None:
        """A throwaway CA and a broker certificate for 127.0.0.1 / localhost, made once with openssl."""
        broker_pem = self.tls / "broker.pem"
        if broker_pem.is_file() and self.ca_file.is_file():
            return
        openssl = self._require("openssl", "the secure local broker's throwaway CA is made with openssl "
                                           "(apt-get install openssl)")
        self.tls.mkdir(parents=True, exist_ok=True)
        (self.tls / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        steps = [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
             "-subj", "/CN=failoverd local test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.crt", "-days", "3650", "-extfile", "san.ext"],
        ]
        for step in steps:
            proc = subprocess.run([openssl, *step], cwd=self.tls, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BrokerError(f"openssl {' '.join(step[:2])} failed: {proc.stderr.strip()[-500:]}")
        # Kafka's PEM key store: the (PKCS#8, unencrypted) key, then the certificate chain.
        pem = (self.tls / "broker.key").read_text() + (self.tls / "broker.crt").read_text() + self.ca_file.read_text()
        broker_pem.write_text(pem)
        broker_pem.chmod(0o600)

    def _secure_props(self) -> dict[str, str]:
        cport = self.port + CONTROLLER_PORT_OFFSET
        lst = "listener.name.sasl_ssl."
        broker_user, broker_password = _INTER_BROKER
        plain_users = f'user_{broker_user}="{broker_password}" user_{SECURE_USER}="{SECURE_PASSWORD}"'
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            f"{lst}sasl.enabled.mechanisms": ",".join(SECURE_MECHANISMS),
            f"{lst}plain.sasl.jaas.config": "org.apache.kafka.common.security.plain.PlainLoginModule required "
                                            f'username="{broker_user}" password="{broker_password}" {plain_users};',
            f"{lst}scram-sha-256.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            f"{lst}scram-sha-512.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            # No server callback handler: Kafka's unsecured-JWS validator (unsigned tokens, sub + exp).
            f"{lst}oauthbearer.sasl.jaas.config": "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule "
                                                  f'required unsecuredLoginStringClaim_sub="{broker_user}";',
            f"{lst}ssl.keystore.type": "PEM",
            f"{lst}ssl.keystore.location": str(self.tls / "broker.pem"),
            f"{lst}ssl.truststore.type": "PEM",
            f"{lst}ssl.truststore.location": str(self.ca_file),
        }

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
        if self.secure:
            props.update(self._secure_props())
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
        return [java, f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", *localservice.java_opts(),
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
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
        cluster_id = new_cluster_id()
        scram = []
        if self.secure:  # SCRAM credentials live in the cluster metadata, written with the first record
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                scram += ["--add-scram", f"{mechanism}=[name={SECURE_USER},password={SECURE_PASSWORD}]"]
        proc = subprocess.run(self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                                         "-c", str(server), "--ignore-formatted", *scram),
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
        if self.secure:
            self._make_certificates()
        server = self._write_configs()
        self.format(server)
        pid = localservice.start(self._java("kafka.Kafka", str(server), heap="768m"), home=self.home,
                                 pid_file=self.pid_file, log_file=self.log_file, what="broker",
                                 address=self.bootstrap, timeout=timeout,
                                 ready=lambda: self.port_open() and _metadata_ok(self.client_kwargs()))
        return f"up: {self.bootstrap} (pid {pid}, data {self.data})"

    def down(self, timeout: float = 60.0) -> str:
        return localservice.stop(self.pid_file, timeout)


def _metadata_ok(bootstrap: str | dict[str, Any]) -> bool:
    """True when the broker answers a metadata request (listener up and controller ready);
    ``bootstrap``: an address, or client kwargs (a secure broker)."""
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
