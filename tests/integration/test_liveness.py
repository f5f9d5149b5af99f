"""Recovery by liveness, at the DEFAULT recovery timings: a SIGKILLed worker's jobs are re-driven by
the rest of the fleet within 45 s and finish within 60 s of when they would have.

Every scenario kills a worker (its whole process group) while the job records say it holds the jobs
(``held_by``); nothing is ever restarted (a worker may be *added* before the kill, as a fleet has
more than one node). Each test asserts, counted by the other side:

* every job completes (0 lost);
* GEN created one generation per job (the simulator's count on the job's own target);
* the receiver took each job's outcome webhook once, under one id;
* the first request the simulator (or the receiver) saw for each affected job after the kill came
  within 45 s: its re-drive;
* each affected job finished within 60 s of the earliest it could have finished had its worker not
  died (estimated from below: see :func:`tests.harness.recoveries`);

and prints the recovery time per affected job (p50/max).

Timings. The cluster's recovery settings are the defaults (``LIPSYNC_RECOVERY_GRACE=60``,
``LIPSYNC_QUEUED_RECOVERY=3600``, ``LIPSYNC_SWEEP_INTERVAL=5``; heartbeat and dead-after unset: 5 s
and 20 s), and so is every other timing the other integration tests shorten (poll schedule 5 s
growing to 30 s, retry caps, webhook retry delays, job timeout): the ``fleet`` fixture checks that
the workers' settings equal a default ``Settings`` but for where Redis, GEN and the storage
are. What is short is GEN itself: the simulator's generation durations and its faults (a delayed
generate, a trickled download, a hanging webhook receiver). They hide nothing: the worker cannot
see them except through its HTTP calls, and recovery does not depend on them — a killed node's
jobs are found by its silent heartbeat (20 s) and the sweeper's next round (5 s), whatever GEN
does. Where a scenario needs GEN to still be working at the kill, its durations are long.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from gensim import Fault
from tests.conftest import Cluster, WorkerProcess, wait_for
from tests.harness import (
    Holdings,
    Recovered,
    Run,
    assert_default_timings,
    default_timings,
    holdings,
    make_request,
    own_target,
    recoveries,
    summary,
)
from worker.names import QUEUE_CALLBACKS, QUEUE_FETCH, QUEUE_JOBS, TASK_RUN

pytestmark = pytest.mark.integration

#: The re-drive of what a dead node held, from its kill (the target of "recover in seconds").
REDRIVE_WITHIN = 45.0
#: A recovered job's lateness against when it would have completed.
LATE_BY_AT_MOST = 60.0


@dataclass
class Fleet:
    cluster: Cluster
    run: Run
    sim: Any

    def start(self, name: str, *, concurrency: int = 2, queues: str | None = None) -> WorkerProcess:
        return self.cluster.start_worker(name, concurrency=concurrency, queues=queues)

    def holdings(self, *workers: WorkerProcess) -> dict[str, Holdings]:
        return holdings(self.cluster.redis(), [w.name for w in workers])

    def kill(self, *victims: WorkerProcess) -> list[Holdings]:
        """SIGKILL ``victims`` (each whole process group, one right after the other); what each held
        just before, stamped with the moment they were all dead."""
        held = self.holdings(*victims)
        for victim in victims:
            victim.kill()
        killed_at = time.time()
        for item in held.values():
            item.at = killed_at
        return list(held.values())

    def token(self, job_id: str) -> str | None:
        record = self.run.record(job_id)
        if record is None or not record.generation_id:
            return None
        return str(self.sim.generation(record.generation_id)["token"])

    def verify(self, outcomes: dict[str, dict[str, Any]], killed: list[Holdings], scenario: str) -> None:
        """The invariants, and the re-drive and lateness of everything the killed nodes held."""
        assert {o["status"] for o in outcomes.values()} == {"completed"}, outcomes
        seen = self.run.check_invariants(outcomes, wait=90)
        assert all(seen.deliveries.get(job_id) == 1 for job_id in outcomes), seen.deliveries
        for result in outcomes.values():
            served = self.sim.output_bytes(result["generation_id"])
            assert result["output"]["sha256"] == hashlib.sha256(served).hexdigest()
        stats = self.sim.stats()
        recovered: list[Recovered] = []
        for held in killed:
            recovered += recoveries(
                held,
                sim_stats=stats,
                sim=self.sim,
                receiver=self.run.receiver,
                store=self.run.store(),
                requests=self.run.requests,
            )
        print(f"\n{scenario}: {summary(recovered)}")
        for item in recovered:
            print(
                f"  {item.job_id} {item.kind} ({item.state}): re-driven after {_s(item.redriven_after)}, "
                f"late by {_s(item.late_by)}"
            )
        assert recovered, "the killed node held nothing"
        slow = [r for r in recovered if r.redriven_after is None or r.redriven_after > REDRIVE_WITHIN]
        assert not slow, f"not re-driven within {REDRIVE_WITHIN} s: {slow}"
        late = [r for r in recovered if r.late_by is None or r.late_by > LATE_BY_AT_MOST]
        assert not late, f"finished more than {LATE_BY_AT_MOST} s late: {late}"
        for item in recovered:
            record = self.run.record(item.job_id)
            assert record is not None
            if item.kind == "job":
                assert record.redrives >= 1, f"{item.job_id} was not re-driven by the sweeper: {record}"
        self.assert_no_worker_exited(killed)

    def assert_no_worker_exited(self, killed: list[Holdings]) -> None:
        victims = {held.node for held in killed}
        exited = [w for w in self.cluster.workers if w.name not in victims and w.process.poll() is not None]
        assert not exited, "\n".join(f"{w.name} exited by itself:\n{w.log()[-4000:]}" for w in exited)


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


@pytest.fixture
def fleet(make_cluster: Callable[..., Cluster], simulator: Any) -> Iterator[Fleet]:
    cluster = make_cluster(**default_timings())
    assert_default_timings(cluster.env)
    run = Run(cluster, simulator)
    try:
        yield Fleet(cluster, run, simulator)
    finally:
        run.close()


def _last_cdn_status(stats: dict[str, Any], token: str | None) -> int | None:
    path = f"/cdn/outputs/{token}.mp4"
    statuses = [r["status"] for r in stats["requests"] if r["path"] == path]
    return statuses[-1] if statuses else None


# ----------------------------------------------------------------------------------------------
# (a) reserved fetches
# ----------------------------------------------------------------------------------------------


def test_sigkill_a_worker_holding_reserved_fetches(fleet: Fleet) -> None:
    """One slot downloads slowly; fetch retries are taken by the same worker and wait behind it.

    With ``worker_prefetch_multiplier=1`` and late acks a worker takes no more messages than it has
    slots, except countdown (ETA) messages, which Celery takes on top. So: two slots, four jobs whose
    output is ready at once; the first download trickles (slot 1 busy), the next three get a 503 and
    are retried in under a second as countdown messages the same worker takes; the first retry to
    run trickles too (slot 2 busy), and the other two are due with no slot free: reserved.
    """
    sim = fleet.sim
    # Done at once: the poll each submit sends at once finds every output ready, and the four
    # fetches come together. (Later polls are staggered per job, up to 7.5 s apart: with a 1 s
    # generation the fetches spread out, and sometimes no retry had to wait for a slot.)
    sim.durations = {"gen": 0.0}
    for fault in (
        Fault(endpoint="cdn", trickle=2.0, times=1),
        Fault(endpoint="cdn", status=503, times=3),
        Fault(endpoint="cdn", trickle=2.0, times=1),
    ):
        sim.add_fault(fault)
    a = fleet.start("a", concurrency=2)
    job_ids = fleet.run.submit(4)

    def reserved() -> list[str]:
        stats = sim.stats()
        held = fleet.holdings(a)["a"].jobs
        return [
            job_id
            for job_id in job_ids
            if job_id in held
            and held[job_id].state == "fetching"
            and _last_cdn_status(stats, fleet.token(job_id)) == 503
        ]

    wait_for(lambda: not sim.faults() and len(fleet.holdings(a)["a"].jobs) == 4, timeout=60)
    wait_for(lambda: len(reserved()) >= 1, timeout=10)
    fleet.start("b", concurrency=2)
    waiting = reserved()
    assert waiting, "no fetch waits behind the slow downloads any more"
    killed = fleet.kill(a)
    held = killed[0].jobs
    # The reserved fetches are what this test is about. A job whose poll had not yet had a slot
    # (both were busy with the trickling downloads) may be held as well, still polling: the 503s
    # are counted per request, so which jobs take them is a race.
    assert set(waiting) <= set(held) and all(held[j].state == "fetching" for j in waiting), held
    print(f"\nkilled a holding {len(held)} fetches, {len(waiting)} of them reserved: {sorted(waiting)}")
    outcomes = fleet.run.outcomes(timeout=150)
    fleet.verify(outcomes, killed, "reserved fetches")


# ----------------------------------------------------------------------------------------------
# (b) countdown polls only
# ----------------------------------------------------------------------------------------------


def test_sigkill_a_worker_holding_only_countdown_polls(fleet: Fleet) -> None:
    """GEN takes 40 s; the default schedule polls at once, then 5-12.5 s in (by each job's stagger)
    and ever more slowly: between polls the worker holds nothing but countdown messages."""
    fleet.sim.durations = {"gen": 40.0}
    a = fleet.start("a", concurrency=2)
    job_ids = fleet.run.submit(4)
    for job_id in job_ids:
        fleet.run.wait_state(job_id, "polling", min_polls=2, timeout=60)
    fleet.start("b", concurrency=2)
    now = time.time()
    held = fleet.holdings(a)["a"].jobs
    assert all(h.state == "polling" for h in held.values()), held
    assert sum(1 for h in held.values() if (h.next_poll_at or 0) > now) >= 2, held
    killed = fleet.kill(a)
    outcomes = fleet.run.outcomes(timeout=150)
    fleet.verify(outcomes, killed, "countdown polls")


# ----------------------------------------------------------------------------------------------
# (c) mid-submit, (d) mid-download, (e) mid-webhook
# ----------------------------------------------------------------------------------------------


def _holder(fleet: Fleet, job_ids: list[str], state: str) -> WorkerProcess | None:
    """The worker that holds the most of ``job_ids`` in ``state`` (None: none holds any)."""
    held = fleet.holdings(*fleet.cluster.workers)
    counts = {
        name: sum(1 for j in job_ids if j in h.jobs and h.jobs[j].state == state) for name, h in held.items()
    }
    name = max(counts, key=lambda n: counts[n])
    return next(w for w in fleet.cluster.workers if w.name == name) if counts[name] else None


def test_sigkill_mid_submit(fleet: Fleet) -> None:
    """GEN takes 25 s to answer generate (below the 30 s read timeout): the worker dies with both its
    requests in flight. GEN still creates the generations; the re-drive's submit gets each back by
    Idempotency-Key."""
    fleet.sim.durations = {"gen": 3.0}
    fleet.sim.add_fault(Fault(endpoint="generate", delay=25.0, times=2))
    a = fleet.start("a")
    job_ids = fleet.run.submit(2)
    wait_for(lambda: _arrived(fleet, "generate") == 2, timeout=30)
    fleet.start("b")
    assert fleet.sim.stats()["generations_created"] == 0, "generate answered before the kill"
    killed = fleet.kill(a)
    assert set(killed[0].jobs) == set(job_ids), killed
    assert all(h.state == "submitting" for h in killed[0].jobs.values()), killed
    outcomes = fleet.run.outcomes(timeout=150)
    fleet.verify(outcomes, killed, "mid-submit")


def test_sigkill_mid_download(fleet: Fleet) -> None:
    """The CDN sends 1 KiB every 2 s (a 94 s download) to both of the worker's slots: it dies
    mid-stream. (The survivor's slots are free: a re-drive into a fleet whose every slot is busy
    waits in the queue, as any backlog does.)"""
    fleet.sim.durations = {"gen": 1.0}
    fleet.sim.add_fault(Fault(endpoint="cdn", trickle=2.0, times=2))
    a = fleet.start("a")
    job_ids = fleet.run.submit(2)
    wait_for(lambda: not fleet.sim.faults(), timeout=60)  # both downloads are streaming
    fleet.start("b")
    killed = fleet.kill(a)
    assert set(killed[0].jobs) == set(job_ids), killed
    assert all(h.state == "fetching" for h in killed[0].jobs.values()), killed
    for job_id in job_ids:
        assert not (fleet.cluster.storage / f"{job_id}.mp4").exists()
    outcomes = fleet.run.outcomes(timeout=150)
    fleet.verify(outcomes, killed, "mid-download")


def _arrived(fleet: Fleet, endpoint: str) -> int:
    return sum(1 for r in fleet.sim.stats()["arrivals"] if r["endpoint"] == endpoint)


def test_sigkill_mid_webhook_post(fleet: Fleet) -> None:
    """The receiver hangs on the first POST (never answers, never takes it); the worker dies before
    the attempt's 16 s limit. Another worker sends it again, with the same webhook id."""
    fleet.sim.durations = {"gen": 1.0}
    fleet.run.receiver.hang_next = 1
    fleet.start("a")
    fleet.start("b")
    (job_id,) = fleet.run.submit(1)
    msg_id = f"{job_id}.outcome"
    wait_for(lambda: any(a.msg_id == msg_id for a in fleet.run.receiver.arrivals), timeout=60)

    def webhook_holder() -> WorkerProcess | None:
        held = fleet.holdings(*fleet.cluster.workers)
        return next((w for w in fleet.cluster.workers if msg_id in held[w.name].webhooks), None)

    wait_for(lambda: webhook_holder() is not None, timeout=5)
    victim = webhook_holder()
    assert victim is not None
    killed = fleet.kill(victim)
    assert killed[0].webhooks == {msg_id: job_id}
    assert fleet.run.receiver.attempts == 1 and not fleet.run.receiver.received, "the POST was not in flight"
    outcomes = fleet.run.outcomes(timeout=60)
    fleet.verify(outcomes, killed, "mid-webhook")


# ----------------------------------------------------------------------------------------------
# (c') reserved run messages behind a slot stuck in a slow generate
# ----------------------------------------------------------------------------------------------


def _send_run_later(fleet: Fleet, countdown: float) -> str:
    """A raw ``lipsync.run`` (a producer's ``send_task``) due in ``countdown`` seconds: a worker
    takes it at once, beyond its prefetch limit (Celery holds countdown messages in memory), and
    records its job when it does (worker.node)."""
    request = make_request(fleet.run.receiver, **own_target())
    job_id: str = request["job_id"]
    fleet.run.requests[job_id] = request
    fleet.run.results[job_id] = fleet.cluster.app().send_task(
        TASK_RUN, kwargs={"request": request}, task_id=job_id, countdown=countdown
    )
    return job_id


def test_sigkill_a_single_slot_worker_with_run_messages_reserved_behind_a_slow_generate(fleet: Fleet) -> None:
    """A ``-c 1`` worker: its only slot waits 25 s on GEN's answer to generate, while two more jobs'
    ``lipsync.run`` messages, taken as countdown messages and now due, wait for that slot (reserved,
    not started). The records name the worker as their holder; it is SIGKILLed; the rest of the
    fleet re-drives all three within 45 s."""
    fleet.sim.durations = {"gen": 3.0}
    fleet.sim.add_fault(Fault(endpoint="generate", delay=25.0, times=1))
    a = fleet.start("a", concurrency=1)
    waiting = [_send_run_later(fleet, countdown=5.0) for _ in range(2)]
    due = time.time() + 5.0
    wait_for(lambda: set(waiting) <= set(fleet.holdings(a)["a"].jobs), timeout=30)
    (stuck,) = fleet.run.submit(1)
    wait_for(lambda: _arrived(fleet, "generate") == 1, timeout=30)
    fleet.start("b")
    # The countdowns are due: both messages wait for the slot the slow generate holds.
    time.sleep(max(0.0, due + 1.0 - time.time()))
    assert fleet.sim.stats()["generations_created"] == 0, "generate answered before the kill"
    held = fleet.holdings(a)["a"].jobs
    assert set(held) == {stuck, *waiting}, held
    assert held[stuck].state == "submitting", held
    assert all(held[job_id].state == "queued" for job_id in waiting), held
    assert _arrived(fleet, "generate") == 1, "a reserved message started: the slot was not stuck"
    killed = fleet.kill(a)
    outcomes = fleet.run.outcomes(timeout=150)
    fleet.verify(outcomes, killed, "reserved runs behind a slow generate")


# ----------------------------------------------------------------------------------------------
# (c'') a live worker with a download longer than NODE_DEAD_AFTER
# ----------------------------------------------------------------------------------------------


def test_a_live_worker_downloading_longer_than_dead_after_is_never_redriven(fleet: Fleet) -> None:
    """The CDN takes ~40 s to send the output (twice LIPSYNC_NODE_DEAD_AFTER) to a ``-c 1`` worker
    whose only slot is busy all along: its heartbeat, from a thread of its own, keeps it alive. No
    re-drive, and the CDN served the output exactly once."""
    fleet.sim.durations = {"gen": 1.0}
    fleet.sim.add_fault(Fault(endpoint="cdn", trickle=0.85, times=1))  # ~40 s for 47 KiB
    fleet.start("a", concurrency=1)
    fleet.start("b")  # a live sweeper beside it, that would re-drive a silent node's jobs
    (job_id,) = fleet.run.submit(1)
    outcomes = fleet.run.outcomes(timeout=150)
    assert outcomes[job_id]["status"] == "completed", outcomes
    token = fleet.token(job_id)
    gets = [r for r in fleet.sim.stats()["arrivals"] if r["path"] == f"/cdn/outputs/{token}.mp4"]
    assert len(gets) == 1, gets
    download = outcomes[job_id]["timings"]["finished_at"] - gets[0]["t"]
    assert download > fleet.cluster.settings().node_dead_after, f"the download took only {download:.1f} s"
    record = fleet.run.record(job_id)
    assert record is not None and record.redrives == 0, record
    fleet.run.check_invariants(outcomes, max_repeated=0)
    print(f"\nslow download: {download:.1f} s, 1 CDN GET, 0 re-drives")


# ----------------------------------------------------------------------------------------------
# (f) two workers at once
# ----------------------------------------------------------------------------------------------


def test_sigkill_two_workers_at_once(fleet: Fleet) -> None:
    fleet.sim.durations = {"gen": 30.0}
    a = fleet.start("a")
    b = fleet.start("b")
    job_ids = fleet.run.submit(6)
    for job_id in job_ids:
        fleet.run.wait_state(job_id, "polling", min_polls=1, timeout=60)

    def both_hold() -> bool:
        held = fleet.holdings(a, b)
        return bool(held["a"].jobs) and bool(held["b"].jobs)

    wait_for(both_hold, timeout=30)
    fleet.start("c")
    wait_for(both_hold, timeout=30)
    killed = fleet.kill(a, b)
    assert all(held.jobs for held in killed), killed
    outcomes = fleet.run.outcomes(timeout=150)
    fleet.verify(outcomes, killed, "two at once")


# ----------------------------------------------------------------------------------------------
# (g) a backlog is not a failure
# ----------------------------------------------------------------------------------------------


def test_a_job_waiting_in_a_queue_nobody_took_is_not_redriven(fleet: Fleet) -> None:
    """Nobody consumes the fetch queue: every job's fetch waits there. The worker that ran the jobs'
    last polls is killed; its holder goes silent while the records still name it (``held_by`` of a
    message it acknowledged). After well over 45 s nothing was re-driven: a message in a queue has
    no holder. A fetch worker added later finishes every job."""
    fleet.sim.durations = {"gen": 2.0}
    queues = f"{QUEUE_JOBS},{QUEUE_CALLBACKS}"
    fleet.start("a", queues=queues)
    fleet.start("b", queues=queues)
    job_ids = fleet.run.submit(4)
    broker = redis.Redis.from_url(fleet.cluster.env["LIPSYNC_BROKER_URL"])
    wait_for(lambda: broker.llen(QUEUE_FETCH) == 4, timeout=60)
    victim = _holder(fleet, job_ids, "polling")
    assert victim is not None, "no record names a holder"
    drives = {job_id: _drive(fleet, job_id) for job_id in job_ids}
    killed = fleet.kill(victim)
    assert killed[0].jobs, "the victim holds nothing on record"
    # The victim's silence is noticed after 20-30 s; wait well past the 45 s target.
    time.sleep(REDRIVE_WITHIN + 10)
    print(
        f"\nbacklog: {len(killed[0].jobs)} job(s) on record as held by the dead {victim.name}, their "
        f"fetches queued; {time.time() - killed[0].at:.0f} s after the kill: 0 re-driven"
    )
    for job_id in job_ids:
        record = fleet.run.record(job_id)
        assert record is not None and record.outcome is None
        assert (record.redrives, record.drive) == (0, drives[job_id]), f"{job_id} was re-driven: {record}"
    assert broker.llen(QUEUE_FETCH) == 4
    noticed = [line for line in _all_logs(fleet).splitlines() if "holders stopped" in line]
    assert any(f"'{victim.name}@" in line for line in noticed), "the sweeper never noticed the dead holder"
    fleet.start("c", queues=QUEUE_FETCH)
    outcomes = fleet.run.outcomes(timeout=90)
    assert {o["status"] for o in outcomes.values()} == {"completed"}, outcomes
    seen = fleet.run.check_invariants(outcomes, wait=60)
    assert all(seen.deliveries.get(job_id) == 1 for job_id in outcomes), seen.deliveries
    for job_id in job_ids:
        record = fleet.run.record(job_id)
        assert record is not None and record.redrives == 0, record
    fleet.assert_no_worker_exited(killed)


def _drive(fleet: Fleet, job_id: str) -> int:
    record = fleet.run.record(job_id)
    assert record is not None
    return record.drive


def _all_logs(fleet: Fleet) -> str:
    return "".join(w.log() for w in fleet.cluster.workers)
