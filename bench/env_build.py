"""Release environment build time (docs/BENCHMARKS.md, "Release environments").

    .venv/bin/python bench/env_build.py [BUNDLE.fdb ...]

Default bundles: the fraud-ml examples built with --with-wheels into .local/bench-envs/dist
(scikit-learn 1.0.0 and ONNX Runtime 1.1.0). For each bundle, offline from its wheels:

* cold     a new envs directory with an empty uv cache (a fresh host: every wheel unpacked)
* warm     a new envs directory, uv cache kept (the state directory wiped, or another lock
           sharing the packages: installs are hard links from the cache)
* cached   the environment exists (every restart, every release sharing the lock)

Each is the median of --repeat runs of ``environments.ensure_env`` (the bundle is opened once,
outside the timing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.bundle import build, environments, open_bundle  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = ROOT / ".local" / "bench-envs"
    paths = args.bundles or [build(ROOT / "examples" / "bundles" / n, work / "dist", with_wheels=True).path
                             for n in ("fraud-ml-sklearn", "fraud-ml-onnx")]
    print(f"uv {environments.uv_bin()}; Python {environments.RUNNING}; {os.cpu_count()} CPUs")
    print(f"{'bundle':<34} {'pins':>4} {'wheels MB':>9} {'cold s':>7} {'warm s':>7} {'cached ms':>9}")
    for path in paths:
        with tempfile.TemporaryDirectory(dir=work if work.exists() else None) as tmp:
            bundle = open_bundle(path, Path(tmp) / "bundles")
            pins = len(environments.pins_of(bundle))
            mb = sum(f.stat().st_size for f in bundle.wheels_dir.iterdir()) / 1e6 if bundle.wheels_dir else 0
            cold, warm, cached = [], [], []
            cache = Path(tmp) / "uv-cache"
            os.environ["UV_CACHE_DIR"] = str(cache)
            for i in range(args.repeat):
                shutil.rmtree(cache, ignore_errors=True)
                envs = Path(tmp) / f"cold{i}"
                cold.append(timed(lambda: environments.ensure_env(bundle, envs)))
                shutil.rmtree(envs)
                envs = Path(tmp) / f"warm{i}"
                warm.append(timed(lambda: environments.ensure_env(bundle, envs)))
                cached.append(timed(lambda: environments.ensure_env(bundle, envs)))
                shutil.rmtree(envs)
            print(f"{path.name:<34} {pins:>4} {mb:>9.1f} {statistics.median(cold):>7.2f} "
                  f"{statistics.median(warm):>7.2f} {statistics.median(cached) * 1000:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
