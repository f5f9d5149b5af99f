"""Soak: jobs through several worker processes while workers are SIGKILLed and Redis restarts.

Two modes. Both count the invariants by the party that would pay for a violation: generations per
job as GEN created them (each job has a target of its own), callbacks per job as the receiver took
them (distinct webhook ids, deliveries).

* Default: a few hundred jobs through three *supervised* worker processes (a killed one is
  restarted, as systemd or Kubernetes would) with test timings (recovery grace 2 s, sweep every
  0.5 s, 0.2-0.5 s polls), random SIGKILLs, a Redis restart and GEN faults::

      .venv/bin/python -m bench.soak --jobs 300 --workers 3 --kills 4 --seed 7

* ``--defaults``: the DEFAULT timings (recovery grace 60 s, queued recovery 1 h, sweep every 5 s,
  heartbeat 5 s, dead after 20 s, polls 5 s growing to 30 s), workers never restarted, and a fault
  schedule aimed at what recovery by liveness must handle: SIGKILL a worker holding fetches it has
  not started, one holding countdown polls, one mid-submit, one mid-download, one mid-webhook, two
  at once, and Redis restarts. Before each kill a new worker joins (a fleet has spare nodes; the
  dead are never brought back). Jobs arrive at ``--rate`` per second for the whole schedule::

      .venv/bin/python -m bench.soak --defaults --workers 3 --rate 1.5 --seed 7

  It prints jobs, lost, duplicate generations, duplicate callbacks, the recovery time of every job
  a killed worker held (kill -> the first request GEN or the receiver saw for it again) and its
  lateness against when it would have completed, and exits non-zero if an invariant fails: a job
  lost, a duplicate, an outcome webhook delivered with anything but the recorded outcome, more
  repeated webhook deliveries than webhook POSTs in flight at a kill, a re-drive later than 45 s, a
  job more than 60 s late, a worker that exited by itself, or a scheduled fault that could not be
  staged.

Everything runs on loopback; nothing needs to be installed by hand.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from gensim import Fault, GenSimulator
from gensim.stats import target_key
from tests.conftest import API_KEY, WEBHOOK_SECRET, WorkerProcess, start_celery, worker_environment
from tests.harness import (
    TARGETS,
    Callbacks,
    Holdings,
    Recovered,
    assert_default_timings,
    default_timings,
    holdings,
    node_of,
    own_target,
    recoveries,
    target_of,
)
from tests.webhook_receiver import WebhookReceiver
from worker.app import create_app
from worker.callbacks.outbox import Outbox
from worker.dev.embedded_redis import EmbeddedRedis
from worker.enqueue import enqueue
from worker.jobs.records import JobStore
from worker.names import WEBHOOK_KEY_PREFIX
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

#: --defaults: a dead node's jobs are re-driven within this long of the kill...
REDRIVE_WITHIN = 45.0
#: ... and finish within this long of when they would have.
LATE_BY_AT_MOST = 60.0


@dataclass
class Invariants:
    """The invariants both modes count, from GEN's and the receiver's side."""

    jobs: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    #: job id -> the state its record was left in (or "no record").
    lost_jobs: dict[str, str] = field(default_factory=dict)
    #: Generations GEN created beyond one per job that reached it (per target).
    duplicate_generations: int = 0
    #: Jobs whose outcome reached the receiver under more than one webhook id.
    duplicate_callback_ids: int = 0
    missing_callbacks: int = 0
    #: job id -> what its record says about the missing callback.
    missing_callback_jobs: dict[str, str] = field(default_factory=dict)
    #: Outcome webhooks the receiver took more than once (same id; at least once after a crash).
    repeated_deliveries: int = 0
    #: Jobs whose outcome webhook reached the receiver carrying anything but the recorded outcome
    #: (two different outcomes under one id included).
    conflicting_outcomes: int = 0
    redriven_jobs: int = 0
    latencies: list[float] = field(default_factory=list)

    def ok(self) -> bool:
        return (
            self.lost
            == self.duplicate_generations
            == self.duplicate_callback_ids
            == self.missing_callbacks
            == self.conflicting_outcomes
            == 0
        )

    def print_counts(self) -> None:
        print(f"completed                {self.completed}")
        print(f"failed (by error_code)   {self.failed or 0}")
        print(f"jobs lost                {self.lost}   (must be 0)")
        if self.lost_jobs:
            print(f"  lost, by state         {dict(list(self.lost_jobs.items())[:10])}")
        print(f"duplicate generations    {self.duplicate_generations}   (must be 0; GEN's count per target)")
        print(f"duplicate callback ids   {self.duplicate_callback_ids}   (must be 0; the receiver's count)")
        print(f"missing callbacks        {self.missing_callbacks}   (must be 0)")
        print(f"conflicting outcomes     {self.conflicting_outcomes}   (must be 0; delivered != recorded)")
        if self.missing_callback_jobs:
            print(f"  missing, by record     {dict(list(self.missing_callback_jobs.items())[:10])}")
        print(
            f"webhooks repeated        {self.repeated_deliveries}   (taken twice, same id; receivers dedupe)"
        )
        print(f"jobs re-driven           {self.redriven_jobs}")


@dataclass
class SoakReport(Invariants):
    kills: list[float] = field(default_factory=list)
    recovery_after_kill: list[float] = field(default_factory=list)
    recovery_after_redis_restart: float | None = None
    elapsed: float = 0.0

    def print(self) -> None:
        lat = sorted(self.latencies)

        def p(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        print(
            f"jobs                     {self.jobs} in {self.elapsed:.1f} s "
            f"({self.jobs / self.elapsed:.1f} jobs/s)"
        )
        self.print_counts()
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


def soak_request(
    seed: int, i: int, model: str, receiver: WebhookReceiver, *, prefix: str = "soak"
) -> dict[str, Any]:
    """Job ``i`` of a soak, on a target of its own (the 400 targets are reused past job 400)."""
    return {
        "job_id": f"{prefix}-{seed}-{i}",
        **own_target(i),
        "video_resource_id": 5001 + i % 90,
        "audio_resource_id": 6001 + i % 90,
        "model": model,
        "callback": {"webhook_url": receiver.url},
    }


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
        app = _producer_app(env)
        store = JobStore(redis.Redis.from_url(env["LIPSYNC_REDIS_URL"]), ttl=3600)
        supervisor = Supervisor(env, tmp, workers)
        threading.Thread(target=supervisor.run, daemon=True).start()
        time.sleep(4)  # workers booting
        started = time.monotonic()
        requests: dict[str, dict[str, Any]] = {}
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
            request = soak_request(seed, i, rng.choice(["gen", "sync_so"]), receiver)
            requests[request["job_id"]] = request
            _enqueue(app, request)
            now = time.monotonic()
            if now >= next_fault:
                sim.add_fault(rng.choice(FAULTS)())
                next_fault = now + rng.uniform(0.5, 2)
            time.sleep(max(0.0, started + (i + 1) / 10 - time.monotonic()))
        chaos.join()
        deadline = time.monotonic() + 240
        outcomes = {job_id: _wait_outcome(store, job_id, deadline) for job_id in requests}
        report.elapsed = time.monotonic() - started
        # A job's webhook is delivered after its outcome is recorded: stop the workers only once
        # every callback arrived (or the deadline passed), or the last ones would be cut off.
        _wait_callbacks(receiver, requests, deadline)
        supervisor.stop()
        _score(report, outcomes, requests, store, sim, receiver)
        _untouched_baseline(report, outcomes, store)
        receiver.close()
    return report


def _producer_app(env: dict[str, str]) -> Any:
    app = create_app(Settings.from_environ(env))
    # This producer reads outcomes from the job records, not the result backend: skip Celery's
    # per-task result subscription, which gives up (noisily) across a Redis restart.
    # (Item assignment: what Celery's attribute assignment does, but its stubs type this read-only.)
    app.conf["result_backend"] = "disabled://"
    return app


def _enqueue(app: Any, request: dict[str, Any]) -> None:
    while True:
        try:
            enqueue(request, app=app)
            return
        except Exception:  # broker down during a Redis restart: retry, as a producer must
            time.sleep(0.2)


def _wait_outcome(store: JobStore, job_id: str, deadline: float) -> dict[str, Any]:
    """The job's outcome, waiting until ``deadline`` (always looking at least once)."""
    while True:
        try:
            record = store.get(job_id)
        except redis.RedisError:
            record = None
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
    report: Invariants,
    outcomes: dict[str, dict[str, Any]],
    requests: Mapping[str, Mapping[str, Any]],
    store: JobStore,
    sim: GenSimulator,
    receiver: WebhookReceiver,
) -> None:
    report.jobs = len(outcomes)
    for job_id, outcome in outcomes.items():
        record = store.get(job_id)
        if not outcome:
            report.lost += 1
            report.lost_jobs[job_id] = record.state if record else "no record"
            continue
        if outcome.get("status") == "completed":
            report.completed += 1
            report.latencies.append(outcome["timings"]["total_seconds"])
        else:
            code = outcome.get("error_code", "?")
            report.failed[code] = report.failed.get(code, 0) + 1
        if record and record.redrives:
            report.redriven_jobs += 1
    report.duplicate_generations = duplicate_generations(sim.stats(), requests, outcomes)
    time.sleep(2)  # let late duplicates (a re-send after a crash) arrive, to be counted
    seen = Callbacks.of(receiver)
    for job_id in outcomes:
        ids = seen.ids.get(job_id, set())
        if len(ids) > 1:
            report.duplicate_callback_ids += 1
        if f"{job_id}.outcome" not in ids:
            record = store.get(job_id)
            pending = store.redis.exists(Outbox.key(f"{job_id}.outcome"))
            report.missing_callback_jobs[job_id] = (
                f"{record.state}, callbacks dispatched: {record.callbacks_dispatched}, "
                f"in the outbox: {bool(pending)}"
                if record
                else "no record"
            )
        report.repeated_deliveries += max(0, seen.deliveries.get(job_id, 0) - 1)
    report.missing_callbacks = len(report.missing_callback_jobs)
    report.conflicting_outcomes = len(seen.conflicting({j: o for j, o in outcomes.items() if o}))


