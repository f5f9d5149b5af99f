"""Redis restarts five times under three running workers: no worker exits, every job completes.
And after long outages (21 s, 37 s) workers reconnect within their backoff cap of Redis answering,
while the jobs a worker held are re-driven without waiting for its reconnect (the last two tests).

Nothing restarts a worker here (unlike a deployment's supervisor): a worker process that exits on a
broker restart fails the test (kombu 5.7 made them exit: docs/redis-restart-crash.md). Redis keeps
its data across each restart (append-only file, fsync always), as a production broker with AOF
does. Recovery runs with the production defaults (LIPSYNC_RECOVERY_GRACE, LIPSYNC_QUEUED_RECOVERY,
LIPSYNC_SWEEP_INTERVAL), so a job whose message a worker dropped at its reconnect completes through
the reconnect's own re-drive (worker.jobs.liveness), not through a shortened overdue timer.

And the test can tell: the job whose download the mid-download restart cut off must be re-driven
by the sweeper (its record's drive moves on) within :data:`REDRIVEN_WITHIN` of the restart, without
counting toward LIPSYNC_MAX_REDRIVES, with a ``released_on_reconnect`` recovery counted; and every
job must finish within :data:`LAST_OUTCOME_WITHIN` of the last restart. Nothing else re-drives a job
that soon: a silent holder is dead only after LIPSYNC_NODE_DEAD_AFTER (20 s, and such a re-drive
counts), the overdue timer waits LIPSYNC_RECOVERY_GRACE (60 s), and the post-reconnect audit
(worker.jobs.audit) counts a taken message as present while the record says it is held, as the
cut-off fetch's does. (The fetch message kombu restores at the reconnect may run again too; the CDN
keeps trickling until the re-drive is seen, so that it cannot finish the job first.)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError

from gensim import Fault
from tests.conftest import Cluster, WorkerProcess, wait_for
from tests.harness import Run, holdings
from worker.names import ALL_QUEUES, JOB_KEY_PREFIX, Stage
from worker.ops.broker import in_broker
from worker.ops.metrics import RECOVERIES_KEY
from worker.settings import Settings

pytestmark = pytest.mark.integration

WORKERS = 3


def _default(field: str) -> str:
    return str(Settings.model_fields[field].default)


ENV = {
    # The GEN timeouts of the fault matrix (tests/integration/test_faults.py).
    "LIPSYNC_GEN_CONNECT_TIMEOUT": "1",
    "LIPSYNC_GEN_READ_TIMEOUT": "3",
    "LIPSYNC_DOWNLOAD_TIMEOUT": "10",
    # Undo the test cluster's shortened recovery timers: production defaults.
    "LIPSYNC_RECOVERY_GRACE": _default("recovery_grace"),
    "LIPSYNC_QUEUED_RECOVERY": _default("queued_recovery"),
    "LIPSYNC_SWEEP_INTERVAL": _default("sweep_interval"),
}

RECEIVED = re.compile(r"Task \S+\[[^\]]+\] received")
CONNECTED = "Connected to redis://"


def took_work_after_reconnecting(log: str) -> bool:
    connected = log.rfind(CONNECTED)
    return connected >= 0 and RECEIVED.search(log, connected) is not None


UNRECOVERABLE = "Unrecoverable error"

#: The job whose download a restart cut off is re-driven within this long of the restart (liveness:
#: reconnect ~1-2 s, then the next sweep, every 5 s; a dead holder needs 20 s of silence)...
REDRIVEN_WITHIN = 12.0
#: ... and every job has its outcome within this long of the last restart.
LAST_OUTCOME_WITHIN = 30.0


def recoveries(run: Run, cause: str) -> int:
    """The sweeper's count of jobs re-driven for ``cause`` (worker.ops.metrics), Redis permitting."""
    deadline = time.monotonic() + 10
    while True:
        try:
            raw = run.cluster.redis().hget(RECOVERIES_KEY, json.dumps([cause], separators=(",", ":")))
            return int(raw or 0)
        except Exception:  # Redis still loading after a restart
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def bare_run(make_cluster: Callable[..., Cluster], simulator: Any) -> Iterator[Run]:
    """A cluster with Redis persistent and the production recovery timings, no worker started."""
    r = Run(make_cluster(persistent=True, **ENV), simulator)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def run(bare_run: Run) -> Run:
    """:func:`bare_run` with :data:`WORKERS` workers."""
    for _ in range(WORKERS):
        bare_run.cluster.start_worker()
    return bare_run


