"""The Celery-free steps of a job (create, guard, submit, poll, fetch) against real parts.

Real Redis holds the job record, the GEN simulator answers over HTTP on loopback, and one fake clock
drives both the simulator's generations and the steps' deadlines and schedules: nothing sleeps.
Assertions look at what the other side saw (the simulator's stats, the job record in Redis, the
stored file) rather than at the steps' own return values alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gensim import GenSimulator
from gensim.faults import Fault
from gensim.state import NO_FACE_REASON
from tests.unit.conftest import API_KEY, DURATIONS, FakeClock, unit_settings
from tests.unit.jobs.builders import request
from worker.errors import RequestInvalid
from worker.gen.client import idempotency_key_for
from worker.gen.errors import GenNotFound, GenRejected
from worker.jobs.errors import (
    BadUpstream,
    GenerationFailed,
    GenerationStopped,
    JobTimeout,
    UnknownGenerationStatus,
    UpstreamUnavailable,
)
from worker.jobs.models import Job, LipsyncResult
from worker.jobs.records import JobRecord
from worker.jobs.resources import Resources
from worker.jobs.schedule import stagger
from worker.jobs.steps import (
    Again,
    NothingToDo,
    bad_body_policy,
    create,
    fetch,
    guard,
    poll,
    poll_policy,
    remaining_steps,
    submit,
    transient_policy,
)
from worker.names import ACTIVE_JOBS_KEY, TASK_FETCH, TASK_POLL, TASK_SUBMIT
from worker.output.errors import OutputInvalid
from worker.retry import MAX_COUNTDOWN
from worker.settings import Settings

JOB_ID = "j1"
REQUEST: dict[str, Any] = request(JOB_ID)
#: The simulator's video resources that fail ("No face detected") and that never finish.
FAILING_VIDEO = 5099
STUCK_VIDEO = 5098
GEN_DURATION = DURATIONS["gen"]

ResFactory = Callable[..., Resources]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def make_res(redis_url: str, sim: GenSimulator, tmp_path: Path, clock: FakeClock) -> Iterator[ResFactory]:
    """Resources over variant settings (``make_res(max_bad_responses=2)``), on the same Redis,
    simulator, storage directory and clock as the ``res`` fixture."""
    made: list[Resources] = []

    def build(**overrides: Any) -> Resources:
        settings = unit_settings(redis_url, sim.base_url, tmp_path / "outputs", **overrides)
        made.append(Resources(settings, clock=clock))
        return made[-1]

    yield build
    for resources in made:
        resources.redis.close()


def new_job(res: Resources, **changes: Any) -> Job:
    return create({**REQUEST, **changes}, task_id="task-1", res=res).job


def submitted(res: Resources, **changes: Any) -> Job:
    job = new_job(res, **changes)
    return as_job(submit(job, res, record=res.jobs.get(job.job_id)))


def completed(res: Resources, clock: FakeClock, **changes: Any) -> Job:
    job = submitted(res, **changes)
    clock.advance(GEN_DURATION + 1)
    return as_job(poll(job, res))


def as_job(outcome: object) -> Job:
    assert isinstance(outcome, Job), outcome
    return outcome


def as_again(outcome: object) -> Again:
    assert isinstance(outcome, Again), outcome
    return outcome


def record_of(res: Resources, job_id: str = JOB_ID) -> JobRecord:
    record = res.jobs.get(job_id)
    assert record is not None
    return record


def requests_to(sim: GenSimulator, endpoint: str) -> list[dict[str, Any]]:
    return [r for r in sim.stats()["requests"] if r["endpoint"] == endpoint]


def stop_on_gen(sim: GenSimulator, generation_id: str) -> None:
    """Stop a generation the way someone outside this job would: GEN's own HTTP API."""
    response = requests.post(
        f"{sim.base_url}/v1/generations/{generation_id}/stop", headers={"X-API-Key": API_KEY}, timeout=5
    )
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------------------------
# retry policies
# --------------------------------------------------------------------------------------------


def test_retry_policies_come_from_the_settings(make_res: ResFactory) -> None:
    s = make_res(max_transient_retries=3, max_bad_responses=4, retry_max_delay=17.0).settings
    assert (transient_policy(s).limit, transient_policy(s).cap) == (3, 17.0)
    assert (poll_policy(s).limit, poll_policy(s).cap) == (None, 17.0)
    assert (bad_body_policy(s).limit, bad_body_policy(s).cap) == (4, 17.0)


# --------------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------------