def duplicate_generations(
    stats: Mapping[str, Any],
    requests: Mapping[str, Mapping[str, Any]],
    outcomes: Mapping[str, Mapping[str, Any]],
) -> int:
    """Generations GEN created beyond one per job that reached it, counted per target (jobs share a
    target only past 400 jobs; then a target's jobs share its count)."""
    reached: dict[str, int] = defaultdict(int)
    for job_id, request in requests.items():
        reached[target_of(request)] += 1 if outcomes.get(job_id, {}).get("generation_id") else 0
    by_target: Mapping[str, list[int]] = stats["generations_by_target"]
    targets = set(reached) | set(by_target)
    return sum(max(0, len(by_target.get(t, [])) - reached.get(t, 0)) for t in targets)


def _untouched_baseline(report: SoakReport, outcomes: dict[str, dict[str, Any]], store: JobStore) -> None:
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


# ----------------------------------------------------------------------------------------------
# --defaults: default timings, workers never restarted, a fault schedule
# ----------------------------------------------------------------------------------------------

#: Simulated GEN durations in --defaults (the worker's own timings are all defaults).
DEFAULTS_GEN_DURATIONS = {"gen": 8.0, "sync_so": 16.0}


@dataclass
class Event:
    """One entry of the fault schedule, as it happened."""

    at: float
    label: str
    victims: list[str] = field(default_factory=list)
    held: list[Holdings] = field(default_factory=list)
    note: str = ""
    #: Why it could not be staged (None: it happened).
    skipped: str | None = None