class Restarts:
    """Restarts the cluster's Redis, keeping its data; remembers where each worker's log stood at
    the latest restart."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.count = 0
        self.marks: dict[str, int] = {}

    def restart(self, *, down: float = 0.0) -> None:
        """Down for the time a stop and a start take (~0.1-0.3 s), plus ``down`` seconds."""
        for worker in self.run.cluster.workers:
            self.marks[worker.name] = len(worker.log())
        server = self.run.cluster.redis_server
        server.stop()
        time.sleep(down)
        server.start()
        self.count += 1

    def since_last(self, worker: WorkerProcess) -> str:
        return worker.log()[self.marks[worker.name] :]


def assert_all_alive(run: Run) -> None:
    dead = {w.name: w.process.returncode for w in run.cluster.workers if w.process.poll() is not None}
    if dead:
        tails = "\n".join(f"--- {w.name}\n{w.log()[-4000:]}" for w in run.cluster.workers if w.name in dead)
        pytest.fail(f"worker process(es) exited: {dead}\n{tails}")


def wait_any_state(run: Run, job_ids: list[str], *states: str, timeout: float = 60) -> str:
    """The first of ``job_ids`` whose record is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job_id in job_ids:
            record = run.record(job_id)
            if record is not None and record.state in states:
                return job_id
        time.sleep(0.02)
    raise TimeoutError(f"none of {job_ids} reached {states}")


def wait_polling_together(
    run: Run, job_ids: list[str], at_least: int, min_polls: int, timeout: float = 60
) -> None:
    """Wait until ``at_least`` of ``job_ids`` are polling at once, each with ``min_polls`` polls
    made. Looking at every job together, not one after another: on a busy machine a job can reach
    polling and finish while the loop still waits for an earlier one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [run.record(job_id) for job_id in job_ids]
        polling = [
            r for r in records if r is not None and r.state == Stage.POLLING.value and r.polls >= min_polls
        ]
        if len(polling) >= at_least:
            return
        time.sleep(0.05)
    states = {job_id: (r.state, r.polls) if r else None for job_id, r in zip(job_ids, records, strict=True)}
    raise TimeoutError(f"fewer than {at_least} of {len(job_ids)} jobs polling at once: {states}")


def wait_all_finished(run: Run, timeout: float, *, since: float | None = None) -> None:
    """Every job's record holds an outcome within ``timeout`` s of ``since`` (monotonic; default:
    now); else fail naming each unfinished job and its stage."""
    deadline = (time.monotonic() if since is None else since) + timeout
    while time.monotonic() < deadline:
        assert_all_alive(run)
        if all((r := run.record(job_id)) is not None and r.outcome is not None for job_id in run.results):
            return
        time.sleep(0.5)
    unfinished = [job_id for job_id in run.results if (r := run.record(job_id)) is None or r.outcome is None]
    story = "\n".join(what_became_of(run, job_id) for job_id in unfinished)
    pytest.fail(f"{len(unfinished)} job(s) unfinished {timeout:.0f} s after the last restart:\n{story}")


def what_became_of(run: Run, job_id: str) -> str:
    """An unfinished job's record, where its messages are in the broker, and what each worker logged
    about it: enough to tell a lost message from one a worker holds, or a late reconnect."""
    client = run.cluster.redis()
    raw: dict[bytes, bytes] = client.hgetall(JOB_KEY_PREFIX + job_id)  # type: ignore[assignment]
    record = {k.decode(): v.decode() for k, v in raw.items() if k not in (b"job", b"callback")}
    now = time.time()
    for when in ("created_at", "updated_at", "overdue_at", "next_poll_at"):
        if record.get(when):
            record[when] = f"{float(record[when]) - now:+.1f} s"
    found = in_broker(redis.Redis.from_url(run.cluster.env["LIPSYNC_BROKER_URL"]), ALL_QUEUES)
    taken = [(tag, f"{now - since:.1f} s ago") for tag, since in found.taken_jobs.get(job_id, [])]
    lines = [
        f"{job_id}: {record}",
        f"  queued: {job_id in found.queued_jobs}; taken (unacknowledged): {taken}",
    ]
    for worker in run.cluster.workers:
        lines += [f"  {worker.name}: {line[:300]}" for line in worker.log().splitlines() if job_id in line]
    return "\n".join(lines)


def collect_outcomes(run: Run, timeout: float) -> dict[str, dict[str, Any]]:
    """What each job's caller gets from its AsyncResult; else fail naming each job whose result is
    not ready, with its result state and its record's."""
    try:
        return run.outcomes(timeout=timeout)
    except CeleryTimeoutError:
        pending = {}
        for job_id, result in run.results.items():
            if not result.ready():
                record = run.record(job_id)
                state = record.state if record else None
                pending[job_id] = {"result": result.state, "record": state}
        pytest.fail(f"AsyncResult not ready {timeout:.0f} s after every record had its outcome: {pending}")


