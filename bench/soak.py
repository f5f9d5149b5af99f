"""Soak: a few hundred jobs through three worker processes while workers are SIGKILLed, Redis restarts
and GEN misbehaves. Prints jobs lost, duplicate generations, duplicate callback ids and recovery
times. Everything runs on loopback; nothing needs to be installed by hand.

    .venv/bin/python -m bench.soak --jobs 300 --workers 3 --kills 4 --seed 7
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gensim import Fault, GenSimulator
from tests.conftest import API_KEY, WEBHOOK_SECRET, start_celery, worker_environment
from tests.webhook_receiver import WebhookReceiver
from worker.app import create_app
from worker.callbacks.outbox import Outbox
from worker.dev.embedded_redis import EmbeddedRedis
from worker.enqueue import enqueue
from worker.jobs.records import JobStore
from worker.settings import Settings

FAULTS = [
    lambda: Fault(endpoint="get_generation", status=503, times=3),
    lambda: Fault(endpoint="get_generation", status=429, retry_after=0.5, times=2),
    lambda: Fault(endpoint="generate", status=500, times=2),
    lambda: Fault(endpoint="get_generation", malformed=True, times=2),
    lambda: Fault(endpoint="generate", accept_then_drop=True, times=1),
    lambda: Fault(endpoint="cdn", reset_after_bytes=5000, times=1),
    lambda: Fault(endpoint="get_generation", drop=True, times=2),
]


@dataclass
class SoakReport:
    jobs: int
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    #: job id -> the state its record was left in (or "no record").
    lost_jobs: dict[str, str] = field(default_factory=dict)
    duplicate_generations: int = 0
    duplicate_callback_ids: int = 0
    missing_callbacks: int = 0
    #: Outcome webhooks received more than once with the same id (at least once, after a crash).
    repeated_deliveries: int = 0
    #: job id -> what its record says about the missing callback.
    missing_callback_jobs: dict[str, str] = field(default_factory=dict)
    redriven_jobs: int = 0
    kills: list[float] = field(default_factory=list)
    recovery_after_kill: list[float] = field(default_factory=list)
    recovery_after_redis_restart: float | None = None
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def print(self) -> None:
        lat = sorted(self.latencies)

        def p(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        print(
            f"jobs                     {self.jobs} in {self.elapsed:.1f} s "
            f"({self.jobs / self.elapsed:.1f} jobs/s)"
        )
        print(f"completed                {self.completed}")
        print(f"failed (by error_code)   {self.failed or 0}")
        print(f"jobs lost                {self.lost}   (must be 0)")
        if self.lost_jobs:
            print(f"  lost, by state         {dict(list(self.lost_jobs.items())[:10])}")
        print(f"duplicate generations    {self.duplicate_generations}   (must be 0)")
        print(f"duplicate callback ids   {self.duplicate_callback_ids}   (must be 0)")
        print(f"missing callbacks        {self.missing_callbacks}   (must be 0)")
        if self.missing_callback_jobs:
            print(f"  missing, by record     {dict(list(self.missing_callback_jobs.items())[:10])}")
        print(f"webhooks repeated        {self.repeated_deliveries}   (same id; receivers dedupe)")
        print(f"jobs re-driven           {self.redriven_jobs}")
        print(f"worker SIGKILLs          {len(self.kills)}")
        if self.recovery_after_kill:
            r = self.recovery_after_kill
            print(
                f"recovery (re-driven jobs) median {statistics.median(r):.1f} s, max {max(r):.1f} s"
                " (latency above the median of untouched jobs)"
            )
        if self.recovery_after_redis_restart is not None:
            print(
                f"recovery after Redis restart  {self.recovery_after_redis_restart:.1f} s"
                " (restart -> next job completes)"
            )
        print(f"job latency              p50 {p(0.5):.2f} s, p95 {p(0.95):.2f} s, p99 {p(0.99):.2f} s")


class Supervisor:
    """Starts worker processes and restarts any that die, as systemd or Kubernetes would."""

    def __init__(self, env: dict[str, str], logs: Path, count: int) -> None:
        self.env, self.logs, self.count = env, logs, count
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()
        self.restarts = 0

    def start(self, name: str) -> None:
        args = ["-A", "worker", "worker", "-c", "2"]
        self.procs[name] = start_celery(name, args, self.env, self.logs / f"{name}.log")

    def run(self) -> None:
        for i in range(self.count):
            self.start(f"w{i + 1}")
        while not self.stopping.wait(0.5):
            for name, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    self.restarts += 1
                    self.start(name)

    def kill_one(self, rng: random.Random) -> str:
        name = rng.choice(sorted(self.procs))
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        return name

    def stop(self) -> None:
        self.stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_soak(*, jobs: int, workers: int, kills: int, redis_restart: bool, seed: int, tmp: Path) -> SoakReport:
    rng = random.Random(seed)
    report = SoakReport(jobs=jobs)
    with (
        EmbeddedRedis(persistent=True) as redis_server,
        GenSimulator(api_key=API_KEY, agent_ids=("42",), durations={"gen": 1.0, "sync_so": 2.0}) as sim,
    ):
        receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
        env = worker_environment(
            redis_server.url,
            sim.base_url,
            tmp / "outputs",
            LIPSYNC_GEN_READ_TIMEOUT="3",
            LIPSYNC_GEN_CONNECT_TIMEOUT="1",
            LIPSYNC_DOWNLOAD_TIMEOUT="10",
            LIPSYNC_JOB_TIMEOUT="300",
            LIPSYNC_MAX_REDRIVES="10",
        )
        app = create_app(Settings.from_environ(env))
        # This producer reads outcomes from the job records, not the result backend: skip Celery's
        # per-task result subscription, which gives up (noisily) across a Redis restart.
        # (Item assignment: what Celery's attribute assignment does, but its stubs type this read-only.)
        app.conf["result_backend"] = "disabled://"
        store = JobStore(__import__("redis").Redis.from_url(env["LIPSYNC_REDIS_URL"]), ttl=3600)
        supervisor = Supervisor(env, tmp, workers)
        threading.Thread(target=supervisor.run, daemon=True).start()
        time.sleep(4)  # workers booting
        started = time.monotonic()
        results: dict[str, Any] = {}
        spread = jobs / 10  # enqueue at ~10 jobs/s, so the chaos lands while jobs are in every stage
        kill_times = sorted(rng.uniform(2, spread) for _ in range(kills))
        restart_time = rng.uniform(spread * 0.3, spread * 0.7) if redis_restart else None
        chaos = threading.Thread(
            target=_chaos,
            args=(supervisor, redis_server, store, rng, started, kill_times, restart_time, report),
            daemon=True,
        )
        chaos.start()
        next_fault = time.monotonic() + 1
        for i in range(jobs):
            cell = 3000 + i % 100
            request: dict[str, Any] = {
                "job_id": f"soak-{seed}-{i}",
                "sheet_id": 101,
                "cell_id": cell,
                "layer_id": cell + 1000,
                "video_resource_id": 5001 + i % 90,
                "audio_resource_id": 6001 + i % 90,
                "model": rng.choice(["gen", "sync_so"]),
                "callback": {"webhook_url": receiver.url},
            }
            while True:
                try:
                    results[request["job_id"]] = enqueue(request, app=app)
                    break
                except Exception:  # broker down during a Redis restart: retry, as a producer must
                    time.sleep(0.2)
            now = time.monotonic()
            if now >= next_fault:
                sim.add_fault(rng.choice(FAULTS)())
                next_fault = now + rng.uniform(0.5, 2)
            time.sleep(max(0.0, started + (i + 1) / 10 - time.monotonic()))
        chaos.join()
        deadline = time.monotonic() + 240
        outcomes: dict[str, dict[str, Any]] = {}
        for job_id in results:
            outcomes[job_id] = _wait_outcome(store, job_id, deadline)
        report.elapsed = time.monotonic() - started
        # A job's webhook is delivered after its outcome is recorded: stop the workers only once
        # every callback arrived (or the deadline passed), or the last ones would be cut off.
        _wait_callbacks(receiver, results, deadline)
        supervisor.stop()
        _score(report, outcomes, store, sim, receiver)
        receiver.close()
    return report


def _wait_outcome(store: JobStore, job_id: str, deadline: float) -> dict[str, Any]:
    """The job's outcome, waiting until ``deadline`` (always looking at least once)."""
    while True:
        record = store.get(job_id)
        if record is not None and record.outcome is not None:
            return record.outcome
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.1)


