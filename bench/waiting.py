"""Many jobs waiting on GEN at once on one node: memory and CPU per waiting job, and whether the
worker keeps taking new work.

One worker (``-c 4``, default settings, ``worker_eta_task_limit`` = 5000 as in ``worker/app.py``) on a
Redis of its own; GEN takes L = 900 s, so nothing finishes while we look. First a warm-up of
:data:`WARMUP` short jobs of the other model (``sync_so``, 1 s: every pool process has run each step
once, and the ``gen`` model's learned schedule is untouched); then the worker's tree RSS and CPU
(:mod:`bench.proc`) are read as the baseline. Then ``--jobs`` jobs are enqueued as fast as the
producer can, and the fill is followed every 5 s from both sides: generate requests GEN received,
messages in the worker's queues, and messages the worker holds unacknowledged (countdown polls,
reserved and running tasks: kombu's ``unacked`` hash). The fill ends when GEN has every generation
and the queues are empty (every job's poll is held by the worker), or when GEN has seen no new
generation for ``--stall`` seconds (the worker stopped taking new work), or at ``--fill-timeout``.
After ``--settle`` seconds more (the unlearned schedule's delays grow to their 30 s cap in ~100 s)
come ``--rounds`` windows of ``--window`` seconds each: CPU per waiting job per minute, the tree's RSS
growth over its idle baseline (target <= 200 MiB) and per waiting job (bytes), and polls per waiting
job per minute. Waiting = generations GEN has created whose output nobody has fetched. Last, a probe
of 10 more jobs: how long until GEN sees their generate requests (a worker that stopped taking new
work never sends them). The jobs are not cancelled one by one: the worker is killed and its Redis
thrown away (the "flush").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Stack, Worker, simulator, wait_results
from bench.figures import Figure, Target, kibibytes, mebibytes, median, millis, p95, plain, seconds
from bench.gen_seen import count_in_window
from gensim import GenSimulator
from worker.names import ALL_QUEUES, BROKER_UNACKED_KEY
from worker.ops.broker import queue_lists

PROBE = 10
#: How long the probe waits before it calls the worker one that takes no new work.
PROBE_WAIT = 600.0
WARMUP = 20
IDLE_WINDOW = 10.0
CHECK_EVERY = 5.0


@dataclass
class Fill:
    """How the fill went: samples of (seconds since the first enqueue, generates GEN saw, queued
    messages, unacknowledged messages), and how it ended."""

    jobs: int
    enqueue_seconds: float = 0.0
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)
    ended: str = ""

    @property
    def submitted(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def lines(self) -> list[str]:
        peak_unacked = max((s[3] for s in self.samples), default=0)
        lines = [
            f"fill: {self.jobs} jobs enqueued in {self.enqueue_seconds:.1f} s; {self.ended}; "
            f"the worker held at most {peak_unacked} unacknowledged messages"
        ]
        step = max(1, len(self.samples) // 8)
        shown = self.samples[::step] + ([self.samples[-1]] if len(self.samples) % step != 1 else [])
        lines += [
            f"  +{t:6.0f} s  GEN has {gen:6d} generations, {queued:6d} messages queued, {unacked:6d} held"
            for t, gen, queued, unacked in shown
        ]
        return lines


def _redis_memory(stack: Stack) -> int:
    return int(stack.redis(0).info("memory")["used_memory"])


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _queued(stack: Stack) -> int:
    broker = stack.redis(0)
    return sum(int(broker.llen(name)) for queue in ALL_QUEUES for name in queue_lists(queue))


def _unacked(stack: Stack) -> int:
    return int(stack.redis(0).hlen(BROKER_UNACKED_KEY))


def _fill(stack: Stack, sim: GenSimulator, jobs: int, *, stall: float, timeout: float) -> Fill:
    fill = Fill(jobs)
    before = int(sim.stats()["counts"]["generate"])  # the warm-up's
    started = time.monotonic()
    for _ in range(jobs):
        stack.enqueue()
    fill.enqueue_seconds = time.monotonic() - started
    progress_at, last = time.monotonic(), -1
    all_in_at: float | None = None
    while True:
        generated = int(sim.stats()["counts"]["generate"]) - before
        now = time.monotonic()
        queued, held = _queued(stack), _unacked(stack)
        fill.samples.append((now - started, generated, queued, held))
        if generated >= jobs:
            all_in_at = all_in_at if all_in_at is not None else now
            if queued == 0:
                fill.ended = f"GEN had every generation and the queues were empty after {now - started:.0f} s"
                return fill
            if now - all_in_at > stall:
                fill.ended = (
                    f"GEN had every generation after {all_in_at - started:.0f} s, but {stall:.0f} s later "
                    f"{queued} messages were still queued and the worker held {held}: it takes due polls "
                    "one by one from the queue instead of holding them (it does not keep up)"
                )
                return fill
        elif generated != last:
            progress_at, last = now, generated
        elif now - progress_at > stall:
            fill.ended = (
                f"STALLED: GEN had {generated} of {jobs} generations, none new for {stall:.0f} s, "
                f"{queued} messages queued, {held} held (the worker stopped taking new work)"
            )
            return fill
        if now - started > timeout:
            fill.ended = f"fill timeout: GEN had {generated} of {jobs} generations after {timeout:.0f} s"
            return fill
        time.sleep(CHECK_EVERY)


def poll_gaps(stats: dict[str, Any], start: float, end: float) -> list[float]:
    """Seconds between consecutive status requests of the same generation, the later one in
    ``[start, end)``: how often each waiting job is really polled."""
    times: dict[str, list[float]] = {}
    for arrival in stats["arrivals"]:
        if arrival["endpoint"] == "get_generation" and arrival["t"] < end:
            times.setdefault(arrival["path"], []).append(arrival["t"])
    gaps = []
    for seen in times.values():
        gaps += [b - a for a, b in itertools.pairwise(seen) if b >= start]
    return gaps


def _waiting(stats: dict[str, Any]) -> int:
    """Generations created whose output nobody fetched yet."""
    fetched = sum(1 for r in stats["requests"] if r["endpoint"] == "cdn" and "/cdn/outputs/" in r["path"])
    return int(stats["generations_created"]) - fetched


def _probe(stack: Stack, sim: GenSimulator, wait: float) -> str:
    ahead = _queued(stack)  # polls among them wait behind new jobs (worker.names.PRIORITIES)
    probes = [stack.enqueue() for _ in range(PROBE)]
    keys = {job.key for job in probes}
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < wait:
        seen = sum(
            1 for r in sim.stats()["requests"] if r["endpoint"] == "generate" and r["idempotency_key"] in keys
        )
        if seen == PROBE:
            took = time.monotonic() - started
            return (
                f"probe: {PROBE} new jobs reached GEN within {took:.1f} s "
                f"({ahead} messages were queued when they were sent)"
            )
        time.sleep(1.0)
    return (
        f"probe: NOT TAKING NEW WORK: {seen} of {PROBE} new jobs reached GEN in {wait:.0f} s "
        f"({ahead} messages were queued when they were sent)"
    )


def run(
    tmp: Path,
    *,
    jobs: int,
    rounds: int,
    window: float,
    latency: float,
    concurrency: int,
    stall: float,
    fill_timeout: float,
    settle: float,
    settings: Mapping[str, str] | None = None,
) -> tuple[list[Figure], list[str]]:
    settings = dict(settings or {})
    growth: list[float] = []
    per_job: list[float] = []
    main_per_job: list[float] = []
    cpu_per_min: list[float] = []
    polls_per_min: list[float] = []
    gap_p50: list[float] = []
    gap_p95: list[float] = []
    with ExitStack() as closing:
        sim = simulator({"gen": latency, "sync_so": 1.0})
        closing.callback(sim.stop)
        stack = closing.enter_context(Stack("waiting", tmp / "waiting", sim, settings))
        worker: Worker = stack.start_worker(concurrency=concurrency)
        stack.wait_ready(worker)
        warmup = [stack.enqueue("sync_so").result for _ in range(WARMUP)]
        wait_results(warmup, timeout=300)
        baseline = worker.rss_bytes()
        main_before, pool_before = worker.rss_split()
        redis_before = _redis_memory(stack)
        idle_cpu = worker.cpu_seconds()
        time.sleep(IDLE_WINDOW)
        idle_rate = (worker.cpu_seconds() - idle_cpu) / IDLE_WINDOW
        fill = _fill(stack, sim, jobs, stall=stall, timeout=fill_timeout)
        time.sleep(settle)
        waiting = 0
        split_before = worker.cpu_split()
        for _ in range(rounds):
            start, cpu = time.time(), worker.cpu_seconds()
            time.sleep(window)
            spent, end = worker.cpu_seconds() - cpu, time.time()
            main_after, pool_after = worker.rss_split()
            rss = main_after + pool_after
            stats = sim.stats()
            waiting = max(_waiting(stats), 1)
            minutes = (end - start) / 60
            growth.append(float(rss - baseline))
            per_job.append((rss - baseline) / waiting)
            main_per_job.append((main_after - main_before) / waiting)
            cpu_per_min.append(spent / waiting / minutes)
            polls_per_min.append(count_in_window(stats, "get_generation", start, end) / waiting / minutes)
            gaps = poll_gaps(stats, start, end)
            gap_p50.append(median(gaps))
            gap_p95.append(p95(gaps))
        redis_growth = _redis_memory(stack) - redis_before
        main_cpu, pool_cpu = (b - a for a, b in zip(split_before, worker.cpu_split(), strict=True))
        probe = _probe(stack, sim, wait=PROBE_WAIT)
    label = f"{waiting} waiting"
    figures = [
        Figure(
            f"worker RSS growth, {label}", growth, mebibytes, target=Target(200 * 2**20, label="<= 200 MiB")
        ),
        Figure("memory per waiting job (tree growth / jobs)", per_job, kibibytes),
        Figure("main process growth per waiting job", main_per_job, kibibytes),
        Figure("worker CPU per waiting job per minute", cpu_per_min, millis),
        Figure("polls per waiting job per minute", polls_per_min, plain),
        Figure("gap between a job's polls, median", gap_p50, seconds),
        Figure("gap between a job's polls, p95", gap_p95, seconds),
    ]
    notes = [
        f"waiting: one worker -c {concurrency}, L = {latency:g} s; RSS after the "
        f"warm-up {baseline / 2**20:.0f} MiB, idle CPU {1000 * idle_rate:.1f} ms/s; rounds are "
        f"{window:.0f} s windows of one fill, {settle:.0f} s after it",
        f"RSS by process, baseline -> last round: main process (holds the countdown messages) "
        f"{_mib(main_before)} -> {_mib(main_after)}, the {concurrency} pool processes together "
        f"{_mib(pool_before)} -> {_mib(pool_after)}",
        f"CPU by process over the rounds: main process {main_cpu:.1f} s, the pool processes {pool_cpu:.1f} s",
        f"Redis (broker, results, job records) grew {_mib(redis_growth)}: "
        f"{redis_growth / max(waiting, 1) / 1024:.1f} KiB per waiting job",
        *fill.lines(),
        probe,
    ]
    if settings:
        notes.insert(0, f"waiting: settings changed from their defaults: {dict(settings)}")
    return figures, notes