@dataclass
class DefaultsReport(Invariants):
    elapsed: float = 0.0
    events: list[Event] = field(default_factory=list)
    #: One per (kill, job or webhook the killed node held).
    recovered: list[Recovered] = field(default_factory=list)
    #: One per (Redis restart, job or webhook some worker held at that moment).
    held_at_restarts: list[Recovered] = field(default_factory=list)
    #: Every completed job: finished - when GEN had its output ready.
    after_gen_ready: dict[str, float] = field(default_factory=dict)
    #: Jobs the sweeper re-drove (their records' count).
    redriven: dict[str, int] = field(default_factory=dict)
    #: job id -> the simulator's faults that hit its requests (endpoint: count).
    gen_faults: dict[str, dict[str, int]] = field(default_factory=dict)
    started_at: float = 0.0
    workers_started: int = 0
    #: Workers that exited without being killed: name -> the end of their log.
    self_exits: dict[str, str] = field(default_factory=dict)
    #: Webhook POSTs a killed worker had in flight (the receiver saw them arrive before the kill):
    #: the only deliveries that may be repeated.
    posts_in_flight_at_kills: int = 0
    #: The workers' timings and poll schedule, as printed.
    timings: str = field(default_factory=lambda: _timings_line())

    def late_by_job(self, recovered: list[Recovered] | None = None) -> dict[str, float | None]:
        """Each affected job's lateness, against its latest kill (a job can be hit twice)."""
        latest: dict[str, Recovered] = {}
        for item in self.recovered if recovered is None else recovered:
            if item.job_id not in latest or item.killed_at > latest[item.job_id].killed_at:
                latest[item.job_id] = item
        return {job_id: item.late_by for job_id, item in latest.items()}

    def failures(self) -> list[str]:
        problems = []
        if not self.ok():
            problems.append(
                "an invariant failed (lost, duplicate generations or callbacks, missing callbacks, "
                "conflicting outcomes)"
            )
        if self.repeated_deliveries > self.posts_in_flight_at_kills:
            problems.append(
                f"{self.repeated_deliveries} webhook(s) taken again, more than the "
                f"{self.posts_in_flight_at_kills} POST(s) in flight at a kill"
            )
        slow = [r for r in self.recovered if r.redriven_after is None or r.redriven_after > REDRIVE_WITHIN]
        if slow:
            problems.append(f"{len(slow)} re-drive(s) later than {REDRIVE_WITHIN:.0f} s: {slow[:5]}")
        late = {j: v for j, v in self.late_by_job().items() if v is None or v > LATE_BY_AT_MOST}
        if late:
            problems.append(
                f"{len(late)} job(s) more than {LATE_BY_AT_MOST:.0f} s late: {dict(list(late.items())[:5])}"
            )
        if self.self_exits:
            problems.append(f"worker(s) exited by themselves: {sorted(self.self_exits)}")
        skipped = [e for e in self.events if e.skipped]
        if skipped:
            problems.append(f"fault(s) not staged: {[(e.label, e.skipped) for e in skipped]}")
        return problems

    def print(self) -> None:
        print(f"mode                     --defaults: {self.timings}; workers never restarted")
        print(f"jobs                     {self.jobs} in {self.elapsed:.1f} s")
        self.print_counts()
        print(
            f"  allowed repeats        {self.posts_in_flight_at_kills}   "
            "(webhook POSTs in flight at a kill; more fails the run)"
        )
        print("fault schedule:")
        for event in self.events:
            if event.skipped:
                print(f"  +{event.at:6.1f} s  {event.label}: NOT STAGED ({event.skipped})")
                continue
            if event.victims:
                states = Counter(j.state for h in event.held for j in h.jobs.values())
                webhooks = sum(len(h.webhooks) for h in event.held)
                victims = ", ".join(event.victims)
                print(
                    f"  +{event.at:6.1f} s  SIGKILL {victims} ({event.label}: {event.note}); "
                    f"it held {sum(states.values())} job(s) {dict(states)}, {webhooks} webhook(s)"
                )
            else:
                print(f"  +{event.at:6.1f} s  {event.label}{event.note}")
        redrive = [r.redriven_after for r in self.recovered if r.redriven_after is not None]
        late = [v for v in self.late_by_job().values() if v is not None]
        print(
            f"affected (held by a killed worker): {len(self.late_by_job())} job(s) "
            f"({sum(1 for r in self.recovered if r.kind == 'webhook')} as a webhook)"
        )
        print(f"recovery per affected job  {_p50_max(redrive)}   (kill -> GEN/receiver sees it again)")
        if redrive:
            worst_redrive = max(
                (r for r in self.recovered if r.redriven_after is not None),
                key=lambda r: r.redriven_after or 0,
            )
            slowest = worst_redrive
            print(
                f"  the slowest: {slowest.job_id} ({slowest.kind}, {slowest.state} at the kill "
                f"+{slowest.killed_at - self.started_at:.1f} s)"
            )
        print(f"lateness per affected job  {_p50_max(late)}   (vs when it would have completed, from below)")
        restart_moving = [r.redriven_after for r in self.held_at_restarts if r.redriven_after is not None]
        restart_late = [v for v in self.late_by_job(self.held_at_restarts).values() if v is not None]
        print(f"held at a Redis restart: {len(self.late_by_job(self.held_at_restarts))} job(s)")
        print(
            f"  moving again           {_p50_max(restart_moving)}   (restart -> GEN/receiver sees it again)"
        )
        print(f"  lateness               {_p50_max(restart_late)}   (vs when it would have completed)")
        affected = set(self.late_by_job())
        at_restarts = set(self.late_by_job(self.held_at_restarts))
        redriven = set(self.redriven)
        print(
            f"re-driven jobs           {len(redriven)}: {len(redriven & affected)} held by a killed worker, "
            f"{len((redriven - affected) & at_restarts)} held at a Redis restart, "
            f"{len(redriven - affected - at_restarts)} neither"
        )
        print(
            f"every job, after GEN ready {_p50_max(list(self.after_gen_ready.values()))}"
            "   (includes the wait for the poll that finds it done)"
        )
        if self.after_gen_ready:
            worst = max(self.after_gen_ready, key=lambda j: self.after_gen_ready[j])
            why = (
                "held by a killed worker"
                if worst in affected
                else "held at a Redis restart"
                if worst in at_restarts
                else "neither killed nor held at a restart"
            )
            faults = self.gen_faults.get(worst) or "none"
            print(
                f"  the slowest: {worst}, {why}, re-driven {self.redriven.get(worst, 0)} time(s); "
                f"GEN faults on it: {faults}"
            )
        killed = sum(len(e.victims) for e in self.events)
        print(
            f"workers                  {self.workers_started} started, {killed} SIGKILLed, "
            f"{len(self.self_exits)} exited by themselves"
        )
        for name, tail in self.self_exits.items():
            print(f"--- {name} exited by itself; the end of its log:\n{tail}")
        problems = self.failures()
        print("RESULT                   " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))