def test_create_opens_a_queued_record_due_within_the_queued_recovery(
    res: Resources, clock: FakeClock, settings: Settings
) -> None:
    started = create(dict(REQUEST), task_id="task-1", res=res)

    assert started.created
    job = started.job
    assert (job.job_id, job.model, job.task_id, job.drive) == (JOB_ID, "gen", "task-1", 1)
    assert job.enqueued_at == clock.now
    assert job.deadline_at == clock.now + settings.job_timeout
    record = record_of(res)
    assert record.state == "queued"
    assert record.overdue_at == clock.now + settings.queued_recovery
    assert record.generation_id is None and record.outcome is None
    assert record.job is not None and Job.model_validate(record.job) == job
    assert res.redis.zscore(ACTIVE_JOBS_KEY, JOB_ID) == clock.now + settings.queued_recovery


def test_create_uses_the_default_model_when_the_request_names_none(make_res: ResFactory) -> None:
    res = make_res(default_model="sync_so")
    request = {k: v for k, v in REQUEST.items() if k != "model"}
    assert create(request, task_id="t", res=res).job.model == "sync_so"
    assert record_of(res).model == "sync_so"


def test_a_second_create_of_the_same_job_id_joins_the_first(res: Resources, clock: FakeClock) -> None:
    first = create(dict(REQUEST), task_id="task-1", res=res)
    clock.advance(120)
    second = create(dict(REQUEST), task_id="task-2", res=res)

    assert not second.created
    assert second.job == first.job  # same deadline, same caller task id, same drive token
    assert second.job.task_id == "task-1"
    assert second.record.task_id == "task-1"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sheet_id": None}, "sheet_id"),
        ({"model": "veo"}, "model"),
        ({"colour": "blue"}, "colour"),
        ({"job_id": "../etc/passwd"}, "job_id"),
    ],
)
def test_an_invalid_request_is_refused_naming_the_field_and_records_nothing(
    res: Resources, change: dict[str, Any], field: str
) -> None:
    with pytest.raises(RequestInvalid) as caught:
        create({**REQUEST, **change}, task_id="task-1", res=res)

    assert field in [e["field"] for e in caught.value.errors]
    assert res.redis.dbsize() == 0


# --------------------------------------------------------------------------------------------
# guard
# --------------------------------------------------------------------------------------------


def test_guard_returns_the_record_of_a_current_message(res: Resources) -> None:
    job = new_job(res)
    record = guard(job, res)
    assert record is not None and record.job_id == JOB_ID and record.drive == 1


def test_guard_without_a_record_lets_the_step_run(res: Resources) -> None:
    job = new_job(res)
    res.jobs.forget(JOB_ID)
    assert guard(job, res) is None


def test_guard_drops_a_message_carrying_an_older_drive_token(res: Resources, clock: FakeClock) -> None:
    job = new_job(res)
    taken = res.jobs.take_over(JOB_ID, now=clock.now, overdue_at=clock.now + 60, force=True)
    assert taken is not None and taken.drive == 2

    with pytest.raises(NothingToDo):
        guard(job, res)
    with pytest.raises(NothingToDo):
        guard(job, res, final=True)  # stale is stale, even for the last step
    record = guard(job.model_copy(update={"drive": 2}), res)
    assert record is not None and record.drive == 2


def test_guard_drops_steps_of_an_ended_job_but_hands_the_outcome_to_the_final_step(
    res: Resources, clock: FakeClock
) -> None:
    job = new_job(res)
    outcome = {"type": "lipsync.result", "status": "completed", "job_id": JOB_ID}
    res.jobs.end(JOB_ID, outcome, state="completed", overdue_at=clock.now)

    with pytest.raises(NothingToDo):
        guard(job, res)
    record = guard(job, res, final=True)
    assert record is not None and record.outcome == outcome


# --------------------------------------------------------------------------------------------
# remaining_steps
# --------------------------------------------------------------------------------------------


def test_remaining_steps_follow_the_job_along_its_chain(res: Resources, clock: FakeClock) -> None:
    fresh = new_job(res)
    assert remaining_steps(fresh) == (TASK_SUBMIT, TASK_POLL, TASK_FETCH)
    accepted = as_job(submit(fresh, res, record=record_of(res)))
    assert remaining_steps(accepted) == (TASK_POLL, TASK_FETCH)
    clock.advance(GEN_DURATION + 1)
    done = as_job(poll(accepted, res))
    assert remaining_steps(done) == (TASK_FETCH,)


