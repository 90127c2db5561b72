"""RQ jobs and the worker entry point: plan a rollout (`worker.plan`), drive its backfill (`worker.driver`,
batch by batch: `worker.backfill`), re-enqueue and sweep (`worker.maintenance`); `worker.context` is the
process's state and `worker.main` runs the RQ worker."""

import os

# Idle OpenMP threads must sleep, not spin: a spinning torch pool starves the worker's own load/decode/commit
# thread and the database on a small machine (measured: 0.28 -> 0.68 of raw encoder throughput on 2 cores).
# Must be set before torch is first imported; an operator's explicit value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
