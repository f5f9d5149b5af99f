"""A burst: ``--jobs`` jobs started at once on one worker node with 4 processes, GEN taking L = 30 s.

One worker (``-c 4``, default settings) on a Redis of its own. A warm-up of ``--warmup`` jobs runs
first, so the fleet has seen L (what a running fleet would have). Each round then enqueues all the
jobs as fast as the producer can and waits for every result; the reference round starts as many
generations at once with GEN's SDK loop (:mod:`bench.polling_client`, polling every 2 s, 16
threads). Rounds alternate, ours first. Per job, from what GEN saw: added latency = (GEN sees the
output requested) - (the job was enqueued) - L. The figure is the p95 over the round's jobs; the
notes split ours into the wait before GEN (enqueue -> GEN created the generation) and the wait after
it (GEN done -> output requested).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from bench.common import Stack, simulator, wait_results
from bench.figures import Figure, Spread, Target, median, p95, seconds
from bench.gen_seen import GenerationSeen, snapshot
from bench.polling_client import FixedIntervalPoller
from tests.conftest import AGENT_ID, API_KEY


def _added(seen: dict[str, GenerationSeen], jobs: Sequence[tuple[str, float]]) -> tuple[list[float], int]:
    added, missing = [], 0
    for key, started_at in jobs:
        generation = seen.get(key)
        if generation is None or generation.output_fetched_at is None:
            missing += 1
            continue
        added.append(generation.output_fetched_at - started_at - generation.duration)
    return added, missing


def run(
    tmp: Path, *, jobs: int, rounds: int, latency: float, concurrency: int, warmup: int
) -> tuple[list[Figure], list[str]]:
    ours_p95, ours_median, ref_p95, ref_median = [], [], [], []
    before_gen: list[float] = []
    after_gen: list[float] = []
    enqueue_seconds: list[float] = []
    missing = 0
    with ExitStack() as closing:
        sim = simulator({"gen": latency})
        closing.callback(sim.stop)
        stack = closing.enter_context(Stack("burst", tmp / "burst", sim))
        worker = stack.start_worker(concurrency=concurrency)
        stack.wait_ready(worker)
        poller = closing.enter_context(FixedIntervalPoller(sim.base_url, API_KEY, AGENT_ID, threads=16))
        wait_results([stack.enqueue().result for _ in range(warmup)], timeout=latency * 4 + 300)
        timeout = latency * 3 + 600 + jobs
        for _ in range(rounds):
            started = time.monotonic()
            batch = [stack.enqueue() for _ in range(jobs)]
            enqueue_seconds.append(time.monotonic() - started)
            wait_results([job.result for job in batch], timeout=timeout)
            seen = snapshot(sim, [job.key for job in batch])
            added, lost = _added(seen, [(job.key, job.started_at) for job in batch])
            missing += lost
            ours_p95.append(p95(added))
            ours_median.append(median(added))
            for job in batch:
                generation = seen.get(job.key)
                if generation is not None and generation.output_fetched_at is not None:
                    before_gen.append(generation.created_at - job.started_at)
                    after_gen.append(
                        generation.output_fetched_at - generation.created_at - generation.duration
                    )

            references = [
                poller.start((101, 3000 + i % 100), (5001 + i % 90, 6001 + i % 90)) for i in range(jobs)
            ]
            deadline = time.monotonic() + timeout
            while not all(job.done for job in references) and time.monotonic() < deadline:
                time.sleep(0.2)
            seen = snapshot(sim, [job.key for job in references])
            added, lost = _added(seen, [(job.key, job.started_at) for job in references])
            missing += lost
            ref_p95.append(p95(added))
            ref_median.append(median(added))
    figures = [
        Figure(
            f"p95 added latency, {jobs} jobs at once, L = {latency:g} s",
            ours_p95,
            seconds,
            {"2 s polling": ref_p95},
            Target(5.0, label="<= 5 s"),
        ),
        Figure(
            f"median added latency, {jobs} jobs at once", ours_median, seconds, {"2 s polling": ref_median}
        ),
    ]
    notes = [
        f"burst: one worker -c {concurrency}, default settings, after a warm-up of {warmup} jobs; "
        f"enqueuing {jobs} jobs took {Spread.of(enqueue_seconds).text(seconds)}",
        f"ours, all rounds: enqueue -> GEN has the generation p95 {p95(before_gen):.2f} s, max "
        f"{max(before_gen, default=float('nan')):.2f} s; GEN done -> output requested p95 "
        f"{p95(after_gen):.2f} s, max {max(after_gen, default=float('nan')):.2f} s",
    ]
    if missing:
        notes.append(f"burst: {missing} job(s) never had their output requested (failed or timed out)")
    return figures, notes