# --------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------


def test_submit_posts_once_with_the_job_idempotency_key_and_records_the_generation(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    # The path asserted below is the older dialect's (the default's is covered by the GEN client's tests).
    res = make_res(gen_dialect="autocontentengine")
    settings = res.settings
    job = new_job(res)
    clock.advance(3)
    accepted = as_job(submit(job, res, record=record_of(res)))

    posts = requests_to(sim, "generate")
    assert len(posts) == 1
    assert posts[0]["method"] == "POST"
    assert posts[0]["path"] == "/v1/autocontentengine/101/cells/3000/layers/4000/generate"
    assert posts[0]["idempotency_key"] == f"lipsync-{JOB_ID}" == idempotency_key_for(JOB_ID)
    stats = sim.stats()
    assert stats["generations_created"] == 1
    (generation_id,) = stats["generations_by_key"][f"lipsync-{JOB_ID}"]
    assert accepted.generation_id == str(generation_id)
    assert accepted.gen_status == "pending"
    assert accepted.submitted_at == clock.now
    assert accepted.step_retries == 0
    record = record_of(res)
    assert record.generation_id == str(generation_id)
    assert record.state == "polling"
    assert record.gen_status == "pending"
    # The first poll now waits in the queue: due within the queued recovery plus the grace.
    assert record.overdue_at == clock.now + settings.queued_recovery + settings.recovery_grace
    assert record.job is not None and Job.model_validate(record.job) == accepted


def test_submit_sends_nothing_when_the_record_already_holds_a_generation(
    res: Resources, sim: GenSimulator, clock: FakeClock
) -> None:
    first = submitted(res)
    clock.advance(1)

    again = as_job(submit(new_job(res), res, record=record_of(res)))

    assert len(requests_to(sim, "generate")) == 1
    assert sim.stats()["generations_created"] == 1
    assert again.generation_id == first.generation_id
    assert again.gen_status == "pending"
    assert record_of(res).generation_id == first.generation_id


def test_a_resubmit_that_missed_the_record_replays_the_same_generation_on_gen(
    res: Resources, sim: GenSimulator
) -> None:
    """If a submit runs without having seen the recorded id, the Idempotency-Key still saves a
    second generation (and charge): GEN replays the first answer."""
    job = new_job(res)
    first = as_job(submit(job, res, record=None))
    second = as_job(submit(job, res, record=None))

    stats = sim.stats()
    assert [r["idempotency_key"] for r in requests_to(sim, "generate")] == [f"lipsync-{JOB_ID}"] * 2
    assert stats["generations_created"] == 1 and stats["replays"] == 1 and stats["charges"] == 1
    assert second.generation_id == first.generation_id == record_of(res).generation_id


def test_submit_of_a_job_cancelled_meanwhile_stops_the_generation_it_started(
    res: Resources, sim: GenSimulator
) -> None:
    job = new_job(res)
    res.jobs.request_cancel(JOB_ID)

    with pytest.raises(NothingToDo):  # the cancel reports the job's end
        submit(job, res, record=None)

    record = record_of(res)
    assert record.generation_id is not None
    assert sim.stats()["stops"] == [int(record.generation_id)]
    assert sim.generation(record.generation_id)["status"] == "stopped"
    assert record.generation_stopped is True
    assert record.state == "submitting", "a cancelled job does not move on to polling"


def test_submit_of_a_job_cancelled_meanwhile_retries_a_stop_that_fails(
    res: Resources, sim: GenSimulator, clock: FakeClock
) -> None:
    job = new_job(res)
    res.jobs.request_cancel(JOB_ID)
    sim.add_fault(Fault(endpoint="stop", status=503))

    with pytest.raises(NothingToDo):
        submit(job, res, record=None, sleep=clock.advance)

    record = record_of(res)
    assert record.generation_id is not None
    assert sim.stats()["counts"]["stop"] == 2
    assert sim.generation(record.generation_id)["status"] == "stopped"
    assert record.generation_stopped is True


def test_a_rate_limited_submit_comes_back_after_retry_after(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = new_job(res)
    sim.add_fault(Fault(endpoint="generate", status=429, retry_after=7))

    again = as_again(submit(job, res, record=record_of(res)))

    assert 7.0 <= again.countdown < 8.0
    assert again.job.step_retries == 1
    assert again.job.generation_id is None
    record = record_of(res)
    assert record.last_error is not None and "HTTP 429" in record.last_error
    assert record.generation_id is None
    assert record.overdue_at == pytest.approx(clock.now + again.countdown + settings.recovery_grace)
    assert sim.stats()["generations_created"] == 0

    clock.advance(again.countdown)
    accepted = as_job(submit(again.job, res, record=record_of(res)))
    assert accepted.step_retries == 0
    assert len(requests_to(sim, "generate")) == 2
    assert sim.stats()["generations_created"] == 1
    assert record_of(res).generation_id == accepted.generation_id


def test_a_retry_after_beyond_the_countdown_cap_is_capped(res: Resources, sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="generate", status=503, retry_after=5000))
    again = as_again(submit(new_job(res), res, record=None))
    assert again.countdown == MAX_COUNTDOWN


def test_a_rejected_submit_raises_gens_error_without_retrying(res: Resources, sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="generate", status=422))
    with pytest.raises(GenRejected) as caught:
        submit(new_job(res), res, record=record_of(res))
    assert caught.value.status_code == 422
    assert len(requests_to(sim, "generate")) == 1
    assert record_of(res).generation_id is None


