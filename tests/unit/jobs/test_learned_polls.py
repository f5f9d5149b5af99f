"""The poll step on a learned schedule (worker.jobs.durations), against a real Redis and the simulator.

The simulator runs on the tests' fake clock: a generation of the ``gen`` model is pending for 2 s
then processing until ``DURATIONS["gen"]`` has passed. Jobs are driven by hand, step by step,
moving the clock by each countdown, and GEN's side is read from the simulator's request log.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from gensim import GenSimulator
from tests.unit.conftest import DURATIONS, FakeClock, ResFactory
from tests.unit.jobs.builders import created
from worker.jobs.durations import LEADS_PER_READ, DurationLog
from worker.jobs.models import Job
from worker.jobs.resources import Resources
from worker.jobs.schedule import Observation, stagger, takes_the_lead
from worker.jobs.steps import Again, poll, submit
from worker.ops import deferred

GEN_SECONDS = DURATIONS["gen"]  # pending for a fifth of it, then processing


def status_calls(sim: GenSimulator) -> int:
    return int(sim.stats()["counts"]["get_generation"])


def taught(res: Resources) -> DurationLog:
    """The fleet has seen ten generations of ``gen`` end just after GEN_SECONDS."""
    log = DurationLog(res.redis, keep=60)
    for _ in range(10):
        log.add("gen", Observation.of(GEN_SECONDS - 0.2, GEN_SECONDS + 0.1))
    return log


def submitted(res: Resources, job_id: str) -> Job:
    job = submit(created(res, job_id), res, record=res.jobs.get(job_id))
    assert isinstance(job, Job)
    return job


def run_job(res: Resources, clock: FakeClock, job_id: str) -> tuple[Job, int]:
    """Submit and poll one job to completion, moving the clock by each countdown; the polls it
    took (GEN's status calls are counted by the caller from the simulator)."""
    job = submitted(res, job_id)
    steps = 0
    while True:
        outcome = poll(job, res)
        steps += 1
        if not isinstance(outcome, Again):
            return outcome, steps
        clock.advance(outcome.countdown)
        job = outcome.job


def test_completed_generations_teach_the_fleet_and_later_jobs_poll_when_they_end(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    # The fake clock runs a job in no real time: re-read the fleet's durations before every poll
    # (a worker does so every 10 s, i.e. between most jobs, which last minutes).
    res = make_res(poll_plan_refresh=1e-6)
    before = status_calls(sim)
    run_job(res, clock, "cold-1")
    cold_calls = [status_calls(sim) - before]
    # Learned: the interval between the last poll that saw it running and the one that saw it done.
    seen = DurationLog(res.redis, keep=60).recent("gen").window
    assert len(seen) == 1 and seen[0].lo < GEN_SECONDS <= seen[0].hi
    for i in range(2, 6):  # the configured schedule until five are seen; each job staggered its own way
        before = status_calls(sim)
        run_job(res, clock, f"cold-{i}")
        cold_calls.append(status_calls(sim) - before)

    for i in range(6, 25):
        run_job(res, clock, f"job-{i}")
    warm_calls = []
    for i in range(5):
        before = status_calls(sim)
        start = clock.now
        done, _ = run_job(res, clock, f"warm-{i}")
        warm_calls.append(status_calls(sim) - before)
        assert done.generation_completed_at is not None
        late = done.generation_completed_at - start - GEN_SECONDS
        assert 0 <= late <= 0.05 * GEN_SECONDS
    assert max(warm_calls) <= 2 < statistics.mean(cold_calls)


def test_in_a_task_the_interval_goes_out_with_the_polls_record_write(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    # A worker task collects such writes (worker.app's task signals): the interval learned by the
    # poll that saw the end rides that poll's record write (its MULTI/EXEC) instead of a round trip
    # of its own. Read from Redis's command stream (MONITOR).
    res = make_res()
    job = submitted(res, "riding")
    key = DurationLog.key("gen")
    with res.redis.monitor() as stream:  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        deferred.collecting()
        try:
            while isinstance(outcome := poll(job, res), Again):
                clock.advance(outcome.countdown)
                job = outcome.job
        finally:
            deferred.flush()
        res.redis.set("test:monitor-end", "1")
        commands = []
        while "test:monitor-end" not in (command := str(stream.next_command()["command"])):
            commands.append(command.split()[:2])
    pushed = [i for i, (name, *arg) in enumerate(commands) if name == "LPUSH" and arg == [key]]
    assert len(pushed) == 1, commands
    before = [name for name, *_ in commands[: pushed[0]]]
    opened = max(i for i, name in enumerate(before) if name == "MULTI")
    closed = max((i for i, name in enumerate(before) if name == "EXEC"), default=-1)
    assert opened > closed, "the interval was sent on its own, outside a transaction"
    assert "HSET" in before[opened:], "it rode no record write"
    assert DurationLog(res.redis, keep=60).recent("gen").window, "learned"


def test_the_first_poll_after_submit_waits_without_asking_gen(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res()
    taught(res)
    job = submitted(res, "j1")
    before = status_calls(sim)
    first = poll(job, res)
    assert isinstance(first, Again) and first.job.polls == 0
    assert status_calls(sim) == before, "the wait before the first poll asks GEN nothing"
    assert GEN_SECONDS - 0.5 <= first.countdown <= GEN_SECONDS + 0.2
    record = res.jobs.get("j1")
    assert record is not None and record.next_poll_at == pytest.approx(clock.now + first.countdown)


@pytest.mark.parametrize("overrides", [{"poll_learn": False}, {"poll_learn_min_samples": 50}])
def test_without_learning_the_configured_schedule_runs(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock, overrides: dict[str, Any]
) -> None:
    res = make_res(poll_initial_delay=3.0, poll_backoff_factor=1.0, poll_jitter=0.0, **overrides)
    log = taught(res)
    job = submitted(res, "j1")
    before = status_calls(sim)
    first = poll(job, res)
    # 3 s steps (factor 1), the first one stretched by the job's stagger: 3 s to 6 s.
    assert isinstance(first, Again) and first.countdown == pytest.approx(3.0 * (1 + stagger("j1")))
    assert status_calls(sim) == before + 1, "the configured schedule asks at once"
    if overrides.get("poll_learn") is False:
        clock.advance(GEN_SECONDS)
        poll(first.job, res)
        assert len(log.recent("gen").window) == 10, "learning off: nothing recorded"


def test_each_model_learns_its_own_durations(make_res: ResFactory) -> None:
    res = make_res()
    log = DurationLog(res.redis, keep=60)
    for _ in range(10):
        log.add("gen", Observation.of(9.0, 10.0))
        log.add("sync_so", Observation.of(59.0, 60.0))
    gen, sync = res.planner.plan_for("gen"), res.planner.plan_for("sync_so")
    assert gen is not None and sync is not None
    assert gen.times[-1] == pytest.approx(10.0, abs=0.1)
    assert sync.times[-1] == pytest.approx(60.0, abs=0.1)


def test_the_log_keeps_the_newest_and_skips_what_it_cannot_read(make_res: ResFactory) -> None:
    res = make_res()
    log = DurationLog(res.redis, keep=3)
    for hi in (1.0, 2.0, 3.0, 4.0):
        log.add("gen", Observation.of(0.0, hi))
    res.redis.lpush(DurationLog.key("gen"), b"garbage")
    assert [o.hi for o in log.recent("gen").window] == [4.0, 3.0]


def test_bounded_intervals_outlive_a_window_of_unbounded_ones(make_res: ResFactory) -> None:
    # A wave of jobs each polled once, right at the end, fills the window with (0, hi] intervals;
    # the last bounded ones stay, as read back from Redis (worker.jobs.schedule says why).
    res = make_res(poll_learn_window=4, poll_learn_min_samples=3)
    log = DurationLog(res.redis, keep=4)
    for lo in (29.1, 29.2, 29.3):
        log.add("gen", Observation.of(lo, 30.1))
    log.add("gen", Observation.of(0.0, 30.2))
    seen = log.recent("gen")
    assert [o.lo for o in seen.window] == [0.0, 29.3, 29.2, 29.1]
    assert seen.kept == [], "the bounded ones in the window are not counted twice"
    for _ in range(4):
        log.add("gen", Observation.of(0.0, 30.3))
    seen = log.recent("gen")
    assert [o.hi for o in seen.window] == [30.3] * 4
    assert [o.lo for o in seen.kept] == [29.3, 29.2, 29.1]
    assert len(res.redis.lrange(DurationLog.bounded_key("gen"), 0, -1)) == 3, "unbounded ones stay out"
    learned = res.planner.plan_for("gen")
    assert learned is not None
    assert learned.times[0] > 20.0, "the plan still knows where generations end, and polls there"


def _unbounded_window(res: Resources) -> None:
    log = DurationLog(res.redis, keep=60)
    for _ in range(5):
        log.add("gen", Observation.of(29.8, 30.2))
    for _ in range(60):
        log.add("gen", Observation.of(0.0, 30.2))


def test_one_job_in_four_polls_at_the_lead_the_rest_at_the_end(make_res: ResFactory) -> None:
    # The window holds only (0, hi] intervals: a sample of jobs polls once more, in the tail step
    # before the end (each where its stagger puts it), so that the fleet keeps learning where
    # generations end. Jobs arriving one by one: the plan is read again between them.
    res = make_res(poll_plan_refresh=1e-6)
    _unbounded_window(res)
    firsts = {i: res.planner.first_poll_in("gen", elapsed=0.0, job_id=f"job-{i}") for i in range(80)}
    end = min(firsts.values(), key=lambda first: abs(first - 30.2))
    leading = [i for i, first in firsts.items() if first < end - 0.1]
    assert leading == [i for i in range(80) if takes_the_lead(f"job-{i}")]
    assert 10 <= len(leading) <= 35, firsts
    assert all(end / 1.15 - 1e-6 <= firsts[i] <= end - res.settings.poll_min_delay + 1e-6 for i in leading)
    assert max(firsts[i] for i in leading) - min(firsts[i] for i in leading) > 2.0, "spread, not at one time"
    assert all(first >= 29.8 for i, first in firsts.items() if i not in leading)


def test_a_burst_takes_a_few_leads_per_read_of_the_plan(make_res: ResFactory) -> None:
    # 80 jobs submitted within one read of the plan (10 s): LEADS_PER_READ of them lead, not one
    # in four. A lead's second poll falls due among the burst's last polls, and Celery takes no new
    # message while they are worked off: 250 leads in a burst of 1,000 came last.
    res = make_res()
    _unbounded_window(res)
    firsts = [res.planner.first_poll_in("gen", elapsed=0.0, job_id=f"job-{i}") for i in range(80)]
    end = max(firsts)
    assert sum(first < end - 0.1 for first in firsts) == LEADS_PER_READ
    # A first poll sent without a countdown (it came early) waits for its own first time; one
    # that comes at a lead's time asks.
    assert res.planner.earliest_poll_in("gen", elapsed=0.0) == pytest.approx(end / 1.15, abs=0.3)
    assert res.planner.earliest_poll_in("gen", elapsed=end / 1.15 + 0.3) == 0.0


def test_a_fleet_with_only_the_window_list_plans_as_before(make_res: ResFactory) -> None:
    # Written before the bounded list existed: nothing kept, the window alone.
    res = make_res()
    for _ in range(10):
        res.redis.lpush(DurationLog.key("gen"), b"19.800 20.100")
    seen = DurationLog(res.redis, keep=60).recent("gen")
    assert len(seen.window) == 10 and seen.kept == []


def test_a_job_driven_again_asks_gen_at_once(make_res: ResFactory, sim: GenSimulator) -> None:
    # GEN's event nudged it, or the sweeper recovered it: the learned first-poll wait is skipped.
    res = make_res()
    taught(res)
    job = submitted(res, "j1")
    before = status_calls(sim)
    poll(job.model_copy(update={"drive": 2}), res)
    assert status_calls(sim) == before + 1