def test_workers_survive_five_redis_restarts(run: Run, simulator: Any) -> None:
    cluster = run.cluster
    simulator.durations = {"gen": 3.0}
    restarts = Restarts(run)
    started = time.monotonic()

    # 1. Jobs waiting on GEN: each holds a countdown poll in some worker's memory.
    first = run.submit(6)
    for job_id in first:
        run.wait_state(job_id, Stage.POLLING.value, min_polls=1)
    restarts.restart()
    assert_all_alive(run)

    # 2. While downloads are running: the CDN trickles every output (~14 s for 48 kB) until the
    # cut-off download's re-drive is seen. The worker cancels the running download when its
    # connection drops; liveness must re-drive it as soon as Redis is back.
    simulator.add_fault(Fault(endpoint="cdn", trickle=0.3, times=None))
    fetching = wait_any_state(run, first, Stage.FETCHING.value)
    time.sleep(0.5)
    record = run.record(fetching)
    assert record is not None and record.state == Stage.FETCHING.value, record
    released_before = recoveries(run, "released_on_reconnect")
    restarts.restart()
    restarted = time.monotonic()
    assert_all_alive(run)
    while time.monotonic() - restarted < REDRIVEN_WITHIN:
        try:
            now = run.record(fetching)
        except Exception:  # Redis still loading
            continue
        if now is not None and (now.drive > record.drive or now.outcome is not None):
            break
        time.sleep(0.1)
    redriven = run.record(fetching)
    redriven_after = time.monotonic() - restarted
    simulator.clear_faults()
    assert redriven is not None and redriven.drive > record.drive, (
        f"{fetching}: its download cut off by the restart, not re-driven within {REDRIVEN_WITHIN:.0f} s: "
        f"{redriven}"
    )
    assert redriven.redrives == record.redrives, "a reconnect's re-drive must not count toward the limit"
    # Counted by the same sweep round, just after its re-drives.
    wait_for(lambda: recoveries(run, "released_on_reconnect") > released_before, timeout=5)

    # 3. During a burst of polls: a dozen jobs polling every 0.2-0.5 s. GEN takes longer for these
    # (6 s) so that most of them are polling at once even when submits are slow on a busy machine.
    simulator.durations = {"gen": 6.0}
    burst = run.submit(12)
    wait_polling_together(run, burst, at_least=9, min_polls=2)
    simulator.durations = {"gen": 3.0}
    restarts.restart()
    assert_all_alive(run)

    # 4. A failover-length outage (3 s), with polls in the middle of slow GEN calls.
    more = run.submit(4)
    wait_any_state(run, more, Stage.POLLING.value)
    simulator.add_fault(Fault(endpoint="get_generation", delay=1.5, times=4))
    time.sleep(0.5)
    restarts.restart(down=3.0)
    assert_all_alive(run)

    # 5. Again before the workers settled.
    time.sleep(1.0)
    restarts.restart()
    last_restart = time.monotonic()
    assert restarts.count == 5

    # Every worker reconnects and takes work again.
    after = run.submit(6)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert_all_alive(run)
        # Reconnected (a restarted Redis may still be loading its data: Celery retries) and took work.
        if all(took_work_after_reconnecting(restarts.since_last(w)) for w in cluster.workers):
            break
        time.sleep(0.5)
    for worker in cluster.workers:
        log = restarts.since_last(worker)
        assert CONNECTED in log, f"{worker.name} did not reconnect after the last restart"
        assert took_work_after_reconnecting(log), f"{worker.name} took no task after reconnecting"

    wait_all_finished(run, timeout=LAST_OUTCOME_WITHIN, since=last_restart)
    finished = time.monotonic()
    outcomes = collect_outcomes(run, timeout=30)
    assert_all_alive(run)
    assert {job_id: o["status"] for job_id, o in outcomes.items()} == dict.fromkeys(run.results, "completed")
    run.check_invariants(outcomes)
    for worker in cluster.workers:
        assert UNRECOVERABLE not in worker.log(), worker.name
    jobs = len(first) + len(burst) + len(more) + len(after)
    took = finished - started
    print(
        f"the download cut off by restart 2 re-driven after {redriven_after:.1f} s; "
        f"{jobs} jobs, {restarts.count} restarts, {WORKERS} workers alive: {took:.1f} s in all; "
        f"{finished - last_restart:.1f} s from the last restart to the last outcome"
    )


