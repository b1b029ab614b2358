"""``failoverd demo --ml``: the failover story with real ML releases, each in its own environment.

fraud-ml 1.1.0 (the pipeline of examples/ml/train.py converted to ONNX, served with ONNX Runtime
and numpy 1.26) is active; fraud-ml 1.0.0 (the same pipeline served with scikit-learn and numpy
2.1) is standby. Both are built with ``--with-wheels`` (the first run downloads ~110 MB of wheels;
later runs use pip's cache) and ``release promote`` builds each one's environment offline from
its wheels. Part-way, a record makes the ONNX worker kill itself: the scikit-learn release takes
over, exactly once. Then ``failoverd release rollback --to fraud-ml@1.1.0`` returns the active
channel to ONNX, and the rest of the stream is scored by it. The report is the demo's, plus each
release's runtime (every output names the library that computed it).
"""

from __future__ import annotations

import asyncio
import collections
import time

import orjson

from daemon.demo import Demo, synthetic
from daemon.engine import headers as H
from daemon.errors import FailoverdError

ONNX, SKLEARN = "fraud-ml@1.1.0", "fraud-ml@1.0.0"


class MlDemo(Demo):
    async def run(self) -> int:
        from daemon.bundle import build

        self.work.mkdir(parents=True, exist_ok=True)
        self.say(f"failoverd demo --ml {self.run_id}: {self.n} records, {self.mode} standby, broker {self.bootstrap}")
        self.say("1. build the ML example bundles with their wheels (first run: ~110 MB download)")
        built = {}
        for name in ("fraud-ml-onnx", "fraud-ml-sklearn"):
            b = build(self.root / "examples" / "bundles" / name, self.work / "bundles", with_wheels=True)
            built[name] = b.path
            self.say(f"    built {b.path.name} ({b.path.stat().st_size / 1e6:.0f} MB)")
        self.say(f"2. topics, registry and releases: {ONNX} (ONNX Runtime) active, {SKLEARN} (scikit-learn) "
                 f"standby; promote builds each release's environment offline from its wheels")
        await self.create_topics()
        cfg = self.write_config()
        self.cli("release", "promote", ONNX, "--channel", "active", "--reason", "demo: ONNX Runtime",
                 "--bundle", str(built["fraud-ml-onnx"]), "--config", str(cfg))
        self.cli("release", "promote", SKLEARN, "--channel", "standby", "--reason", "demo: scikit-learn safety net",
                 "--bundle", str(built["fraud-ml-sklearn"]), "--config", str(cfg))
        first = (2 * self.n) // 3
        crash_at = self.n // 3
        records = synthetic(self.n, self.seed, crash_at)
        self.say(f"3. start the daemon; stream {first} records; record #{crash_at} makes the ONNX worker kill "
                 f"itself (SIGKILL)")
        daemon, log_path = self.start_daemon(cfg)
        t0 = time.monotonic()
        try:
            await self.wait(daemon, log_path, "both releases loaded", self.both_loaded, 120)
            await self.produce(records[:first])
            await self.wait(daemon, log_path, f"{first} inputs", lambda st: self.committed(st) >= first
                            and self.active(st) == SKLEARN)
            self.say(f"4. failed over to {SKLEARN}; roll the active channel back to {ONNX}")
            await asyncio.to_thread(self._wait_recorded)
            self.cli("release", "rollback", "--to", ONNX, "--reason", "demo: ONNX worker fixed", "--config", str(cfg))
            await self.wait(daemon, log_path, f"the rollback to {ONNX}", lambda st: self.active(st) == ONNX, 60)
            self.say(f"5. stream the other {len(records) - first} records")
            await self.produce(records[first:])
            final = await self.wait(daemon, log_path, "every input", lambda st: self.committed(st) >= len(records))
            elapsed = time.monotonic() - t0
        finally:
            self.stop_daemon(daemon)
        code = await self.report(records, final, elapsed, log_path)
        outputs = await self.read_all(self.topics["output"])
        runtimes = collections.Counter((H.as_dict(r.headers)[H.H_RELEASE_VERSION].decode(),
                                        orjson.loads(r.value)["runtime"]) for r in outputs)
        self.say("runtimes              " + ", ".join(f"{v} {rt}: {n}" for (v, rt), n in sorted(runtimes.items())))
        if {v for v, _ in runtimes} != {"1.0.0", "1.1.0"}:
            self.say("RESULT: FAILED (both releases should have produced outputs)")
            return 1
        return code

    def _wait_recorded(self, timeout: float = 30) -> None:
        """The failover's release-log entry, so the rollback has something to roll back from."""
        from daemon.registry import Registry

        registry = Registry(self.work / "registry")
        deadline = time.monotonic() + timeout
        while (active := registry.status()["active"]) is None or active.ref != SKLEARN:
            if time.monotonic() > deadline:
                raise FailoverdError("the failover was not recorded in the release log")
            time.sleep(0.2)