def _wait_callbacks(receiver: WebhookReceiver, job_ids: Iterable[str], deadline: float) -> None:
    wanted = {f"{job_id}.outcome" for job_id in job_ids}
    while not wanted <= set(receiver.ids()) and time.monotonic() < deadline:
        time.sleep(0.1)


def _chaos(
    supervisor: Supervisor,
    redis_server: EmbeddedRedis,
    store: JobStore,
    rng: random.Random,
    started: float,
    kill_times: list[float],
    restart_time: float | None,
    report: SoakReport,
) -> None:
    events = [(t, "kill") for t in kill_times]
    if restart_time is not None:
        events.append((restart_time, "redis"))
    for at, kind in sorted(events):
        time.sleep(max(0.0, started + at - time.monotonic()))
        if kind == "kill":
            supervisor.kill_one(rng)
            report.kills.append(time.monotonic())
        else:
            redis_server.restart()
            report.recovery_after_redis_restart = _until_next_completion(store, time.time())


def _until_next_completion(store: JobStore, since: float) -> float | None:
    """Seconds from ``since`` until some job finishes after it: the fleet is moving again."""
    while time.time() - since < 240:
        try:
            for key in store.redis.scan_iter("lipsync:job:*", count=1000):
                record = store.get(key.decode().removeprefix("lipsync:job:"))
                finished = (record.outcome or {}).get("timings", {}).get("finished_at", 0) if record else 0
                if finished > since:
                    return time.time() - since
        except Exception:
            pass
        time.sleep(0.2)
    return None