def test_submit_for_a_layer_gen_does_not_know_raises_not_found(res: Resources, sim: GenSimulator) -> None:
    job = new_job(res, layer_id=4001)  # cell 3000's only layer is 4000
    with pytest.raises(GenNotFound):
        submit(job, res, record=record_of(res))
    assert [r["status"] for r in requests_to(sim, "generate")] == [404]
    assert sim.stats()["generations_created"] == 0


def test_submit_with_inputs_gen_refuses_raises_rejected(make_res: ResFactory, sim: GenSimulator) -> None:
    # Resource ids in the body: the older dialect's (GEN checks their kinds).
    res = make_res(gen_dialect="autocontentengine")
    job = new_job(res, audio_resource_id=5002)  # a video where the audio goes
    with pytest.raises(GenRejected) as caught:
        submit(job, res, record=record_of(res))
    assert caught.value.error_code == "validation_error"
    assert [r["status"] for r in requests_to(sim, "generate")] == [422]


def test_submit_gives_up_after_max_transient_retries(make_res: ResFactory, sim: GenSimulator) -> None:
    res = make_res(max_transient_retries=2)
    sim.add_fault(Fault(endpoint="generate", status=503, times=None))
    job = new_job(res)

    for expected_retries in (1, 2):
        again = as_again(submit(job, res, record=record_of(res)))
        assert again.job.step_retries == expected_retries
        job = again.job
    with pytest.raises(UpstreamUnavailable) as caught:
        submit(job, res, record=record_of(res))

    assert "after 3 attempts" in str(caught.value)
    assert len(requests_to(sim, "generate")) == 3
    assert record_of(res).generation_id is None


