"""Horizontal scale: several worker processes on one Redis, added and removed mid-run, and one
GEN rate limit for all of them."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
import redis

from gensim import Fault
from tests.conftest import Cluster
from tests.harness import Run

pytestmark = pytest.mark.integration

FAST_POLLS = {"LIPSYNC_POLL_INITIAL_DELAY": "0.1", "LIPSYNC_POLL_MAX_DELAY": "0.3"}


def finished_by(run: Run) -> Counter[str]:
    """Which worker ran each job's last task (result_extended stores it)."""
    return Counter(str(result.worker).split("@")[0] for result in run.results.values())


def test_three_workers_share_a_few_hundred_jobs(make_cluster: Any, simulator: Any) -> None:
    simulator.durations = {"gen": 0.3, "sync_so": 0.5}
    cluster: Cluster = make_cluster(**FAST_POLLS)
    for _ in range(3):
        cluster.start_worker(concurrency=2)
    run = Run(cluster, simulator)
    try:
        started = time.monotonic()
        run.submit(120, model="gen")
        run.submit(80, model="sync_so")
        outcomes = run.outcomes(timeout=240)
        elapsed = time.monotonic() - started
        assert all(o["status"] == "completed" for o in outcomes.values())
        run.check_invariants(outcomes, callbacks=False)
        shares = finished_by(run)
        assert set(shares) == {"w1", "w2", "w3"}, shares
        assert min(shares.values()) >= 20, shares
        print(
            f"\n200 jobs on 3 workers x 2 processes: {elapsed:.1f} s "
            f"({200 / elapsed:.1f} jobs/s), shares {dict(shares)}"
        )
    finally:
        run.close()


#: How late GEN answers each generate in the added-worker test: a submit holds its process this long.
SUBMIT_DELAY = 0.3


def most_at_once(ends: list[float], duration: float) -> int:
    """The most of these requests GEN was busy with at one moment, each taken as the ``duration``
    before its answer (it was read a little earlier still, so this never overcounts)."""
    events = sorted([(t - duration, 1) for t in ends] + [(t, -1) for t in ends])
    busy = best = 0
    for _, step in events:
        busy += step
        best = max(best, busy)
    return best


def steps_done_by(cluster: Cluster, task: str, *, since: float) -> Counter[str]:
    """Which worker ran each ``task`` that finished after ``since`` (from the results' worker)."""
    backend = redis.Redis.from_url(cluster.env["LIPSYNC_RESULT_BACKEND"])
    done: Counter[str] = Counter()
    for key in backend.scan_iter("celery-task-meta-*"):
        raw = backend.get(key)
        meta = json.loads(raw) if raw else {}
        if meta.get("name") != task or meta.get("status") != "SUCCESS":
            continue
        if datetime.fromisoformat(meta["date_done"]).timestamp() > since:
            done[str(meta["worker"]).split("@")[0]] += 1
    backend.close()
    return done


def test_a_worker_added_mid_run_takes_work(make_cluster: Any, simulator: Any) -> None:
    """Capacity grows with the fleet, counted rather than timed: each submit holds a process while
    GEN answers late, so the submits GEN has in flight at once are the processes at work (1 with
    w1 alone, 3 once w2's two join), and w2 takes its share of the submits still waiting (more
    than w1, as it has more processes)."""
    simulator.durations = {"gen": 0.5}
    simulator.add_fault(Fault(endpoint="generate", delay=SUBMIT_DELAY, times=None))
    cluster: Cluster = make_cluster(**FAST_POLLS)
    cluster.start_worker(concurrency=1)
    run = Run(cluster, simulator)
    try:
        run.submit(60)
        time.sleep(1.0)
        cluster.start_worker(concurrency=2)
        joined = time.time()
        outcomes = run.outcomes(timeout=180)
        assert all(o["status"] == "completed" for o in outcomes.values())
        run.check_invariants(outcomes, callbacks=False)
        ends = [r["t"] for r in simulator.stats()["requests"] if r["endpoint"] == "generate"]
        before, after = [t for t in ends if t <= joined], [t for t in ends if t > joined]
        assert len(after) >= 20, f"too little left for w2 to take: {len(before)} submits before it joined"
        assert most_at_once(before, SUBMIT_DELAY) <= 1, "one process cannot submit twice at once"
        assert most_at_once(after, SUBMIT_DELAY) == 3, "w2's processes did not add to w1's"
        shares = steps_done_by(cluster, "lipsync.submit", since=joined)
        print(
            f"\nsubmits before w2 joined: {len(before)}, after: {len(after)}, after by worker {dict(shares)}"
        )
        # Its fair share is 2 of the 3 processes: more than w1, which has 1.
        assert shares["w2"] > shares["w1"], f"w2 ran fewer of the waiting submits than w1: {shares}"
        assert finished_by(run)["w2"] > 0
    finally:
        run.close()


def test_a_worker_stopped_with_sigterm_hands_back_its_work(make_cluster: Any, simulator: Any) -> None:
    simulator.durations = {"gen": 1.5}
    cluster: Cluster = make_cluster(**FAST_POLLS)
    for _ in range(3):
        cluster.start_worker(concurrency=2)
    run = Run(cluster, simulator)
    try:
        run.submit(60)
        time.sleep(1.0)
        assert cluster.workers[0].stop(signal.SIGTERM, timeout=60) == 0
        outcomes = run.outcomes(timeout=180)
        assert all(o["status"] == "completed" for o in outcomes.values())
        run.check_invariants(outcomes, callbacks=False)
    finally:
        run.close()


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_fleet_wide_rate_limit_holds_across_workers(make_cluster: Any, simulator: Any) -> None:
    simulator.durations = {"gen": 2.0}
    limit, window = 6, 1.0
    cluster: Cluster = make_cluster(
        LIPSYNC_GEN_STATUS_RATE=str(limit),
        LIPSYNC_GEN_GENERATE_RATE="4",
        LIPSYNC_GEN_RATE_WINDOW=str(window),
        LIPSYNC_JOB_TIMEOUT="120",
        **FAST_POLLS,
    )
    for _ in range(3):
        cluster.start_worker(concurrency=2)
    run = Run(cluster, simulator)
    try:
        run.submit(24)
        outcomes = run.outcomes(timeout=180)
        assert all(o["status"] == "completed" for o in outcomes.values())
        requests = simulator.stats()["requests"]
        polls = [r["t"] for r in requests if r["endpoint"] == "get_generation"]
        generates = [r["t"] for r in requests if r["endpoint"] == "generate"]
        # GEN sees the calls a few ms after the limiter admitted them; allow for that jitter.
        seen = window - 0.05
        assert max_in_window(polls, seen) <= limit, max_in_window(polls, seen)
        assert max_in_window(generates, seen) <= 4
        # ... and the limit is what paced them (without it the fast polls would far exceed it).
        assert len(polls) >= 24
        span = max(polls) - min(polls)
        print(f"\n{len(polls)} status calls over {span:.1f} s: {len(polls) / span:.2f}/s (limit {limit}/s)")
    finally:
        run.close()
