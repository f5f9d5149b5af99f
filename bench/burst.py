"""A burst: ``--jobs`` jobs started at once on one worker node with 4 processes, GEN taking L = 30 s.

One worker (``-c 4``, default settings) on a Redis of its own. A warm-up of ``--warmup`` jobs runs
first, so the fleet has seen L (what a running fleet would have). Each round then enqueues all the
jobs as fast as the producer can and waits for every result; the reference round starts as many
generations at once with GEN's SDK loop (:mod:`bench.polling_client`, polling every 2 s, 16
threads), and a plain Celery worker with the same settings and concurrency (:mod:`bench.plain_celery`)
takes as many chains of three no-op tasks at once, the second with a countdown of L: what Celery
itself adds to that many 3-task chains on one node, the floor under ours. Rounds alternate, ours
first. Per job, from what GEN saw: added latency = (GEN sees the output requested) - (the job was
enqueued) - L; per plain chain: (its last task done) - (sent) - L. The figure is the p95 over the
round's jobs; the notes split ours into the wait before GEN (enqueue -> GEN created the generation)
and the wait after it (GEN done -> output requested).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC
from pathlib import Path

from celery import Celery

from bench.common import Stack, simulator, wait_results
from bench.figures import Figure, Spread, Target, median, p95, seconds
from bench.gen_seen import GenerationSeen, snapshot
from bench.plain_celery import create_plain_app, waiting_chain
from bench.polling_client import FixedIntervalPoller
from tests.conftest import AGENT_ID, API_KEY
from worker.settings import Settings


def _added(seen: dict[str, GenerationSeen], jobs: Sequence[tuple[str, float]]) -> tuple[list[float], int]:
    added, missing = [], 0
    for key, started_at in jobs:
        generation = seen.get(key)
        if generation is None or generation.output_fetched_at is None:
            missing += 1
            continue
        added.append(generation.output_fetched_at - started_at - generation.duration)
    return added, missing


def _plain_round(plain: Celery, *, jobs: int, latency: float, timeout: float) -> list[float]:
    """Added latency of ``jobs`` plain waiting chains sent at once: last task done - sent - L."""
    sent = [(time.time(), waiting_chain(plain, latency)) for _ in range(jobs)]
    wait_results([result for _, result in sent], timeout=timeout)
    added = []
    for sent_at, result in sent:
        done = result.date_done
        if done is None:
            continue
        if done.tzinfo is None:  # Celery stores UTC
            done = done.replace(tzinfo=UTC)
        added.append(done.timestamp() - sent_at - latency)
    return added


def run(
    tmp: Path, *, jobs: int, rounds: int, latency: float, concurrency: int, warmup: int
) -> tuple[list[Figure], list[str]]:
    ours_p95, ours_median, ref_p95, ref_median = [], [], [], []
    plain_p95: list[float] = []
    plain_median: list[float] = []
    before_gen: list[float] = []
    after_gen: list[float] = []
    enqueue_seconds: list[float] = []
    #: Per round, the mean of ours' status calls per job (the poll plan's work in the burst).
    status_calls: list[float] = []
    missing = 0
    with ExitStack() as closing:
        sim = simulator({"gen": latency})
        closing.callback(sim.stop)
        stack = closing.enter_context(Stack("burst", tmp / "burst", sim))
        worker = stack.start_worker(concurrency=concurrency)
        plain_sim = simulator({"gen": latency})  # unused by the plain worker; a Stack needs one
        closing.callback(plain_sim.stop)
        plain_stack = closing.enter_context(Stack("plain", tmp / "burst-plain", plain_sim))
        plain_worker = plain_stack.start_worker(concurrency=concurrency, app_module="bench.plain_celery")
        plain = create_plain_app(Settings.from_environ(plain_stack.env))
        stack.wait_ready(worker)
        plain_stack.wait_ready(plain_worker)
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
            status_calls.append(sum(g.status_calls for g in seen.values()) / max(len(seen), 1))
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

            added = _plain_round(plain, jobs=jobs, latency=latency, timeout=timeout)
            missing += jobs - len(added)
            plain_p95.append(p95(added))
            plain_median.append(median(added))
    figures = [
        Figure(
            f"p95 added latency, {jobs} jobs at once, L = {latency:g} s",
            ours_p95,
            seconds,
            {"2 s polling": ref_p95, "plain Celery chain": plain_p95},
            Target(5.0, label="<= 5 s"),
        ),
        Figure(
            f"median added latency, {jobs} jobs at once",
            ours_median,
            seconds,
            {"2 s polling": ref_median, "plain Celery chain": plain_median},
        ),
    ]
    notes = [
        f"burst: one worker -c {concurrency}, default settings, after a warm-up of {warmup} jobs; "
        f"enqueuing {jobs} jobs took {Spread.of(enqueue_seconds).text(seconds)}",
        f"ours, all rounds: enqueue -> GEN has the generation p95 {p95(before_gen):.2f} s, max "
        f"{max(before_gen, default=float('nan')):.2f} s; GEN done -> output requested p95 "
        f"{p95(after_gen):.2f} s, max {max(after_gen, default=float('nan')):.2f} s",
        "ours, by round (the first plans from the warm-up alone): status calls per job "
        + ", ".join(f"{calls:.2f}" for calls in status_calls)
        + "; p95 added latency "
        + ", ".join(f"{value:.2f} s" for value in ours_p95),
    ]
    notes.append(
        f"plain Celery chain: {jobs} chains of three no-op tasks sent at once to a plain worker -c "
        f"{concurrency} with our Celery settings, the second task with a countdown of {latency:g} s"
    )
    if missing:
        notes.append(f"burst: {missing} job(s) or chain(s) never finished (failed or timed out)")
    return figures, notes