def _score(
    report: SoakReport,
    outcomes: dict[str, dict[str, Any]],
    store: JobStore,
    sim: GenSimulator,
    receiver: WebhookReceiver,
) -> None:
    for job_id, outcome in outcomes.items():
        if not outcome:
            report.lost += 1
            record = store.get(job_id)
            report.lost_jobs[job_id] = record.state if record else "no record"
            continue
        if outcome.get("status") == "completed":
            report.completed += 1
            report.latencies.append(outcome["timings"]["total_seconds"])
        else:
            code = outcome.get("error_code", "?")
            report.failed[code] = report.failed.get(code, 0) + 1
        record = store.get(job_id)
        if record and record.redrives:
            report.redriven_jobs += 1
    stats = sim.stats()
    # Time a failure cost a job: its latency above the median latency of jobs nothing happened to.
    untouched: list[float] = []
    touched: list[float] = []
    for job_id, outcome in outcomes.items():
        if outcome.get("status") != "completed":
            continue
        record = store.get(job_id)
        (touched if record and record.redrives else untouched).append(outcome["timings"]["total_seconds"])
    if untouched and touched:
        baseline = statistics.median(untouched)
        report.recovery_after_kill = [max(0.0, t - baseline) for t in touched]
    report.duplicate_generations = sum(len(g) - 1 for g in stats["generations_by_key"].values() if len(g) > 1)
    time.sleep(2)  # let late duplicates (a re-send after a crash) arrive, to be counted
    ids: dict[str, set[str]] = defaultdict(set)
    outcome_deliveries = 0
    for received in receiver.received:
        ids[received.payload.get("job_id", "?")].add(received.msg_id)
        outcome_deliveries += received.msg_id.endswith(".outcome")
    report.duplicate_callback_ids = sum(
        1 for job_id in outcomes if len({i for i in ids[job_id] if i.endswith(".outcome")}) > 1
    )
    for job_id in outcomes:
        if f"{job_id}.outcome" not in ids[job_id]:
            record = store.get(job_id)
            pending = store.redis.exists(Outbox.key(f"{job_id}.outcome"))
            report.missing_callback_jobs[job_id] = (
                f"{record.state}, callbacks dispatched: {record.callbacks_dispatched}, "
                f"in the outbox: {bool(pending)}"
                if record
                else "no record"
            )
    report.missing_callbacks = len(report.missing_callback_jobs)
    report.repeated_deliveries = outcome_deliveries - (len(outcomes) - report.missing_callbacks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--no-redis-restart", action="store_true")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lipsync-soak-") as tmp:
        report = run_soak(
            jobs=args.jobs,
            workers=args.workers,
            kills=args.kills,
            redis_restart=not args.no_redis_restart,
            seed=args.seed,
            tmp=Path(tmp),
        )
    report.print()
    ok = (
        report.lost
        == report.duplicate_generations
        == report.duplicate_callback_ids
        == report.missing_callbacks
        == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
