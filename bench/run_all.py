"""Every throughput table of docs/BENCHMARKS.md, one script after the other (issue 17: `make bench`).

    .venv/bin/python bench/run_all.py --quick     # every table, small windows, 1 round: ~15 min, for review
    .venv/bin/python bench/run_all.py             # the measurement: 30 s windows, 3 rounds (~2.5-3 h)
    .venv/bin/python bench/run_all.py --only peers-ml,throughput --no-doc

Each script measures the same way (bench/common.py: interleaved rounds, steady windows of
--seconds, min/median/max, outputs checked record by record) and prints its table; without
--no-doc each rewrites its own section of docs/BENCHMARKS.md (a --quick run never does: a quick run
is not a measurement). The broker must be up (`failoverd kafka up`; FAILOVERD_KAFKA_PORT moves it),
and for `formats` the local schema registry (`failoverd schema-registry up`). bench/failover.py
(failover times) is not a throughput table and runs on its own (`make bench-failover`).

Scripts, in order (name: command):
  throughput   bench/throughput.py                       failoverd vs a plain aiokafka loop (issue 4)
  formats      bench/formats.py                          Avro vs JSON, output codecs (issue 15)
  ml           bench/ml_throughput.py                    the ML example releases vs a plain loop (issue 13)
  peers        bench/peers/run.py                        vs Quix Streams and faust: throughput, recovery, scaling (issue 7)
  peers-ml     bench/peers/run.py --workload ml          target 1 of issue 17: real models vs Quix Streams and faust
  regression   bench/regression.py --ref REF             only with --regression-ref: this engine vs an older commit
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

SCRIPTS = {
    "throughput": ["bench/throughput.py"],
    "formats": ["bench/formats.py"],
    "ml": ["bench/ml_throughput.py"],
    "peers": ["bench/peers/run.py"],
    "peers-ml": ["bench/peers/run.py", "--workload", "ml"],
    "regression": ["bench/regression.py"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every script with --quick (and --no-doc): for review")
    ap.add_argument("--seconds", type=float, default=0.0, help="passed on: steady window per run (default 30)")
    ap.add_argument("--rounds", type=int, default=0, help="passed on: interleaved rounds (default 3)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--regression-ref", default="", help="also run bench/regression.py against this commit")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ap.add_argument("--keep-going", action="store_true", help="run the next script when one fails")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or [n for n in SCRIPTS if n != "regression" or args.regression_ref]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {','.join(SCRIPTS)}")
    if "regression" in names and not args.regression_ref:
        ap.error("regression needs --regression-ref <commit>")
    common = []
    if args.quick:
        common += ["--quick", "--no-doc"]
    elif args.no_doc:
        common.append("--no-doc")
    if args.seconds:
        common += ["--seconds", f"{args.seconds:g}"]
    if args.rounds:
        common += ["--rounds", str(args.rounds)]
    failed, took = [], {}
    for name in names:
        argv = [PY, *SCRIPTS[name], *common]
        if name == "regression":
            argv += ["--ref", args.regression_ref]
        print(f"\n==== {name}: {' '.join(os.path.relpath(a, ROOT) if a == PY else a for a in argv)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(argv, cwd=ROOT)
        took[name] = (time.monotonic() - t0) / 60
        print(f"==== {name}: exit {rc} after {took[name]:.1f} min", flush=True)
        if rc != 0:
            failed.append(name)
            if not args.keep_going:
                break
    print("\n" + "; ".join(f"{n} {m:.1f} min" for n, m in took.items()))
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
