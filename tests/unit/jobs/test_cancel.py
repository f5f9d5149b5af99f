"""Cancelling a job against real parts: the GEN simulator on the fake clock, the job record on a real
Redis, the real CeleryQueue (its messages read back with :func:`queued`, results with AsyncResult)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from gensim import Fault, GenSimulator
from tests.unit.conftest import FakeClock, queued
from tests.unit.jobs.builders import (
    CALLBACK_QUEUE,
    TASK_CALLBACK,
    TASK_ID,
    all_messages,
    created,
    submitted,
)
from worker.celery_queue import CeleryQueue
from worker.errors import LipsyncJobFailed
from worker.jobs import steps
from worker.jobs.cancel import cancel_job
from worker.jobs.models import LipsyncResult, StoredOutput, Timings
from worker.jobs.outcomes import finish
from worker.jobs.resources import Resources
from worker.names import ACTIVE_JOBS_KEY


def test_cancelling_a_submitted_job_stops_it_on_gen_and_fails_the_caller(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    job = submitted(res, callback=TASK_CALLBACK, metadata={"shot": 7})
    assert job.generation_id is not None
    stored = cancel_job(queue, res, "j1", reason="the editor changed the take")

    assert stored is not None
    assert stored["status"] == "cancelled" and stored["error_code"] == "cancelled"
    assert stored["message"] == "the editor changed the take; the generation was stopped on GEN"
    assert stored["generation_stopped"] is True
    assert stored["generation_id"] == job.generation_id and stored["metadata"] == {"shot": 7}

    assert sim.stats()["stops"] == [int(job.generation_id)]
    assert sim.generation(job.generation_id)["status"] == "stopped"

    record = res.jobs.get("j1")
    assert record is not None
    assert record.state == "cancelled" and record.cancel_requested
    assert record.outcome == stored and record.callbacks_dispatched
    assert record.generation_stopped is True
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is None

    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["id"] == "j1.outcome" and callback["args"] == [stored]

    result = queue.app.AsyncResult(TASK_ID)
    assert result.state == "FAILURE"
    assert isinstance(result.result, LipsyncJobFailed)
    assert result.result.failure == stored


def test_cancel_makes_the_jobs_messages_stale(res: Resources, queue: CeleryQueue) -> None:
    job = submitted(res)
    cancel_job(queue, res, "j1")
    record = res.jobs.get("j1")
    assert record is not None and record.drive == job.drive + 1
    with pytest.raises(steps.NothingToDo):
        steps.guard(job, res)


def test_the_drive_is_bumped_before_the_outcome_is_recorded(res: Resources) -> None:
    """The first step of cancel_job: from then on the job's messages are stale even though no
    outcome is recorded yet (what a message running during the stop call sees)."""
    job = submitted(res)
    record = res.jobs.request_cancel("j1")
    assert record is not None and record.outcome is None and record.drive == job.drive + 1
    with pytest.raises(steps.NothingToDo, match="stale"):
        steps.guard(job, res)


def test_cancelling_twice_stops_and_notifies_once(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    submitted(res, callback=TASK_CALLBACK)
    first = cancel_job(queue, res, "j1", reason="first")
    second = cancel_job(queue, res, "j1", reason="second")
    assert second == first and first is not None
    assert first["message"] == "first; the generation was stopped on GEN"
    assert len(sim.stats()["stops"]) == 1
    assert len(queued(res, CALLBACK_QUEUE)) == 1


def test_cancelling_an_unknown_job_returns_none(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    assert cancel_job(queue, res, "nobody") is None
    assert res.jobs.get("nobody") is None
    assert sim.stats()["stops"] == []
    assert all_messages(res) == []


def test_cancelling_a_finished_job_returns_its_outcome_and_stops_nothing(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    job = submitted(res, callback=TASK_CALLBACK)
    assert job.generation_id is not None
    outcome = LipsyncResult(
        job_id="j1",
        generation_id=job.generation_id,
        model="gen",
        output=StoredOutput(
            uri="file:///out/j1.mp4", size_bytes=1, sha256="ab" * 32, content_type="video/mp4", url="u"
        ),
        polls=1,
        timings=Timings(enqueued_at=1.0, finished_at=2.0, total_seconds=1.0),
    )
    stored = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=outcome)
    before = res.jobs.get("j1")
    assert before is not None

    assert cancel_job(queue, res, "j1") == stored
    assert sim.stats()["stops"] == []
    after = res.jobs.get("j1")
    assert after is not None
    assert (after.drive, after.cancel_requested, after.outcome) == (before.drive, False, stored)
    assert len(queued(res, CALLBACK_QUEUE)) == 1, "only finish's own callback"


def test_a_generation_that_already_completed_on_gen_still_cancels(
    res: Resources, queue: CeleryQueue, sim: GenSimulator, clock: FakeClock
) -> None:
    job = submitted(res, callback=TASK_CALLBACK)
    assert job.generation_id is not None
    clock.advance(11)  # the "gen" model's simulated generation takes 10 s: GEN answers 422
    stored = cancel_job(queue, res, "j1")
    assert stored is not None and stored["status"] == "cancelled"
    assert stored["message"] == "cancelled by request; the generation had already ended on GEN"
    assert stored["generation_stopped"] is False
    assert sim.stats()["stops"] == [int(job.generation_id)], "the stop was asked for"
    assert sim.generation(job.generation_id)["status"] == "completed"
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["args"] == [stored]
    assert queue.app.AsyncResult(TASK_ID).state == "FAILURE"


class Sleeper:
    """The sleeps a cancel takes between stop attempts, on the fake clock (nothing really sleeps)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.advance(seconds)


