"""`python -m daemon` with engine constants changed for an experiment (bench/partitions.py only).

    FAILOVERD_BENCH_MAX_HELD=16 python bench/tuned_daemon.py run --config ... --active-bundle ...

FAILOVERD_BENCH_MAX_HELD: ``daemon.engine.pipeline.Pipeline.MAX_HELD`` (batches predicted while a
checkpoint commits, held until it ends; then the loop waits).
FAILOVERD_BENCH_STORE_THREADS=1: ``Assignment.open`` opens the partition's SQLite store on a thread
(``asyncio.to_thread``) instead of on the event loop, so the stores of many partitions assigned at
once open side by side, and alongside the producers' InitProducerId round trips (the change
proposed in bench/partitions_notes.md). Nothing else differs from the daemon.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.engine import pipeline  # noqa: E402

if os.environ.get("FAILOVERD_BENCH_MAX_HELD"):
    pipeline.Pipeline.MAX_HELD = int(os.environ["FAILOVERD_BENCH_MAX_HELD"])

if os.environ.get("FAILOVERD_BENCH_STORE_THREADS"):
    import asyncio

    from daemon.engine import assignment as A

    async def open_threaded(self, tp):  # type: ignore[no-untyped-def]
        """daemon/engine/assignment.py Assignment.open, with the store opened on a thread."""
        restoring = self.restorer.restoring
        restoring[tp] = -1
        A.m.init_partition_labels(tp.topic, tp.partition)
        producer = await self.clients.transactional_producer(tp, self.batch_bytes) if self.eos else None
        try:
            store = await asyncio.to_thread(A.StateStore, A.store_path(self.state_dir, tp))
        except BaseException:
            if producer is not None:
                await producer.stop()
            raise
        try:
            await self.restorer.restore(tp, store)
            committed = await self.consumer.committed(tp)
            if committed is None:
                committed = (await self.consumer.beginning_offsets([tp]))[tp]
            self.consumer.seek(tp, committed)
        except BaseException:
            if producer is not None:
                await producer.stop()
            store.close()
            raise
        finally:
            restoring.pop(tp, None)
        return A.Partition(tp=tp, store=store, producer=producer, committed=committed)

    A.Assignment.open = open_threaded

from daemon.cli import main  # noqa: E402

raise SystemExit(main())
