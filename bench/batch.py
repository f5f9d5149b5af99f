"""A batch against single jobs: ``--items`` items with instant generations as one batch
(``enqueue_batch``, ``max_parallel`` as configured) and as as many single jobs (``enqueue``), on one
worker (``-c 4``, default settings) of a Redis of its own.

Rounds alternate, batch first. Per round: wall time from the first enqueue to the batch's result
recorded (the batch) or the last result stored (the single jobs), and the CPU the worker's process
tree used meanwhile (bench.proc). The batch pays for its bookkeeping (an admission and an item-end
record per item, one batch result) and for starting at most ``max_parallel`` items at a time; single
jobs all enter the queue at once.
"""

from __future__ import annotations

import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from bench.common import Stack, request_for, simulator, wait_results
from bench.figures import Figure, Spread, seconds
from worker.enqueue import batch_status, enqueue_batch

#: "Instant" generations: the simulator's shortest honest duration.
INSTANT = 0.01


def run(
    tmp: Path, *, items: int, rounds: int, concurrency: int, max_parallel: int | None
) -> tuple[list[Figure], list[str]]:
    batch_wall, batch_cpu, single_wall, single_cpu = [], [], [], []
    counts: list[dict[str, int]] = []
    with ExitStack() as closing:
        sim = simulator({"gen": INSTANT, "sync_so": INSTANT})
        closing.callback(sim.stop)
        stack = closing.enter_context(Stack("batch", tmp / "batch", sim))
        worker = stack.start_worker(concurrency=concurrency)
        stack.wait_ready(worker)
        wait_results([stack.enqueue().result for _ in range(10)], timeout=120)  # warm the pool up
        timeout = 600.0 + items
        for _ in range(rounds):
            batch_id = f"bench-{uuid.uuid4().hex[:12]}"
            requests = []
            for index in range(items):
                request = request_for(index)
                del request["job_id"]  # items take <batch_id>.<index>
                requests.append(request)
            batch: dict[str, object] = {"batch_id": batch_id, "items": requests}
            if max_parallel is not None:
                batch["max_parallel"] = max_parallel
            cpu, started = worker.cpu_seconds(), time.monotonic()
            enqueue_batch(batch, app=stack.app)
            deadline = started + timeout
            record = batch_status(batch_id, app=stack.app)
            while (record is None or record.outcome is None) and time.monotonic() < deadline:
                time.sleep(0.05)
                record = batch_status(batch_id, app=stack.app)
            batch_wall.append(time.monotonic() - started)
            batch_cpu.append(worker.cpu_seconds() - cpu)
            counts.append(dict(record.counts) if record is not None else {})

            cpu, started = worker.cpu_seconds(), time.monotonic()
            jobs = [stack.enqueue() for _ in range(items)]
            wait_results([job.result for job in jobs], timeout=timeout)
            single_wall.append(time.monotonic() - started)
            single_cpu.append(worker.cpu_seconds() - cpu)
    parallel = "LIPSYNC_BATCH_MAX_PARALLEL (20)" if max_parallel is None else str(max_parallel)
    figures = [
        Figure(
            f"wall time, {items} items as one batch",
            batch_wall,
            seconds,
            {f"{items} single jobs": single_wall},
        ),
        Figure(
            f"worker CPU, {items} items as one batch",
            batch_cpu,
            seconds,
            {f"{items} single jobs": single_cpu},
        ),
    ]
    per_item = Spread.of([cpu / items * 1000 for cpu in batch_cpu]).text("{:.1f} ms".format)
    per_job = Spread.of([cpu / items * 1000 for cpu in single_cpu]).text("{:.1f} ms".format)
    notes = [
        f"batch: one worker -c {concurrency}, default settings, generations {INSTANT:g} s on GEN, "
        f"max_parallel {parallel}",
        f"worker CPU per item: batch {per_item}, single job {per_job}",
        f"batch item outcomes per round: {counts}",
    ]
    return figures, notes