def test_a_stop_that_fails_transiently_is_retried_until_gen_confirms_it(
    res: Resources, queue: CeleryQueue, sim: GenSimulator, clock: FakeClock
) -> None:
    """The stop is what refunds the credits: a 503 or a dropped connection is not the end of it."""
    job = submitted(res, callback=TASK_CALLBACK)
    assert job.generation_id is not None
    sim.add_fault(Fault(endpoint="stop", status=503, times=2))
    sleep = Sleeper(clock)

    stored = cancel_job(queue, res, "j1", reason="changed the take", sleep=sleep)

    assert sim.stats()["counts"]["stop"] == 3 and len(sleep.slept) == 2
    assert sim.generation(job.generation_id)["status"] == "stopped"
    assert stored is not None and stored["status"] == "cancelled"
    assert stored["message"] == "changed the take; the generation was stopped on GEN"
    assert stored["generation_stopped"] is True
    record = res.jobs.get("j1")
    assert record is not None and record.generation_stopped is True
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["args"] == [stored]


def test_gen_failing_the_stop_still_cancels_and_says_the_stop_failed(
    res: Resources, queue: CeleryQueue, sim: GenSimulator, clock: FakeClock
) -> None:
    job = submitted(res, callback=TASK_CALLBACK)
    assert job.generation_id is not None
    sim.add_fault(Fault(endpoint="stop", status=503, times=None))

    stored = cancel_job(queue, res, "j1", sleep=Sleeper(clock))

    assert stored is not None and stored["status"] == "cancelled"
    # Retried as far as the transient policy allows, then the truth: it may still be running.
    assert sim.stats()["counts"]["stop"] == res.settings.max_transient_retries + 1
    assert not sim.generation(job.generation_id)["stopped_by_api"]
    assert stored["message"].startswith("cancelled by request; stopping it on GEN failed: GEN HTTP 503")
    assert stored["generation_stopped"] is False
    record = res.jobs.get("j1")
    assert record is not None and record.generation_stopped is False
    assert record.stop_result == "failed" and record.stop_error is not None
    [callback] = queued(res, CALLBACK_QUEUE)
    assert callback["args"] == [stored]


def test_a_stop_gen_refuses_for_good_is_not_retried(
    res: Resources, queue: CeleryQueue, sim: GenSimulator, clock: FakeClock
) -> None:
    submitted(res)
    sim.add_fault(Fault(endpoint="stop", status=403))
    sleep = Sleeper(clock)

    stored = cancel_job(queue, res, "j1", sleep=sleep)

    assert sim.stats()["counts"]["stop"] == 1 and sleep.slept == []
    assert stored is not None and stored["generation_stopped"] is False
    assert "stopping it on GEN failed: GEN HTTP 403" in stored["message"]


def test_cancelling_a_job_not_yet_submitted_asks_gen_nothing(
    res: Resources, queue: CeleryQueue, sim: GenSimulator
) -> None:
    job = created(res, callback=TASK_CALLBACK)
    stored = cancel_job(queue, res, "j1")
    assert stored is not None and stored["status"] == "cancelled" and stored["generation_id"] is None
    assert stored["message"] == "cancelled by request" and stored["generation_stopped"] is None
    assert sim.stats()["stops"] == [] and sim.stats()["counts"]["stop"] == 0
    with pytest.raises(steps.NothingToDo):
        steps.guard(job, res)
    assert queue.app.AsyncResult(TASK_ID).state == "FAILURE"


class RevokeRecorder:
    """The real CeleryQueue, with the ids it was asked to revoke written down.

    Needed because a revoke is a pidbox broadcast (Redis PUBLISH): with no worker subscribed, the
    real queue leaves nothing a test can read back. Everything is still sent for real.
    """

    def __init__(self, real: CeleryQueue) -> None:
        self.real = real
        self.revoked: list[list[str]] = []

    def send(
        self,
        task: str,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        queue: str | None = None,
    ) -> None:
        self.real.send(task, args=args, kwargs=kwargs, task_id=task_id, queue=queue)

    def send_chain(
        self,
        tasks: Sequence[str],
        job: dict[str, Any],
        *,
        last_task_id: str | None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.real.send_chain(tasks, job, last_task_id=last_task_id, options=options)

    def resolve(self, task_id: str, outcome: dict[str, Any]) -> None:
        self.real.resolve(task_id, outcome)

    def revoke(self, task_ids: Sequence[str]) -> None:
        self.revoked.append(list(task_ids))
        self.real.revoke(task_ids)


def test_cancel_revokes_the_callers_task_and_the_current_step(res: Resources, queue: CeleryQueue) -> None:
    submitted(res, step_task_id="step-msg-7")
    recorder = RevokeRecorder(queue)
    cancel_job(recorder, res, "j1")
    assert recorder.revoked == [[TASK_ID, "step-msg-7"]]
    assert cancel_job(recorder, res, "j1") is not None
    assert recorder.revoked == [[TASK_ID, "step-msg-7"]], "nothing more for a finished job"
