"""The peers workload on Quix Streams: a StreamingDataFrame with a stateful apply (RocksDB state,
changelog topic), writing the common output to a topic.

    python bench/peers/quix_app.py --input T --output T --group G --guarantee exactly-once|at-least-once
    python bench/peers/quix_app.py ... --ml <unpacked peers-ml bundle>   # the ml workload

``--ml``: the score comes from the example release's own model on its fitted model file, called
per record (a StreamingDataFrame applies a function to one record at a time: Quix Streams has no
batch apply); run on the release environment's python (bench/peers/run.py does), with this venv's
packages appended after it (FAILOVERD_BENCH_APPEND_PATH) so the release's pins win.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
for _extra in os.environ.get("FAILOVERD_BENCH_APPEND_PATH", "").split(os.pathsep):
    if _extra and _extra not in sys.path:
        sys.path.append(_extra)

from quixstreams import Application  # noqa: E402

from workload import ml_scores, release_model, step, step_scored  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--guarantee", choices=("exactly-once", "at-least-once"), default="exactly-once")
    ap.add_argument("--commit-interval", type=float, default=0.1)
    ap.add_argument("--instance-id", default=None, help="group.instance.id (static membership)")
    ap.add_argument("--transactional-id", default=None,
                    help="stable transactional.id (default: Quix generates a random one per start, so a killed "
                         "process's open transaction blocks read_committed readers until it times out)")
    ap.add_argument("--ml", default=None, help="the ml workload: an unpacked peers-ml bundle directory")
    args = ap.parse_args()
    extra = {"group.instance.id": args.instance_id} if args.instance_id else None
    pextra = {"transactional.id": args.transactional_id} if args.transactional_id else None
    app = Application(broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
                      processing_guarantee=args.guarantee, commit_interval=args.commit_interval,
                      state_dir=args.state_dir, loglevel="WARNING", consumer_extra_config=extra,
                      producer_extra_config=pextra)
    src = app.topic(args.input, value_deserializer="json", key_deserializer="bytes")
    dst = app.topic(args.output, value_serializer="json", key_serializer="bytes")

    if args.ml:
        model = release_model(args.ml)

        def apply(value, state):
            out, new = step_scored(state.get("card"), value, ml_scores(model, [value])[0])
            state.set("card", new)
            return out
    else:
        def apply(value, state):
            out, new = step(state.get("card"), value)
            state.set("card", new)
            return out

    sdf = app.dataframe(src)
    sdf = sdf.apply(apply, stateful=True)
    sdf.to_topic(dst)
    print("ready", flush=True)
    app.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
