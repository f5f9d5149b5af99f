"""The sweeper against real parts: the job record and the outbox on a real Redis, the real CeleryQueue
(its messages read back with :func:`queued`), the GEN simulator on the fake clock."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from gensim import Fault, GenSimulator
from tests.unit.conftest import FakeClock, queued, unit_settings
from tests.unit.jobs.builders import (
    CALLBACK_QUEUE,
    TASK_CALLBACK,
    TASK_ID,
    all_messages,
    created,
    request,
    result,
    submitted,
)
from worker.app import create_app
from worker.celery_queue import CeleryQueue
from worker.errors import LipsyncJobFailed, RequestInvalid
from worker.jobs import steps
from worker.jobs.failures import reject
from worker.jobs.models import Job, LipsyncRequest
from worker.jobs.outcomes import finish
from worker.jobs.records import JobStore
from worker.jobs.resources import Resources
from worker.jobs.sweeper import SweeperThread, SweepReport, sweep_once, try_lease
from worker.names import (
    ACTIVE_JOBS_KEY,
    QUEUE_CALLBACKS,
    QUEUE_FETCH,
    QUEUE_JOBS,
    SWEEPER_LEASE_KEY,
    TASK_DELIVER_WEBHOOK,
    TASK_FETCH,
    TASK_POLL,
    TASK_SUBMIT,
    WEBHOOKS_PENDING_KEY,
)
from worker.settings import Settings
from worker.taskqueue import TaskQueue


def overdue_at(res: Resources, job_id: str) -> float:
    record = res.jobs.get(job_id)
    assert record is not None and record.overdue_at is not None
    return record.overdue_at


# --------------------------------------------------------------------------------------------
# re-driving unfinished jobs
# --------------------------------------------------------------------------------------------


def test_a_job_not_yet_overdue_is_not_redriven(res: Resources, queue: CeleryQueue, clock: FakeClock) -> None:
    created(res)
    due = overdue_at(res, "j1")
    assert due == clock() + res.settings.queued_recovery
    report = sweep_once(queue, res, now=due - 1)
    assert not report and report == SweepReport()
    record = res.jobs.get("j1")
    assert record is not None and (record.drive, record.redrives) == (1, 0)
    assert all_messages(res) == []


def test_an_overdue_queued_job_is_redriven_from_submit(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    job = created(res)
    clock.advance(res.settings.queued_recovery + 1)
    report = sweep_once(queue, res)
    assert report.redriven == ["j1"] and not report.failed and not report.redispatched

    record = res.jobs.get("j1")
    assert record is not None
    assert (record.drive, record.redrives) == (2, 1)
    assert record.overdue_at == clock() + res.settings.queued_recovery
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") == clock() + res.settings.queued_recovery

    [message] = queued(res, QUEUE_JOBS)
    assert message["task"] == TASK_SUBMIT
    assert message["chain"] == [TASK_POLL, TASK_FETCH]
    assert message["last_id"] == TASK_ID
    [sent] = message["args"]
    assert sent["drive"] == 2 and sent["step_retries"] == 0
    assert sent["request"]["job_id"] == "j1" and sent["generation_id"] is None
    # The re-driven message is the one the record now accepts; the original one is stale.
    assert steps.guard(Job.model_validate(sent), res) is not None
    with pytest.raises(steps.NothingToDo):
        steps.guard(job, res)
    assert queued(res, QUEUE_FETCH) == []


def test_an_overdue_submitted_job_is_redriven_from_poll(
    res: Resources, queue: CeleryQueue, clock: FakeClock, sim: GenSimulator
) -> None:
    job = submitted(res)
    clock.advance(overdue_at(res, "j1") - clock() + 1)
    assert sweep_once(queue, res).redriven == ["j1"]
    [message] = queued(res, QUEUE_JOBS)
    assert message["task"] == TASK_POLL
    assert message["chain"] == [TASK_FETCH]
    assert message["last_id"] == TASK_ID
    [sent] = message["args"]
    assert sent["generation_id"] == job.generation_id and sent["drive"] == 2
    # Re-driving never submits again.
    assert sim.stats()["generations_created"] == 1


def test_a_completed_generation_is_redriven_from_fetch(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    job = submitted(res)
    clock.advance(11)  # the "gen" model's simulated generation takes 10 s
    polled = steps.poll(job, res)
    assert isinstance(polled, Job) and polled.output_resource is not None
    clock.advance(overdue_at(res, "j1") - clock() + 1)
    assert sweep_once(queue, res).redriven == ["j1"]
    assert queued(res, QUEUE_JOBS) == []
    [message] = queued(res, QUEUE_FETCH)
    assert message["task"] == TASK_FETCH
    assert message["chain"] == []
    # A single-step chain runs under the caller's task id itself.
    assert message["id"] == message["last_id"] == TASK_ID
    [sent] = message["args"]
    assert sent["drive"] == 2
    assert sent["output_resource"]["url"] == polled.output_resource.url


def test_two_sweeps_at_the_same_moment_redrive_a_job_once(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    created(res)
    now = overdue_at(res, "j1") + 1
    assert sweep_once(queue, res, now=now).redriven == ["j1"]
    # A second sweeper that listed the job as overdue before the first one took it over loses.
    assert res.jobs.take_over("j1", now=now, overdue_at=now + 10) is None
    second = sweep_once(queue, res, now=now)
    assert second.redriven == []
    record = res.jobs.get("j1")
    assert record is not None and (record.drive, record.redrives) == (2, 1)
    assert len(queued(res, QUEUE_JOBS)) == 1


def test_concurrent_sweeps_redrive_a_job_once(
    res: Resources, settings: Settings, queue: CeleryQueue, clock: FakeClock
) -> None:
    for n in range(5):
        created(res, f"j{n}")
    now = overdue_at(res, "j0") + 1
    barrier = threading.Barrier(6)
    reports: list[SweepReport] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        own = Resources(settings, clock=clock)
        try:
            barrier.wait()
            reports.append(sweep_once(queue, own, now=now))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            own.redis.close()

    threads = [threading.Thread(target=sweep) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    redriven = sorted(job_id for report in reports for job_id in report.redriven)
    assert redriven == [f"j{n}" for n in range(5)]
    messages = queued(res, QUEUE_JOBS)
    assert sorted(m["args"][0]["request"]["job_id"] for m in messages) == redriven
    for n in range(5):
        record = res.jobs.get(f"j{n}")
        assert record is not None and (record.drive, record.redrives) == (2, 1)


def test_try_lease_lets_one_holder_win_per_interval(res: Resources) -> None:
    assert try_lease(res, "worker-a", 0.2)
    assert not try_lease(res, "worker-b", 0.2)
    assert not try_lease(res, "worker-a", 0.2), "not even the holder sweeps twice in one interval"
    assert res.redis.get(SWEEPER_LEASE_KEY) == b"worker-a"
    time.sleep(0.3)
    assert try_lease(res, "worker-b", 0.2)
    assert res.redis.get(SWEEPER_LEASE_KEY) == b"worker-b"


# --------------------------------------------------------------------------------------------
# giving up, re-dispatching, cancelled jobs
# --------------------------------------------------------------------------------------------


def test_a_job_redriven_max_redrives_times_fails_with_redrive_limit(
    redis_url: str, sim: GenSimulator, tmp_path: Path, clock: FakeClock
) -> None:
    settings = unit_settings(redis_url, sim.base_url, tmp_path / "outputs", max_redrives=2)
    res = Resources(settings, clock=clock)
    queue = CeleryQueue(create_app(settings))
    try:
        created(res, callback=TASK_CALLBACK)
        for drive in (2, 3):
            clock.advance(settings.queued_recovery + 1)
            assert sweep_once(queue, res).redriven == ["j1"]
            record = res.jobs.get("j1")
            assert record is not None and record.drive == drive
        clock.advance(settings.queued_recovery + 1)
        report = sweep_once(queue, res)
        assert report.failed == ["j1"] and report.redriven == []

        record = res.jobs.get("j1")
        assert record is not None and record.outcome is not None
        assert record.outcome["status"] == "failed"
        assert record.outcome["error_code"] == "redrive_limit"
        assert record.redrives == 2 and record.cancel_requested and record.callbacks_dispatched
        assert record.drive == 4, "the give-up invalidates whatever message may still resurface"
        assert len(queued(res, QUEUE_JOBS)) == 2, "no third chain"

        [callback] = queued(res, CALLBACK_QUEUE)
        assert callback["task"] == "pipeline.on_lipsync"
        assert callback["id"] == "j1.outcome"
        assert callback["args"] == [record.outcome]

        result = queue.app.AsyncResult(TASK_ID)
        assert result.state == "FAILURE"
        assert isinstance(result.result, LipsyncJobFailed)
        assert result.result.failure["error_code"] == "redrive_limit"
        assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is None

        # Nothing more on later sweeps.
        clock.advance(settings.queued_recovery + 1)
        assert not sweep_once(queue, res)
        assert len(queued(res, CALLBACK_QUEUE)) == 1
    finally:
        res.redis.close()


def test_a_finished_job_with_unconfirmed_callbacks_gets_them_resent(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    created(res, callback=TASK_CALLBACK)
    outcome = result().model_dump(mode="json")
    due = clock() + res.settings.recovery_grace
    # What a worker that died between recording the outcome and dispatching it leaves behind.
    first = res.jobs.end("j1", outcome, state="completed", overdue_at=due).first
    assert first

    assert not sweep_once(queue, res, now=due - 1), "not before the grace"
    assert queued(res, CALLBACK_QUEUE) == []

    report = sweep_once(queue, res, now=due + 1)
    assert report.redispatched == ["j1"] and report.redriven == []
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["id"] == "j1.outcome" and callback["args"] == [outcome]
    assert queued(res, QUEUE_JOBS) == [], "a finished job is never re-driven"

    caller = queue.app.AsyncResult(TASK_ID)
    assert caller.state == "SUCCESS" and caller.result == outcome
    record = res.jobs.get("j1")
    assert record is not None and record.callbacks_dispatched and record.drive == 1
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is None

    assert not sweep_once(queue, res, now=due + 10_000)
    assert len(queued(res, CALLBACK_QUEUE)) == 1


def test_a_failed_outcome_resent_by_the_sweeper_keeps_its_id_and_fails_the_caller(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    created(res, callback=TASK_CALLBACK)
    failure = {
        "job_id": "j1",
        "status": "timeout",
        "error_code": "timeout",
        "message": "too slow",
        "model": "gen",
    }
    due = clock() + 1
    res.jobs.end("j1", failure, state="timeout", overdue_at=due)
    assert sweep_once(queue, res, now=due).redispatched == ["j1"]
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["id"] == "j1.outcome"
    assert callback["args"][0]["error_code"] == "timeout"
    assert queue.app.AsyncResult(TASK_ID).state == "FAILURE"


def test_a_finished_and_dispatched_job_left_in_the_active_set_is_just_forgotten(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    created(res, callback=TASK_CALLBACK)
    res.jobs.end("j1", result().model_dump(mode="json"), state="completed", overdue_at=clock())
    res.jobs.update("j1", callbacks_dispatched="1", overdue_at=clock())  # dispatched, still listed
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is not None
    report = sweep_once(queue, res, now=clock() + 1)
    assert not report
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is None
    assert all_messages(res) == []


def test_a_cancel_that_died_before_its_outcome_is_finished_by_the_sweeper(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    """The canceller flagged the job (its messages are stale from then on) and died before it
    stopped the generation and recorded the outcome: the sweeper does the rest, once."""
    job = submitted(res, callback=TASK_CALLBACK)
    assert job.generation_id is not None
    res.jobs.request_cancel("j1", reason="changed the take")
    now = overdue_at(res, "j1") + 1

    report = sweep_once(queue, res, now=now)

    assert sim.stats()["stops"] == [int(job.generation_id)]
    assert sim.generation(job.generation_id)["status"] == "stopped"
    record = res.jobs.get("j1")
    assert record is not None and record.outcome is not None
    assert record.outcome["status"] == "cancelled" and record.outcome["error_code"] == "cancelled"
    assert record.outcome["message"] == "changed the take; the generation was stopped on GEN"
    assert record.outcome["generation_stopped"] is True
    assert record.outcome["generation_id"] == job.generation_id
    assert record.callbacks_dispatched and res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is None
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["id"] == "j1.outcome" and callback["args"] == [record.outcome]
    result = queue.app.AsyncResult(TASK_ID)
    assert result.state == "FAILURE" and isinstance(result.result, LipsyncJobFailed)
    assert result.result.failure == record.outcome
    assert queued(res, QUEUE_JOBS) == [], "a cancelled job is never re-driven"
    assert report.cancelled == ["j1"] and report.redriven == [] and report

    assert not sweep_once(queue, res, now=now + 10_000)
    assert len(queued(res, CALLBACK_QUEUE)) == 1
    assert len(sim.stats()["stops"]) == 1


def test_a_half_cancelled_job_without_a_generation_is_finished_without_asking_gen(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    created(res, callback=TASK_CALLBACK)
    res.jobs.request_cancel("j1")

    report = sweep_once(queue, res, now=overdue_at(res, "j1") + 1)

    assert report.cancelled == ["j1"]
    assert sim.stats()["counts"]["stop"] == 0
    record = res.jobs.get("j1")
    assert record is not None and record.outcome is not None
    assert record.outcome["message"] == "cancelled by request"
    assert record.outcome["generation_stopped"] is None
    assert len(queued(res, CALLBACK_QUEUE)) == 1


def test_a_cancel_in_progress_is_left_to_its_canceller_until_its_stop_is_overdue(
    res: Resources, queue: CeleryQueue, sim: GenSimulator, clock: FakeClock
) -> None:
    submitted(res, callback=TASK_CALLBACK)
    res.jobs.request_cancel("j1", overdue_at=steps.stop_due(res))
    assert not sweep_once(queue, res, now=clock() + 1)
    assert sim.stats()["counts"]["stop"] == 0
    assert sweep_once(queue, res, now=overdue_at(res, "j1")).cancelled == ["j1"]


def test_the_sweeper_retries_a_failing_stop_over_rounds_then_says_it_failed(
    redis_url: str, sim: GenSimulator, tmp_path: Path, clock: FakeClock
) -> None:
    settings = unit_settings(redis_url, sim.base_url, tmp_path / "outputs", max_transient_retries=1)
    res = Resources(settings, clock=clock)
    queue = CeleryQueue(create_app(settings))
    try:
        job = submitted(res, callback=TASK_CALLBACK)
        assert job.generation_id is not None
        res.jobs.request_cancel("j1")
        sim.add_fault(Fault(endpoint="stop", status=503, times=None))
        now = overdue_at(res, "j1") + 1

        first = sweep_once(queue, res, now=now)
        assert first.cancelled == [], "not before the transient policy gives up"
        record = res.jobs.get("j1")
        assert record is not None and record.outcome is None and record.stop_attempts == 1
        retry_at = overdue_at(res, "j1")
        assert now < retry_at <= now + settings.retry_max_delay

        second = sweep_once(queue, res, now=retry_at)
        assert second.cancelled == ["j1"]
        assert sim.stats()["counts"]["stop"] == 2
        record = res.jobs.get("j1")
        assert record is not None and record.outcome is not None
        assert record.outcome["generation_stopped"] is False
        assert "; stopping it on GEN failed: GEN HTTP 503" in record.outcome["message"]
        assert len(queued(res, CALLBACK_QUEUE)) == 1
    finally:
        res.redis.close()


def test_a_half_cancel_whose_generation_was_already_stopped_is_not_stopped_again(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    """A submit that found its job cancelled stopped the generation itself (and the canceller
    never saw the generation): the record says so, and the sweeper reports it."""
    job = submitted(res, callback=TASK_CALLBACK)
    assert job.generation_id is not None
    res.jobs.request_cancel("j1")
    steps.stop_generation(res, "j1", job.generation_id)

    assert sweep_once(queue, res, now=overdue_at(res, "j1") + 1).cancelled == ["j1"]

    assert sim.stats()["counts"]["stop"] == 1
    record = res.jobs.get("j1")
    assert record is not None and record.outcome is not None
    assert record.outcome["message"] == "cancelled by request; the generation was stopped on GEN"


# --------------------------------------------------------------------------------------------
# a round covers every overdue job
# --------------------------------------------------------------------------------------------


def test_every_overdue_job_is_swept_in_one_round_however_many(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    ids = [f"j{n:03d}" for n in range(250)]
    for job_id in ids:
        created(res, job_id)
    clock.advance(res.settings.queued_recovery + 1)

    report = sweep_once(queue, res)

    assert sorted(report.redriven) == ids
    assert len(queued(res, QUEUE_JOBS)) == 250
    assert res.jobs.overdue(clock()) == []


def test_records_that_cannot_be_swept_do_not_starve_the_others(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    """More unreadable records than a page, all due before a healthy job: the round reads past
    them (each once) and still re-drives the healthy one."""
    broken = [f"broken{n:03d}" for n in range(150)]
    for job_id in broken:
        created(res, job_id)
        res.redis.hset(JobStore.key(job_id), "job", "{not json")
    clock.advance(1)
    created(res, "healthy")
    clock.advance(res.settings.queued_recovery + 1)

    report = sweep_once(queue, res)

    assert report.redriven == ["healthy"]
    assert sorted(report.broken) == broken
    [message] = queued(res, QUEUE_JOBS)
    assert message["args"][0]["request"]["job_id"] == "healthy"
    # Still listed: an operator can look at them; they cost one read per round.
    assert set(broken) <= set(res.jobs.overdue(clock() + 1, limit=1000))


def test_a_refused_requests_undelivered_failure_is_redispatched_to_its_callback(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    """A request refused at the edge has a record without a job; its failure is owed all the same."""
    raw = request("bad-1", sheet_id=None, callback=TASK_CALLBACK)
    with pytest.raises(RequestInvalid) as invalid:
        LipsyncRequest.parse(raw)
    res.redis.set(CALLBACK_QUEUE, "not a list")  # the broker refuses the callback (WRONGTYPE)
    with pytest.raises(OperationalError):
        reject(queue, res, raw, invalid.value, task_id="t-run-1")
    res.redis.delete(CALLBACK_QUEUE)

    report = sweep_once(queue, res, now=clock() + res.settings.recovery_grace + 1)

    assert report.redispatched == ["bad-1"]
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["id"] == "bad-1.outcome" and callback["task"] == TASK_CALLBACK["task"]
    assert callback["args"][0]["status"] == "rejected"
    assert queue.app.AsyncResult("t-run-1").state == "FAILURE"
    record = res.jobs.get("bad-1")
    assert record is not None and record.callbacks_dispatched


def test_a_record_without_job_state_is_dropped_from_the_active_set(
    res: Resources, queue: CeleryQueue
) -> None:
    res.jobs.claim("ghost", task_id="t", model="gen", job=None, overdue_at=5.0)
    report = sweep_once(queue, res, now=10.0)
    assert report.skipped == 1 and not report
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "ghost") is None
    assert all_messages(res) == []


# --------------------------------------------------------------------------------------------
# webhooks owed from the outbox
# --------------------------------------------------------------------------------------------


def test_an_overdue_webhook_is_resent_with_a_new_token(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, callback={"webhook_url": "https://example.com/hook"})
    stored = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=result())
    [original] = queued(res, QUEUE_CALLBACKS)
    assert original["task"] == TASK_DELIVER_WEBHOOK
    old = original["kwargs"]["drive"]
    assert original["kwargs"] == {"msg_id": "j1.outcome", "drive": old}
    due = res.redis.zscore(WEBHOOKS_PENDING_KEY, "j1.outcome")
    assert due is not None

    assert sweep_once(queue, res, now=due - 1).resent_webhooks == []
    assert len(queued(res, QUEUE_CALLBACKS)) == 1

    report = sweep_once(queue, res, now=due + 1)
    assert report.resent_webhooks == ["j1.outcome"]
    first, resent = queued(res, QUEUE_CALLBACKS)
    assert first == original
    new = resent["kwargs"]["drive"]
    assert resent["task"] == TASK_DELIVER_WEBHOOK
    assert resent["kwargs"] == {"msg_id": "j1.outcome", "drive": new}
    assert new > old
    assert resent["id"] == f"j1.outcome.webhook.{new}"
    assert res.redis.zscore(WEBHOOKS_PENDING_KEY, "j1.outcome") == due + 1 + res.settings.queued_recovery

    assert res.outbox.claim("j1.outcome", old, due_at=due + 2) is None, "the old message is stale"
    attempt = res.outbox.claim("j1.outcome", new, due_at=due + 2)
    assert attempt is not None and attempt.payload == stored and attempt.url == "https://example.com/hook"


def test_a_webhook_whose_entry_expired_is_reported_and_dropped(res: Resources, queue: CeleryQueue) -> None:
    res.outbox.put("j9.outcome", "https://example.com/hook", {"job_id": "j9"}, due_at=5.0)
    res.redis.delete(res.outbox.key("j9.outcome"))  # what the entry's TTL does
    report = sweep_once(queue, res, now=10.0)
    assert report.expired_webhooks == ["j9.outcome"] and report.resent_webhooks == []
    assert res.redis.zscore(WEBHOOKS_PENDING_KEY, "j9.outcome") is None
    assert queued(res, QUEUE_CALLBACKS) == []


# --------------------------------------------------------------------------------------------
# the thread
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fast_sweep(
    redis_url: str, sim: GenSimulator, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Resources]:
    """This process's resources (what SweeperThread reads) set to a fast-sweeping test setup."""
    settings = unit_settings(redis_url, sim.base_url, tmp_path / "outputs", sweep_interval=0.05)
    own = Resources(settings, clock=clock)
    monkeypatch.setattr("worker.jobs.resources._resources", (os.getpid(), own))
    yield own
    own.redis.close()