def test_submit_after_the_deadline_times_out_without_calling_gen(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = new_job(res)
    clock.advance(settings.job_timeout)
    with pytest.raises(JobTimeout):
        submit(job, res, record=record_of(res))
    assert sim.stats()["counts"]["generate"] == 0


def test_a_fleet_rate_limited_submit_waits_without_calling_gen_or_counting_a_retry(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    res = make_res(gen_generate_rate=1, gen_rate_window=30.0)
    submitted(res, job_id="first")

    again = as_again(submit(new_job(res, job_id="second"), res, record=None))

    assert 0 < again.countdown <= 31.0
    assert again.job.step_retries == 0
    assert len(requests_to(sim, "generate")) == 1
    assert record_of(res, "second").generation_id is None


def test_a_fleet_rate_limit_wait_never_passes_the_jobs_deadline(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    """The limiter's window can be longer than the job has left: the job comes back at its
    deadline (and times out then), not after it."""
    res = make_res(gen_generate_rate=1, gen_rate_window=600.0, job_timeout=20.0)
    submitted(res, job_id="first")
    job = new_job(res, job_id="second")
    clock.advance(15)

    again = as_again(submit(job, res, record=None))

    assert again.countdown == pytest.approx(5.0)
    due = record_of(res, "second").overdue_at
    assert due == pytest.approx(clock.now + 5.0 + res.settings.recovery_grace)
    clock.advance(again.countdown)
    with pytest.raises(JobTimeout):
        submit(again.job, res, record=record_of(res, "second"))
    assert len(requests_to(sim, "generate")) == 1


def test_a_fleet_rate_limited_poll_never_waits_past_the_deadline(
    make_res: ResFactory, clock: FakeClock
) -> None:
    # The dialect whose submit makes no status call: the window's only one is the first poll's.
    res = make_res(
        gen_status_rate=1, gen_rate_window=600.0, job_timeout=30.0, gen_dialect="autocontentengine"
    )
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    job = as_again(poll(job, res)).job  # uses the window's only status call
    clock.advance(10)

    again = as_again(poll(job, res))

    assert again.countdown == pytest.approx(job.deadline_at - clock.now)


def test_a_redelivered_submit_keeps_the_first_submitted_at(res: Resources, clock: FakeClock) -> None:
    job = new_job(res)
    first = as_job(submit(job, res, record=record_of(res)))
    clock.advance(100)

    # The original message, redelivered: it still carries the job from before GEN accepted it.
    again = as_job(submit(job, res, record=record_of(res)))

    assert first.submitted_at is not None
    assert again.submitted_at == first.submitted_at
    recorded = record_of(res).job
    assert recorded is not None and Job.model_validate(recorded).submitted_at == first.submitted_at


# --------------------------------------------------------------------------------------------
# poll
# --------------------------------------------------------------------------------------------


def test_poll_follows_the_generation_from_pending_to_completed(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = submitted(res)
    assert job.generation_id is not None

    pending = as_again(poll(job, res))
    assert pending.job.gen_status == "pending" and pending.job.polls == 1
    assert record_of(res).gen_status == "pending"

    clock.advance(0.2 * GEN_DURATION + 0.5)
    processing = as_again(poll(pending.job, res))
    assert processing.job.gen_status == "processing" and processing.job.polls == 2
    assert record_of(res).gen_status == "processing"

    clock.advance(GEN_DURATION)
    done = as_job(poll(processing.job, res))

    gen = sim.generation(job.generation_id)
    assert gen["status"] == "completed"
    assert done.gen_status == "completed"
    assert done.generation_completed_at == clock.now
    assert done.output_resource is not None
    assert done.output_resource.url == gen["output_url"]
    assert done.output_resource.id == str(gen["output_resource_id"])
    assert done.execution_cost == gen["execution_cost"]
    assert done.polls == 3
    assert len(requests_to(sim, "get_generation")) == 3
    record = record_of(res)
    assert record.gen_status == "completed" and record.polls == 3
    assert record.overdue_at == clock.now + settings.queued_recovery + settings.recovery_grace


def test_poll_countdowns_follow_the_schedule_and_stop_at_the_deadline(
    make_res: ResFactory, clock: FakeClock
) -> None:
    res = make_res(
        poll_initial_delay=4.0,
        poll_backoff_factor=2.0,
        poll_max_delay=20.0,
        poll_jitter=0.0,
        job_timeout=60.0,
    )
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    deadline = job.deadline_at

    countdowns = []
    for _ in range(5):
        again = as_again(poll(job, res))
        countdowns.append(again.countdown)
        record = record_of(res)
        assert record.next_poll_at == pytest.approx(clock.now + again.countdown)
        assert record.overdue_at == pytest.approx(clock.now + again.countdown + res.settings.recovery_grace)
        clock.advance(again.countdown)
        job = again.job

    # 4, 8, 16, capped at 20, shifted along by the job's stagger u: polls at once, then at
    # T(1 + u), T(2 + u), ... where T(x) = 4 * (2**x - 1); the last would overshoot the deadline,
    # and is clamped to land on it.
    u = stagger(job.job_id)
    expected = [4.0 * (2 ** (1 + u) - 1), 4.0 * 2 ** (1 + u), min(20.0, 4.0 * 2 ** (2 + u)), 20.0]
    expected.append(60.0 - sum(expected))
    assert countdowns == pytest.approx(expected)
    assert clock.now == pytest.approx(deadline)


def test_poll_countdowns_never_exceed_the_cap(make_res: ResFactory, clock: FakeClock) -> None:
    res = make_res(poll_initial_delay=5.0, poll_backoff_factor=1.5, poll_max_delay=30.0, poll_jitter=0.2)
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    for _ in range(10):
        again = as_again(poll(job, res))
        assert 0 < again.countdown <= 30.0
        clock.advance(again.countdown)
        job = again.job
    assert again.countdown >= 24.0  # capped, minus at most 20% jitter


def test_a_failed_generation_fails_the_job_with_gens_reason(res: Resources, clock: FakeClock) -> None:
    job = submitted(res, video_resource_id=FAILING_VIDEO)
    clock.advance(GEN_DURATION + 1)
    with pytest.raises(GenerationFailed) as caught:
        poll(job, res)
    assert caught.value.message == NO_FACE_REASON == "No face detected in the source video"
    assert caught.value.generation_id == job.generation_id
    assert caught.value.status == "failed" and caught.value.error_code == "generation_failed"


def test_a_generation_stopped_on_gen_ends_the_job_as_stopped(
    res: Resources, sim: GenSimulator, clock: FakeClock
) -> None:
    job = submitted(res)
    assert job.generation_id is not None
    clock.advance(1)
    stop_on_gen(sim, job.generation_id)

    with pytest.raises(GenerationStopped) as caught:
        poll(job, res)
    assert caught.value.generation_id == job.generation_id
    assert caught.value.status == "stopped"


def test_an_unknown_status_fails_loudly_and_is_recorded(res: Resources, sim: GenSimulator) -> None:
    job = submitted(res)
    assert job.generation_id is not None
    sim.add_fault(
        Fault(endpoint="get_generation", body={"id": int(job.generation_id), "status": "queued_for_review"})
    )

    with pytest.raises(UnknownGenerationStatus) as caught:
        poll(job, res)
    assert "queued_for_review" in caught.value.message
    record = record_of(res)
    assert record.gen_status == "queued_for_review"
    assert record.polls == 1


def test_poll_of_a_generation_gen_does_not_know_raises_not_found(res: Resources) -> None:
    job = new_job(res).model_copy(update={"generation_id": "777777"})
    with pytest.raises(GenNotFound):
        poll(job, res)


def test_unreadable_answers_are_retried_up_to_max_bad_responses(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res(max_bad_responses=2, max_transient_retries=0)
    job = submitted(res)
    sim.add_fault(Fault(endpoint="get_generation", malformed=True, times=None))

    for expected in (1, 2):
        again = as_again(poll(job, res))
        assert again.job.bad_responses == expected
        assert 0 < again.countdown <= job.deadline_at - clock.now
        last_error = record_of(res).last_error
        assert last_error is not None and "get_generation" in last_error
        job = again.job
    with pytest.raises(BadUpstream) as caught:
        poll(job, res)

    assert "3 times" in caught.value.message
    assert caught.value.generation_id == job.generation_id
    assert len(requests_to(sim, "get_generation")) == 3


def test_unreadable_answers_are_counted_over_the_whole_job(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    """A readable answer in between does not reset the count: schema drift cannot poll forever."""
    res = make_res(max_bad_responses=1)
    job = submitted(res)
    sim.add_fault(Fault(endpoint="get_generation", malformed=True))
    job = as_again(poll(job, res)).job
    job = as_again(poll(job, res)).job  # readable: pending
    assert job.bad_responses == 1 and job.step_retries == 0
    sim.add_fault(Fault(endpoint="get_generation", malformed=True))
    with pytest.raises(BadUpstream):
        poll(job, res)


def test_transient_errors_while_polling_are_not_count_limited(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res(max_transient_retries=2)
    job = submitted(res)
    sim.add_fault(Fault(endpoint="get_generation", status=503, times=5))

    for expected in range(1, 6):
        again = as_again(poll(job, res))
        assert again.job.step_retries == expected
        clock.advance(again.countdown)
        job = again.job
    assert [r["status"] for r in requests_to(sim, "get_generation")] == [503] * 5
    last_error = record_of(res).last_error
    assert last_error is not None and "HTTP 503" in last_error

    clock.advance(GEN_DURATION)
    done = as_job(poll(job, res))
    assert done.output_resource is not None and done.step_retries == 0


def test_transient_errors_while_polling_never_wait_past_the_deadline(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    clock.advance(settings.job_timeout - 3)
    sim.add_fault(Fault(endpoint="get_generation", status=503, retry_after=120))

    again = as_again(poll(job, res))

    assert again.countdown == pytest.approx(3.0)
    assert record_of(res).overdue_at == pytest.approx(clock.now + 3.0 + settings.recovery_grace)


def test_a_rate_limited_poll_honours_retry_after_within_the_deadline(
    res: Resources, sim: GenSimulator, clock: FakeClock
) -> None:
    job = submitted(res)
    sim.add_fault(Fault(endpoint="get_generation", status=429, retry_after=12))
    again = as_again(poll(job, res))
    assert 12.0 <= again.countdown < 13.0


def test_past_the_deadline_poll_stops_the_generation_and_times_out(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    generation_id = job.generation_id
    assert generation_id is not None
    job = as_again(poll(job, res)).job
    polls_before = len(requests_to(sim, "get_generation"))
    clock.advance(settings.job_timeout)

    with pytest.raises(JobTimeout) as caught:
        poll(job, res)

    assert sim.stats()["stops"] == [int(generation_id)]
    gen = sim.generation(generation_id)
    assert gen["status"] == "stopped" and gen["stopped_by_api"]
    assert len(requests_to(sim, "get_generation")) == polls_before  # no status read past the deadline
    assert caught.value.generation_id == generation_id
    assert caught.value.status == "timeout"
    assert "last status: pending" in caught.value.message
    assert caught.value.message.endswith("; the generation was stopped on GEN")
    assert record_of(res).generation_stopped is True


def test_a_stop_that_fails_once_at_the_deadline_is_retried_until_gen_stops_it(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    assert job.generation_id is not None
    clock.advance(settings.job_timeout)
    sim.add_fault(Fault(endpoint="stop", status=503))

    again = as_again(poll(job, res))
    assert again.job.step_retries == 1
    last_error = record_of(res).last_error
    assert last_error is not None and "HTTP 503" in last_error
    assert sim.generation(job.generation_id)["status"] in ("pending", "processing")

    clock.advance(again.countdown)
    with pytest.raises(JobTimeout) as caught:
        poll(again.job, res)

    assert sim.stats()["counts"]["stop"] == 2
    assert sim.generation(job.generation_id)["status"] == "stopped"
    assert caught.value.message.endswith("; the generation was stopped on GEN")
    assert record_of(res).generation_stopped is True


def test_a_stop_that_keeps_failing_at_the_deadline_is_reported_as_failed(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res(max_transient_retries=1)
    job = submitted(res, video_resource_id=STUCK_VIDEO)
    assert job.generation_id is not None
    clock.advance(res.settings.job_timeout)
    sim.add_fault(Fault(endpoint="stop", status=503, times=None))

    again = as_again(poll(job, res))
    clock.advance(again.countdown)
    with pytest.raises(JobTimeout) as caught:
        poll(again.job, res)

    assert sim.stats()["counts"]["stop"] == 2, "the policy's one retry, then the truth"
    assert sim.generation(job.generation_id)["status"] in ("pending", "processing")
    message = caught.value.message
    assert "was stopped" not in message
    assert "; stopping it on GEN failed: " in message and "HTTP 503" in message
    record = record_of(res)
    assert record.generation_stopped is False
    assert record.stop_error is not None and "HTTP 503" in record.stop_error


def test_a_generation_that_failed_on_gen_at_the_deadline_is_reported_as_gen_says(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    """GEN refuses the stop because the generation just failed: the job fails with GEN's reason,
    not as "stopped"."""
    res = make_res(job_timeout=GEN_DURATION)
    job = submitted(res, video_resource_id=FAILING_VIDEO)
    job = as_again(poll(job, res)).job
    clock.advance(GEN_DURATION)  # the deadline, and the moment GEN fails it

    with pytest.raises(GenerationFailed) as caught:
        poll(job, res)

    assert caught.value.message == NO_FACE_REASON
    assert len(sim.stats()["stops"]) == 1, "the stop was tried, and refused"


def test_a_transient_error_reading_the_status_after_a_refused_stop_is_retried(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res(job_timeout=GEN_DURATION)
    job = submitted(res)
    job = as_again(poll(job, res)).job
    clock.advance(GEN_DURATION)  # the deadline, and the moment GEN completes
    sim.add_fault(Fault(endpoint="get_generation", status=503))

    again = as_again(poll(job, res))
    assert again.job.step_retries == 1

    clock.advance(again.countdown)
    done = as_job(poll(again.job, res))
    assert done.output_resource is not None


def test_a_generation_completed_at_the_last_second_is_still_delivered(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res(job_timeout=GEN_DURATION)
    job = submitted(res)
    generation_id = job.generation_id
    assert generation_id is not None
    job = as_again(poll(job, res)).job
    clock.advance(GEN_DURATION)  # the deadline, and the moment GEN completes

    done = as_job(poll(job, res))

    assert sim.stats()["stops"] == [int(generation_id)]  # the stop was tried, and refused
    gen = sim.generation(generation_id)
    assert gen["status"] == "completed" and not gen["stopped_by_api"]
    assert done.output_resource is not None and done.output_resource.url == gen["output_url"]
    assert done.generation_completed_at == clock.now
    # Recorded like any completion: the record knows the output, and the fetch is due.
    record = record_of(res)
    assert record.gen_status == "completed"
    assert record.job is not None and Job.model_validate(record.job).output_resource is not None
    due = clock.now + res.settings.queued_recovery + res.settings.recovery_grace
    assert record.overdue_at == pytest.approx(due)
    result = fetch(done, res)
    assert isinstance(result, LipsyncResult)


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def test_fetch_stores_gens_output_and_reports_its_timings(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = completed(res, clock, metadata={"shot": 7})
    assert job.generation_id is not None and job.output_resource is not None
    clock.advance(4)

    result = fetch(job, res)

    assert isinstance(result, LipsyncResult)
    expected = sim.output_bytes(job.generation_id)
    stored = Path(str(result.output.path))
    assert stored == (settings.storage_dir / f"{JOB_ID}.mp4").resolve()
    data = stored.read_bytes()
    assert data == expected
    assert hashlib.sha256(data).hexdigest() == result.output.sha256
    assert result.output.size_bytes == len(data) == sim.output_size
    assert result.output.content_type == "video/mp4"
    assert result.output.uri == stored.as_uri()
    assert result.output.url == job.output_resource.url
    assert result.output.id == job.output_resource.id
    assert (result.job_id, result.generation_id, result.model) == (JOB_ID, job.generation_id, "gen")
    assert result.execution_cost == job.execution_cost == 100.0
    assert result.polls == job.polls == 1
    assert result.metadata == {"shot": 7}
    timings = result.timings
    assert timings.enqueued_at == job.enqueued_at
    assert timings.submitted_at == job.submitted_at
    assert timings.generation_completed_at == job.generation_completed_at
    assert timings.finished_at == clock.now
    assert timings.total_seconds == pytest.approx(GEN_DURATION + 1 + 4)
    assert timings.generation_seconds == pytest.approx(GEN_DURATION + 1)
    assert timings.fetch_seconds == 0.0  # the fake clock did not move during the download
    assert len(requests_to(sim, "cdn")) == 1
    assert record_of(res).state == "fetching"


def test_a_broken_download_is_fetched_again(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = completed(res, clock)
    assert job.generation_id is not None
    sim.add_fault(Fault(endpoint="cdn", reset_after_bytes=1000))

    again = as_again(fetch(job, res))

    assert again.job.step_retries == 1
    last_error = record_of(res).last_error
    assert last_error is not None and "broke off" in last_error
    assert not (settings.storage_dir / f"{JOB_ID}.mp4").exists()
    assert list(res.storage.staging_dir().glob("*.partial")) == []

    clock.advance(again.countdown)
    result = fetch(again.job, res)
    assert isinstance(result, LipsyncResult)
    assert Path(str(result.output.path)).read_bytes() == sim.output_bytes(job.generation_id)
    assert len(requests_to(sim, "cdn")) == 2


def test_fetch_gives_up_after_max_transient_retries(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    res = make_res(max_transient_retries=1)
    job = completed(res, clock)
    sim.add_fault(Fault(endpoint="cdn", status=503, times=None))

    job = as_again(fetch(job, res)).job
    with pytest.raises(UpstreamUnavailable):
        fetch(job, res)
    assert len(requests_to(sim, "cdn")) == 2


def test_an_output_that_is_not_a_video_is_refused(
    res: Resources, sim: GenSimulator, clock: FakeClock, settings: Settings
) -> None:
    job = completed(res, clock)
    sim.add_fault(Fault(endpoint="cdn", body={"error": "this is not a video"}))

    with pytest.raises(OutputInvalid):
        fetch(job, res)
    assert len(requests_to(sim, "cdn")) == 1  # not retried
    assert not (settings.storage_dir / f"{JOB_ID}.mp4").exists()


def test_gen_asking_to_slow_down_never_fails_a_submit(
    make_res: ResFactory, sim: GenSimulator, clock: FakeClock
) -> None:
    # More 429s in a row than the transient retries allow: the submit keeps coming back (backing
    # off) and GEN starts the generation once it stops refusing.
    res = make_res(max_transient_retries=2)
    job = new_job(res)
    sim.add_fault(Fault(endpoint="generate", status=429, times=5))
    for _ in range(5):
        again = as_again(submit(job, res, record=record_of(res)))
        assert again.countdown <= job.deadline_at - clock.now
        clock.advance(again.countdown)
        job = again.job
    accepted = as_job(submit(job, res, record=record_of(res)))
    assert accepted.generation_id is not None
    assert sim.stats()["generations_created"] == 1