#: A long outage. kombu's own backoff would reconnect a worker 30 s after the loss (retries at 2, 6,
#: 12, 20 and 30 s): ~9 s after Redis is back. Ours (LIPSYNC_BROKER_RECONNECT_MAX, 5 s) retries at
#: 1, 3, 6, 10, 15, 20 and 25 s: ~4 s after.
LONG_OUTAGE = 21.0
#: A worker that is to reconnect late runs with kombu's cap (30 s): its attempts come 1, 3, 6, 10,
#: 15, 21, 28, 36 and 45 s after the loss. Down this long, Redis is back ~7.7 s before that worker's
#: next attempt, while what it held is re-driven within a sweep (5 s) of Redis answering.
KOMBU_RECONNECT_MAX = "30"
SLOW_OUTAGE = 37.0
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


def reconnected_at(log: str) -> float | None:
    """When ``log`` (a worker's, from some point on) says the worker connected first (epoch)."""
    for line in log.splitlines():
        stamp = LOG_LINE.match(line)
        if stamp and CONNECTED in line:
            return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def wait_reconnected(restarts: Restarts, worker: WorkerProcess, timeout: float = 60) -> float | None:
    """When ``worker`` reconnected after the latest restart, waiting up to ``timeout`` s for it."""
    deadline = time.monotonic() + timeout
    while (at := reconnected_at(restarts.since_last(worker))) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return at


def test_a_job_held_by_a_worker_still_reconnecting_is_carried_on_by_another(
    bare_run: Run, simulator: Any
) -> None:
    """Celery drops what a connection held (countdown polls here) the moment it is lost. The jobs it
    held are re-driven as soon as Redis answers, so that a worker that is connected (one added here,
    as a supervisor or an autoscaler adds one) carries them on, however late their own worker
    reconnects: GEN sees each job's next poll before it does. The holding worker reconnects late
    because it runs with kombu's 30 s backoff cap; released at its reconnect instead, GEN would see
    the poll a sweep after it."""
    run, cluster = bare_run, bare_run.cluster
    slow = cluster.start_worker("slow", LIPSYNC_BROKER_RECONNECT_MAX=KOMBU_RECONNECT_MAX)
    simulator.durations = {"gen": 25.0}
    jobs = run.submit(3)
    for job_id in jobs:
        run.wait_state(job_id, Stage.POLLING.value, min_polls=1)
    assert sorted(holdings(cluster.redis(), ["slow"])["slow"].jobs) == sorted(jobs)
    restarts = Restarts(run)
    restarts.restart(down=SLOW_OUTAGE)
    back = time.time()
    cluster.start_worker()  # connects at once
    wait_all_finished(run, timeout=90)
    assert_all_alive(run)
    reconnected = wait_reconnected(restarts, slow)
    assert reconnected is not None, "the worker that held the jobs did not reconnect"
    arrivals = simulator.stats()["arrivals"]
    margins = []
    for job_id in jobs:
        record = run.record(job_id)
        assert record is not None and record.generation_id
        path = f"/v1/generations/{record.generation_id}"
        first_poll = min(a["t"] for a in arrivals if a["t"] > back and a["path"] == path)
        assert first_poll < reconnected, (
            f"{job_id}: GEN saw its next poll {first_poll - back:.1f} s after Redis was back, only after "
            f"the worker that held it reconnected ({reconnected - back:.1f} s)"
        )
        margins.append(reconnected - first_poll)
    outcomes = collect_outcomes(run, timeout=30)
    assert {job_id: o["status"] for job_id, o in outcomes.items()} == dict.fromkeys(jobs, "completed")
    run.check_invariants(outcomes)
    print(
        f"each job's next poll came {min(margins):.1f}-{max(margins):.1f} s before its old worker reconnected"
    )


def test_workers_reconnect_within_their_backoff_cap_of_redis_coming_back(run: Run, simulator: Any) -> None:
    """At the default LIPSYNC_BROKER_RECONNECT_MAX (5 s) every worker is back within ~5 s of Redis
    after a 21 s outage (kombu's backoff: ~9 s), and the jobs enqueued during the outage's end run."""
    simulator.durations = {"gen": 3.0}
    restarts = Restarts(run)
    restarts.restart(down=LONG_OUTAGE)
    back = time.time()
    jobs = run.submit(3)
    late = {}
    for worker in run.cluster.workers:
        reconnected = wait_reconnected(restarts, worker)
        assert reconnected is not None, f"{worker.name} did not reconnect"
        late[worker.name] = reconnected - back
    assert max(late.values()) < float(_default("broker_reconnect_max")) + 1.0, late
    wait_all_finished(run, timeout=30)
    assert_all_alive(run)
    outcomes = collect_outcomes(run, timeout=30)
    assert {job_id: o["status"] for job_id, o in outcomes.items()} == dict.fromkeys(jobs, "completed")
    print("reconnected after Redis was back: " + ", ".join(f"{n} {t:.1f} s" for n, t in sorted(late.items())))