def test_the_sweeper_thread_takes_the_lease_and_sweeps(fast_sweep: Resources, clock: FakeClock) -> None:
    res = fast_sweep
    queue = CeleryQueue(create_app(res.settings))
    created(res)
    clock.advance(res.settings.queued_recovery + 1)
    thread = SweeperThread(queue, holder="worker-a")
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not queued(res, QUEUE_JOBS) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        thread.stopping.set()
        thread.join(5)
    assert not thread.is_alive()
    [message] = queued(res, QUEUE_JOBS)
    assert message["task"] == TASK_SUBMIT and message["args"][0]["drive"] == 2
    record = res.jobs.get("j1")
    assert record is not None and record.redrives == 1


def test_the_sweeper_thread_does_not_sweep_while_another_holds_the_lease(
    fast_sweep: Resources, clock: FakeClock
) -> None:
    res = fast_sweep
    queue = CeleryQueue(create_app(res.settings))
    created(res)
    clock.advance(res.settings.queued_recovery + 1)
    assert try_lease(res, "worker-b", 60)
    thread = SweeperThread(queue, holder="worker-a")
    thread.start()
    time.sleep(0.3)  # several of its intervals
    thread.stopping.set()
    thread.join(5)
    assert not thread.is_alive()
    assert queued(res, QUEUE_JOBS) == []
    record = res.jobs.get("j1")
    assert record is not None and record.redrives == 0


