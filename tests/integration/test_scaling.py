"""Horizontal scale: several worker processes on one Redis, added and removed mid-run, and one
GEN rate limit for all of them."""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import pytest

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


def test_a_worker_added_mid_run_takes_work(make_cluster: Any, simulator: Any) -> None:
    simulator.durations = {"gen": 0.5}
    cluster: Cluster = make_cluster(**FAST_POLLS)
    cluster.start_worker(concurrency=1)
    run = Run(cluster, simulator)
    try:
        run.submit(60)
        time.sleep(1.0)
        cluster.start_worker(concurrency=2)
        outcomes = run.outcomes(timeout=180)
        assert all(o["status"] == "completed" for o in outcomes.values())
        run.check_invariants(outcomes, callbacks=False)
        assert finished_by(run)["w2"] > 0
        assert "lipsync.poll" in cluster.workers[1].log()
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