def _posts_in_flight(held: Holdings, receiver: WebhookReceiver) -> int:
    """Webhooks ``held`` (a killed node) held whose POST had reached the receiver by the kill."""
    return sum(
        1
        for msg_id in held.webhooks
        if any(a.msg_id == msg_id and a.at <= held.at for a in receiver.arrivals)
    )


def _p50_max(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {statistics.median(values):5.1f} s, max {max(values):5.1f} s (n={len(values)})"


def _timings_line(settings: Settings | None = None) -> str:
    """The workers' recovery timings and poll schedule (``settings``: theirs; default: the defaults)."""
    s = settings or Settings.model_construct()
    polls = f"polls {s.poll_initial_delay:g}-{s.poll_max_delay:g} s"
    if s.poll_learn:
        polls += f", then learned per model (after {s.poll_learn_min_samples} generations)"
    else:
        polls += " (learned poll schedule off)"
    return (
        f"recovery grace {s.recovery_grace:g} s, queued recovery {s.queued_recovery:g} s, "
        f"sweep {s.sweep_interval:g} s, heartbeat {s.heartbeat_interval:g} s, "
        f"dead after {s.node_dead_after:g} s, {polls}"
    )


class Fleet:
    """Worker processes that are added and killed, never restarted."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.workers: list[WorkerProcess] = []
        self.killed: set[str] = set()

    def add(self) -> WorkerProcess:
        name = f"w{len(self.workers) + 1}"
        log_path = self.logs / f"{name}.log"
        process = start_celery(name, ["-A", "worker", "worker", "-c", "2"], self.env, log_path)
        worker = WorkerProcess(name, process, log_path)
        self.workers.append(worker)
        deadline = time.monotonic() + 60
        while "ready." not in worker.log() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return worker

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.process.poll() is None]

    def kill(self, names: list[str]) -> float:
        for worker in self.workers:
            if worker.name in names:
                worker.kill()
                self.killed.add(worker.name)
        return time.time()

    def self_exits(self) -> dict[str, str]:
        exits = {}
        for worker in self.workers:
            if worker.name not in self.killed and worker.process.poll() is not None:
                exits[worker.name] = _traceback_tail(worker.log())
        return exits

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=30)


def _traceback_tail(log: str, lines: int = 60) -> str:
    start = log.rfind("Traceback (most recent call last)")
    tail = log[start:] if start >= 0 else log
    return "\n".join(tail.splitlines()[:lines] if start >= 0 else tail.splitlines()[-lines:])


#: The victims a staging step picked, and why them (None: not yet).
Pick = tuple[list[str], str] | None

_GENERATE = re.compile(r"/v1/\w+/(\d+)/cells/(\d+)(?:/layers/(\d+))?/generate$")


class DefaultsSoak:
    def __init__(self, *, workers: int, rate: float, seed: int, gap: float, tmp: Path) -> None:
        self.initial_workers, self.rate, self.seed, self.gap, self.tmp = workers, rate, seed, gap, tmp
        self.rng = random.Random(seed)
        self.report = DefaultsReport()
        self.requests: dict[str, dict[str, Any]] = {}
        self.job_of_target: dict[str, str] = {}
        self.producing = threading.Event()

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> DefaultsReport:
        with (
            EmbeddedRedis(persistent=True) as self.redis_server,
            GenSimulator(api_key=API_KEY, agent_ids=("42",), durations=DEFAULTS_GEN_DURATIONS) as self.sim,
        ):
            self.receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
            env = worker_environment(
                self.redis_server.url, self.sim.base_url, self.tmp / "outputs", **default_timings()
            )
            assert_default_timings(env)
            self.report.timings = _timings_line(Settings.from_environ(env))
            self.app = _producer_app(env)
            self.state = redis.Redis.from_url(env["LIPSYNC_REDIS_URL"])
            self.store = JobStore(self.state, ttl=3600)
            self.fleet = Fleet(env, self.tmp)
            for _ in range(self.initial_workers):
                self.fleet.add()
            self.started = time.time()
            self.producing.set()
            producer = threading.Thread(target=self._produce, daemon=True)
            producer.start()
            try:
                self._schedule()
            finally:
                self.producing.clear()
                producer.join()
            deadline = time.monotonic() + 240
            outcomes = {job_id: _wait_outcome(self.store, job_id, deadline) for job_id in list(self.requests)}
            _wait_callbacks(self.receiver, outcomes, deadline)
            self.report.elapsed = time.time() - self.started
            self.report.started_at = self.started
            self.report.self_exits = self.fleet.self_exits()
            self.report.workers_started = len(self.fleet.workers)
            _score(self.report, outcomes, self.requests, self.store, self.sim, self.receiver)
            self._measure(outcomes)
            self.fleet.stop()
            self.receiver.close()
        return self.report

    def _produce(self) -> None:
        i = 0
        while self.producing.is_set() and i < len(TARGETS):
            request = soak_request(
                self.seed, i, self.rng.choice(["gen", "sync_so"]), self.receiver, prefix="defaults"
            )
            self.requests[request["job_id"]] = request
            self.job_of_target[target_of(request)] = request["job_id"]
            _enqueue(self.app, request)
            i += 1
            time.sleep(max(0.0, self.started + i / self.rate - time.time()))

    def _schedule(self) -> None:
        time.sleep(20)  # jobs in every stage
        steps: list[tuple[str, Callable[[], Event]]] = [
            ("countdown polls", self._kill_holding_countdown_polls),
            ("fetches not started", self._kill_holding_waiting_fetches),
            ("mid-submit", self._kill_mid_submit),
            ("mid-download", self._kill_mid_download),
            ("mid-webhook", self._kill_mid_webhook),
            ("Redis restart", self._restart_redis),
            ("two at once", self._kill_two_at_once),
            ("Redis restart", self._restart_redis),
        ]
        for index, (label, step) in enumerate(steps):
            if index:
                # Keep Redis restarts and kills apart by a recovery's length, so that each one's
                # figures are its own (a node that missed a heartbeat in the outage trusts no other
                # node's silence for the next 20 s).
                pause = self.gap + (
                    20 if label == "Redis restart" or steps[index - 1][0] == "Redis restart" else 0
                )
                time.sleep(pause)
            try:
                event = step()
            except Exception as exc:  # a staging failure is reported, not raised
                event = Event(self._now(), label, skipped=f"{type(exc).__name__}: {exc}")
            self.report.events.append(event)
            print(
                f"  +{event.at:6.1f} s  {label}: {event.skipped or ', '.join(event.victims) or 'done'}",
                flush=True,
            )
        time.sleep(10)  # jobs through the fleet after the last restart

    def _now(self) -> float:
        return time.time() - self.started

    # -- staging each fault ----------------------------------------------------------------------

    def _kill_when(self, label: str, pick: Callable[[], Pick], *, timeout: float) -> Event:
        """Poll ``pick`` until it names the victims (and what makes them one), then SIGKILL them;
        what they held is read just before."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            picked = pick()
            if picked:
                victims, why = picked
                held = holdings(self.state, victims)
                at = self.fleet.kill(victims)
                for item in held.values():
                    item.at = at
                return Event(at - self.started, label, victims, list(held.values()), why)
            time.sleep(0.2)
        return Event(self._now(), label, skipped=f"the condition did not arise within {timeout:.0f} s")

    def _held(self) -> dict[str, Holdings]:
        return holdings(self.state, [w.name for w in self.fleet.alive()])

    def _kill_holding_countdown_polls(self) -> Event:
        self.fleet.add()

        def pick() -> Pick:
            now = time.time()
            counts = {
                name: sum(
                    1 for j in held.jobs.values() if j.state == "polling" and (j.next_poll_at or 0) > now
                )
                for name, held in self._held().items()
            }
            best = max(counts, key=lambda n: counts[n])
            return ([best], f"{counts[best]} countdown poll(s) pending") if counts[best] >= 2 else None

        return self._kill_when("countdown polls", pick, timeout=60)

    def _kill_holding_waiting_fetches(self) -> Event:
        """503s from the CDN: fetches are retried as countdown messages; kill a worker holding some
        (taken, not running: scheduled, or due behind busy slots)."""
        self.fleet.add()
        self.sim.add_fault(Fault(endpoint="cdn", status=503, times=12))

        def pick() -> Pick:
            failed = self._last_cdn_failed()
            counts = {
                name: sum(1 for job_id, j in held.jobs.items() if j.state == "fetching" and job_id in failed)
                for name, held in self._held().items()
            }
            best = max(counts, key=lambda n: counts[n])
            return ([best], f"{counts[best]} fetch retry(ies) taken, not running") if counts[best] else None

        try:
            return self._kill_when("holding fetches it has not started", pick, timeout=60)
        finally:
            self.sim.clear_faults()

    def _last_cdn_failed(self) -> set[str]:
        """Jobs whose latest download attempt the CDN answered with an error (its retry waits)."""
        last: dict[str, int | None] = {}
        for entry in self.sim.stats()["requests"]:
            if entry["endpoint"] == "cdn" and entry["path"].startswith("/cdn/outputs/"):
                last[entry["path"]] = entry["status"]
        failed = set()
        for path, status in last.items():
            if status is not None and status >= 400:
                job_id = self._job_of_output_path(path)
                if job_id:
                    failed.add(job_id)
        return failed

    def _job_of_output_path(self, path: str) -> str | None:
        token = path.removeprefix("/cdn/outputs/").removesuffix(".mp4")
        try:
            gen = self.sim.generation(int(token.split("-")[1]))
        except (KeyError, ValueError, IndexError):
            return None
        return self.job_of_target.get(target_key(gen["sheet_id"], gen["cell_id"], gen["layer_id"]))

    def _kill_mid_submit(self) -> Event:
        self.fleet.add()
        armed_at = time.time()
        self.sim.add_fault(Fault(endpoint="generate", delay=20.0, times=2))

        def pick() -> Pick:
            if self.sim.faults():
                return None
            stats = self.sim.stats()
            created = stats["generations_by_target"]
            in_flight = set()
            for entry in stats["arrivals"]:
                match = _GENERATE.search(entry["path"])
                if entry["t"] >= armed_at and match:
                    sheet, cell, layer = match.groups()
                    target = target_key(sheet, cell, layer)
                    if target not in created and target in self.job_of_target:
                        in_flight.add(self.job_of_target[target])
            for name, held in self._held().items():
                mine = [j for j in held.jobs if j in in_flight and held.jobs[j].state == "submitting"]
                if mine:
                    return [name], f"{len(mine)} generate request(s) in flight (GEN answers after 20 s)"
            return None

        return self._kill_when("mid-submit", pick, timeout=30)

    def _kill_mid_download(self) -> Event:
        self.fleet.add()
        armed_at = time.time()
        self.sim.add_fault(Fault(endpoint="cdn", trickle=1.0, times=2))  # 47 s per download

        def pick() -> Pick:
            if self.sim.faults():
                return None
            streaming = set()
            for entry in self.sim.stats()["requests"]:
                if (
                    entry["endpoint"] == "cdn"
                    and entry["faulted"]
                    and entry["status"] == 200
                    and entry["t"] >= armed_at
                ):
                    job_id = self._job_of_output_path(entry["path"])
                    if job_id:
                        streaming.add(job_id)
            for name, held in self._held().items():
                mine = [j for j in held.jobs if j in streaming and held.jobs[j].state == "fetching"]
                if mine:
                    return [name], f"{len(mine)} download(s) streaming (1 KiB/s)"
            return None

        return self._kill_when("mid-download", pick, timeout=60)

    def _kill_mid_webhook(self) -> Event:
        self.fleet.add()
        first = self.receiver.hang(1)

        def pick() -> Pick:
            if self.receiver.hang_next or len(self.receiver.arrivals) <= first:
                return None
            msg_id = self.receiver.arrivals[first].msg_id  # the POST that hangs
            held_by: bytes | None = self.state.hget(WEBHOOK_KEY_PREFIX + msg_id, "held_by")  # type: ignore[assignment]
            return ([node_of(held_by.decode())], f"its POST of {msg_id} in flight") if held_by else None

        # The attempt is cut off after LIPSYNC_WEBHOOK_TIMEOUT + 1 s (16 s): kill well before.
        return self._kill_when("mid-webhook", pick, timeout=60)

    def _kill_two_at_once(self) -> Event:
        self.fleet.add()
        self.fleet.add()

        def pick() -> Pick:
            held = self._held()
            busiest = sorted(held, key=lambda n: len(held[n].jobs) + len(held[n].webhooks), reverse=True)[:2]
            return (
                (busiest, "the two holding the most")
                if len(busiest) == 2 and all(held[n] for n in busiest)
                else None
            )

        return self._kill_when("two at once", pick, timeout=30)

    def _restart_redis(self) -> Event:
        held = self._held()
        at = self._now()
        self.redis_server.restart()
        since = time.time()
        for item in held.values():
            item.at = since
        moving = _until_next_completion(self.store, since)
        note = (
            f": fleet moving again after {moving:.1f} s" if moving is not None else ": fleet NOT moving again"
        )
        event = Event(
            at, "Redis restart", held=list(held.values()), note=note + " (restart -> next job completes)"
        )
        if moving is None:
            event.skipped = "no job completed within 240 s of the restart"
        return event

    # -- measuring -------------------------------------------------------------------------------

    def _measure(self, outcomes: dict[str, dict[str, Any]]) -> None:
        stats = self.sim.stats()
        for event in self.report.events:
            for held in event.held:
                if event.victims:
                    self.report.posts_in_flight_at_kills += _posts_in_flight(held, self.receiver)
                found = self.report.recovered if event.victims else self.report.held_at_restarts
                found += recoveries(
                    held,
                    sim_stats=stats,
                    sim=self.sim,
                    receiver=self.receiver,
                    store=self.store,
                    requests=self.requests,
                )
        job_of_path: dict[str, str] = {}
        for job_id, outcome in outcomes.items():
            request = self.requests[job_id]
            layer = request.get("layer_id")
            cell = f"/{request['sheet_id']}/cells/{request['cell_id']}" + (
                f"/layers/{layer}" if layer else ""
            )
            job_of_path[f"/v1/autocontentengine{cell}/generate"] = job_id
            if outcome.get("generation_id"):
                token = self.sim.generation(outcome["generation_id"])["token"]
                job_of_path[f"/cdn/outputs/{token}.mp4"] = job_id
                job_of_path[f"/v1/generations/{outcome['generation_id']}"] = job_id
        for entry in stats["requests"]:
            if not entry["faulted"]:
                continue
            faulted_job = job_of_path.get(entry["path"])
            generate = _GENERATE.search(entry["path"])
            if generate:
                faulted_job = self.job_of_target.get(target_key(*generate.groups()))
            if faulted_job:
                counts = self.report.gen_faults.setdefault(faulted_job, {})
                counts[entry["endpoint"]] = counts.get(entry["endpoint"], 0) + 1
        for job_id, outcome in outcomes.items():
            record = self.store.get(job_id)
            if record is not None and record.redrives:
                self.report.redriven[job_id] = record.redrives
            if outcome.get("status") != "completed":
                continue
            ready = self.sim.generation(outcome["generation_id"])["ready_at"]
            self.report.after_gen_ready[job_id] = outcome["timings"]["finished_at"] - ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--no-redis-restart", action="store_true")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--defaults", action="store_true", help="default timings and the fault schedule")
    parser.add_argument("--rate", type=float, default=1.5, help="--defaults: jobs enqueued per second")
    parser.add_argument(
        "--gap", type=float, default=12.0, help="--defaults: seconds between scheduled faults"
    )
    parser.add_argument("--logs", type=Path, help="--defaults: keep the worker logs and outputs here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lipsync-soak-") as tmp:
        if args.defaults:
            where = Path(tmp) if args.logs is None else args.logs
            where.mkdir(parents=True, exist_ok=True)
            defaults = DefaultsSoak(
                workers=args.workers, rate=args.rate, seed=args.seed, gap=args.gap, tmp=where
            )
            report = defaults.run()
            report.print()
            if args.logs is not None:
                print(f"worker logs              {where}")
            return 0 if not report.failures() else 1
        soak = run_soak(
            jobs=args.jobs,
            workers=args.workers,
            kills=args.kills,
            redis_restart=not args.no_redis_restart,
            seed=args.seed,
            tmp=Path(tmp),
        )
    soak.print()
    return 0 if soak.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