def test_the_lease_winners_round_runs_the_extra_work_even_when_a_piece_fails(
    fast_sweep: Resources, clock: FakeClock
) -> None:
    """The app hands the round more work (the cards' settle check): each piece runs every round the
    node holds the lease, and neither a failing piece nor a failing sweep stops the others."""
    res = fast_sweep
    queue = CeleryQueue(create_app(res.settings))
    created(res)
    clock.advance(res.settings.queued_recovery + 1)
    ran: list[str] = []

    def failing(_queue: TaskQueue, _res: Resources) -> None:
        ran.append("failing")
        raise ValueError("a bug in one piece")

    def settle(_queue: TaskQueue, _res: Resources) -> None:
        ran.append("settle")

    thread = SweeperThread(queue, holder="worker-a", extra_work=(failing, settle))
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while ran.count("settle") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        thread.stopping.set()
        thread.join(5)
    assert ran.count("settle") >= 2 and ran.count("failing") >= 2  # round after round
    [message] = queued(res, QUEUE_JOBS)  # and the sweep itself re-drove the stalled job
    assert message["task"] == TASK_SUBMIT


def test_a_failing_sweep_does_not_stop_the_extra_work(
    fast_sweep: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_sweep(*_: Any, **__: Any) -> None:
        raise ValueError("a bug in the sweep")

    monkeypatch.setattr("worker.jobs.sweeper.sweep_round", broken_sweep)
    ran: list[str] = []
    thread = SweeperThread(
        CeleryQueue(create_app(fast_sweep.settings)),
        holder="worker-a",
        extra_work=(lambda _q, _r: ran.append("settle"),),
    )
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        thread.stopping.set()
        thread.join(5)
    assert len(ran) >= 2 and not thread.is_alive()
