"""Cheap waiting: what our worker spends on a poll and on a whole job, against plain Celery.

Two workers with the same Celery settings (prefork, ``-c 2``, each on a Redis of its own): ours
(default settings) and :mod:`bench.plain_celery` (no-op tasks). CPU is the ``utime + stime`` of each
worker's whole process tree, main process and pool (:mod:`bench.proc`), read before and after.

1. **A poll that finds the generation still running vs a no-op task.** ``--jobs`` jobs wait on
   generations of 600 s; once GEN has seen all of their submits, each round reads our worker's CPU
   over ``--window`` seconds and divides it by the status calls GEN saw in that window. The plain
   worker is then sent as many no-op tasks, spread evenly over a window as long, and its CPU is
   divided by their count. Both figures are gross: whatever else the worker does meanwhile
   (heartbeats, the sweeper; for us also holding the countdown messages) is in them.
2. **The whole chain with instant generations vs a plain 3-task chain.** GEN takes 0 s; after a
   warm-up (so the schedule has learned it), each round enqueues ``--chains`` jobs at once and
   times them from the first enqueue to the last result, and the plain worker runs as many chains
   of three no-op tasks. Throughput is jobs per second; CPU is per job. The two alternate which
   goes first. The same rounds send as many jobs by hand (``lipsync.run``, as a producer that does
   not import our code does: one task more), printed in a note.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from bench.common import Stack, Worker, simulator, wait_results
from bench.figures import Figure, Target, millis, per_second
from bench.gen_seen import count_in_window
from bench.plain_celery import NOOP, create_plain_app, noop_chain
from worker.settings import Settings

#: Long enough that no generation ends while polls are measured.
WAITING_L = 600.0
IDLE_WINDOW = 10.0


def _plain_stack(tmp: Path, closing: ExitStack) -> tuple[Stack, Worker, Celery]:
    sim = simulator({"gen": 0.0})  # unused by the plain worker; a Stack needs one for its settings
    closing.callback(sim.stop)
    stack = closing.enter_context(Stack("plain", tmp / "plain", sim))
    worker = stack.start_worker(concurrency=2, app_module="bench.plain_celery")
    return stack, worker, create_plain_app(Settings.from_environ(stack.env))


def _cpu_of(worker: Worker, run: Callable[[], Any]) -> tuple[float, float]:
    """(CPU seconds of the worker's tree, wall seconds) while ``run`` runs."""
    cpu, wall = worker.cpu_seconds(), time.monotonic()
    run()
    return worker.cpu_seconds() - cpu, time.monotonic() - wall


def poll_cost(tmp: Path, *, jobs: int, rounds: int, window: float) -> tuple[list[Figure], list[str]]:
    with ExitStack() as closing:
        sim = simulator({"gen": WAITING_L})
        closing.callback(sim.stop)
        ours = closing.enter_context(Stack("polls", tmp / "polls", sim))
        worker = ours.start_worker(concurrency=2)
        plain, plain_worker, plain_app = _plain_stack(tmp, closing)
        ours.wait_ready(worker)
        plain.wait_ready(plain_worker)
        idle_ours, _ = _cpu_of(worker, lambda: time.sleep(IDLE_WINDOW))
        idle_plain, _ = _cpu_of(plain_worker, lambda: time.sleep(IDLE_WINDOW))
        for _ in range(jobs):
            ours.enqueue()
        deadline = time.monotonic() + 120 + jobs
        while sim.stats()["counts"]["generate"] < jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        submitted = sim.stats()["counts"]["generate"]
        ours_per_poll, noop_per_task, polls_seen = [], [], []
        for _ in range(rounds):
            start = time.time()
            cpu, wall = _cpu_of(worker, lambda: time.sleep(window))
            polls = count_in_window(sim.stats(), "get_generation", start, start + wall)
            polls_seen.append(polls)
            ours_per_poll.append(cpu / max(polls, 1))
            tasks = max(polls, 1)
            cpu, _ = _cpu_of(plain_worker, functools.partial(_noops_over, plain_app, tasks, window))
            noop_per_task.append(cpu / tasks)
    figure = Figure(
        "worker CPU per poll (GEN still running)",
        ours_per_poll,
        millis,
        {"no-op task": noop_per_task},
        Target(2.0, on="ratio", label="<= 2x"),
    )
    notes = [
        f"polls: {jobs} jobs waiting on {WAITING_L:.0f} s generations ({submitted} submitted), "
        f"{min(polls_seen)}-{max(polls_seen)} polls per {window:.0f} s window; "
        "as many no-op tasks sent over a window as long",
        f"idle CPU (no jobs, {IDLE_WINDOW:.0f} s): ours {1000 * idle_ours / IDLE_WINDOW:.1f} ms/s, "
        f"plain Celery {1000 * idle_plain / IDLE_WINDOW:.1f} ms/s (both included in the figures above)",
    ]
    return [figure], notes


def _noops_over(plain_app: Celery, count: int, window: float) -> None:
    """Send ``count`` no-op tasks evenly over ``window`` seconds; wait until all have run."""
    results: list[AsyncResult[Any]] = []
    start = time.monotonic()
    for i in range(count):
        delay = start + i * window / count - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        results.append(plain_app.send_task(NOOP))
    wait_results(results, timeout=window + 120)


def chain_cost(tmp: Path, *, chains: int, rounds: int, warmup: int) -> tuple[list[Figure], list[str]]:
    with ExitStack() as closing:
        sim = simulator({"gen": 0.0})
        closing.callback(sim.stop)
        ours = closing.enter_context(Stack("chains", tmp / "chains", sim))
        worker = ours.start_worker(concurrency=2)
        plain, plain_worker, plain_app = _plain_stack(tmp, closing)
        ours.wait_ready(worker)
        plain.wait_ready(plain_worker)
        wait_results([ours.enqueue().result for _ in range(warmup)], timeout=300)
        wait_results([noop_chain(plain_app) for _ in range(warmup)], timeout=300)
        failed = 0
        ours_rate: list[float] = []
        ours_cpu: list[float] = []
        plain_rate: list[float] = []
        plain_cpu: list[float] = []
        by_hand_rate: list[float] = []
        by_hand_cpu: list[float] = []

        def run_ours() -> None:
            nonlocal failed
            failed += wait_results([ours.enqueue().result for _ in range(chains)], timeout=600)[1]

        def run_by_hand() -> None:
            nonlocal failed
            failed += wait_results([ours.send_by_hand().result for _ in range(chains)], timeout=600)[1]

        def run_plain() -> None:
            wait_results([noop_chain(plain_app) for _ in range(chains)], timeout=600)

        rates = {"ours": ours_rate, "plain": plain_rate, "by hand": by_hand_rate}
        cpus = {"ours": ours_cpu, "plain": plain_cpu, "by hand": by_hand_cpu}
        for r in range(rounds):
            order = [
                ("ours", worker, run_ours),
                ("plain", plain_worker, run_plain),
                ("by hand", worker, run_by_hand),
            ]
            for name, measured, body in order if r % 2 == 0 else reversed(order):
                cpu, wall = _cpu_of(measured, body)
                rates[name].append(chains / wall)
                cpus[name].append(cpu / chains)
    figures = [
        Figure(
            "chain throughput, instant generations",
            ours_rate,
            per_second,
            {"plain 3-task chain": plain_rate},
            Target(0.5, kind="at least", on="ratio", label=">= 0.5x"),
        ),
        Figure(
            "worker CPU per job, instant generations",
            ours_cpu,
            millis,
            {"plain 3-task chain": plain_cpu},
            Target(2.0, on="ratio", label="<= 2x"),
        ),
    ]
    notes = [
        f"chains: {chains} jobs at once per round after a warm-up of {warmup}; ours is enqueued with the "
        "helper (worker.enqueue.enqueue: submit -> poll -> fetch_output, with 2 resource lookups, "
        "generate, status, a 48 KB download, job records) against three no-op tasks",
        f"chains sent by hand (send_task('lipsync.run'): the worker opens the record, then replaces the "
        f"task with the chain; four tasks), same rounds: {statistics.median(by_hand_rate):.1f} jobs/s "
        f"[{min(by_hand_rate):.1f}-{max(by_hand_rate):.1f}], {statistics.median(by_hand_cpu) * 1000:.2f} ms "
        f"of worker CPU per job [{min(by_hand_cpu) * 1000:.2f}-{max(by_hand_cpu) * 1000:.2f}]",
    ]
    if failed:
        notes.append(f"chains: {failed} of our jobs did not complete")
    return figures, notes
