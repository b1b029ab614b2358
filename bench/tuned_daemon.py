"""`python -m daemon` with engine constants changed for an experiment (bench/partitions.py only).

    FAILOVERD_BENCH_MAX_HELD=16 python bench/tuned_daemon.py run --config ... --active-bundle ...

FAILOVERD_BENCH_MAX_HELD: ``daemon.engine.pipeline.Pipeline.MAX_HELD`` (batches predicted while a
checkpoint commits, held until it ends; then the loop waits).
(The stores-on-threads experiment of bench/partitions_notes.md is the daemon's own behaviour since
a6b050c.)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engine import pipeline  # noqa: E402

if os.environ.get("FAILOVERD_BENCH_MAX_HELD"):
    pipeline.Pipeline.MAX_HELD = int(os.environ["FAILOVERD_BENCH_MAX_HELD"])

from daemon.cli import main  # noqa: E402

raise SystemExit(main())
