"""Run the real daemon (``python -m daemon run``) as a subprocess against the local broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests import kafkatools
from tests.ports import free_port  # noqa: F401 - tests import it from here

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, *, bootstrap: str, names: dict, state_dir: Path, registry: Path | None = None,
                 group: str, app: str, extra: dict | None = None, instance_id: str | None = None,
                 metrics_port: int = 0) -> Path:
    sections: dict[str, dict] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "session_timeout_ms": 6000,
                  "heartbeat_interval_ms": 1000},
        "app": {"name": app},
        "inputs": {"topics": [names["input"]]},
        "output": {"topic": names["output"]},
        "dead_letter": {"topic": names["dlq"], "max_value_bytes": 4096},
        "checkpoint": {"interval_ms": 100, "interval_records": 500, "topic": names["checkpoint"]},
        "state": {"directory": str(state_dir), "changelog_topic": names["changelog"]},
        "registry": {"path": str(registry or state_dir / "registry"), "control_topic": names.get("control", "unused-control")},
        "worker": {"predict_timeout_ms": 2000, "start_timeout_ms": 60000, "max_batch_records": 500},
        "metrics": {"port": metrics_port},
        "admin": {"bind": f"127.0.0.1:{free_port()}"},
    }
    if instance_id:
        sections["kafka"]["group_instance_id"] = instance_id
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{k} = {v}")
            elif isinstance(v, list):
                lines.append(f"{k} = [{', '.join(repr(str(x)).replace(chr(39), chr(34)) for x in v)}]")
            else:
                lines.append(f'{k} = "{v}"')
        lines.append("")
    path.write_text("\n".join(lines))
    return path


async def make_topics(bootstrap: str, prefix: str, partitions: int = 2, control: bool = True) -> dict:
    names = {role: kafkatools.unique(f"{prefix}-{role}") for role in ("input", "output", "dlq", "changelog", "checkpoint")}
    if control:
        names["control"] = kafkatools.unique(f"{prefix}-control")
    compact = {"cleanup.policy": "compact"}
    await kafkatools.create_topics(bootstrap, {
        names["input"]: partitions, names["output"]: partitions, names["dlq"]: 1,
        names["changelog"]: partitions, names["checkpoint"]: 1, **({names["control"]: 1} if control else {}),
    }, configs={names["changelog"]: compact, names["checkpoint"]: compact, **({names["control"]: compact} if control else {})})
    return names


class DaemonProc:
    def __init__(self, config: Path, *args: str, log: Path, env: dict | None = None) -> None:
        self.extra_env = env or {}
        self.config = config
        self.args = args
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    @property
    def admin_url(self) -> str:
        import tomllib

        return "http://" + tomllib.loads(self.config.read_text())["admin"]["bind"]

    def get(self, path: str) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def committed(self) -> int:
        """Input records this daemon has checkpointed (sum of committed offsets it reports)."""
        import json

        code, body = self.get("/status")
        if code != 200:
            return 0
        return sum(p.get("committed") or 0 for p in json.loads(body).get("partitions", []))

    def start(self) -> "DaemonProc":
        self._log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        level = os.environ.get("FAILOVERD_TEST_LOG_LEVEL", "info")  # debug: aiokafka's requests too
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "--log-level", level, "run",
                                      "--config", str(self.config), *self.args],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> bool:
        """True while running; raises with the log tail when the daemon has exited."""
        if not self.alive():
            raise AssertionError(f"daemon exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """kill -9 the daemon, every process of its session, and its model workers' groups (each
        worker runs in a session of its own)."""
        workers = self.worker_pids_in_session()
        for pgid in (self.proc.pid, *workers):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"daemon did not stop within {timeout}s after SIGTERM; log:\n{self.log()[-3000:]}")

    @property
    def state_dir(self) -> str:
        import tomllib

        return str(tomllib.loads(self.config.read_text())["state"]["directory"])

    def worker_pids_in_session(self) -> list[int]:
        """Model worker processes of this daemon still running (the daemon may be gone): found by
        their command line, which names the daemon's state directory (each worker has a session
        of its own, so the daemon's session does not hold them)."""
        out = subprocess.run(["pgrep", "-f", f"daemon.engine.worker_main .*{self.state_dir}"],
                             capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "-P", str(self.proc.pid), "daemon.engine.worker_main"],
                             capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]
