"""Creating a job from what a producer sent, and starting its chain."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tests.unit.conftest import queued
from worker.celery_queue import CeleryQueue
from worker.jobs import steps
from worker.jobs.models import Job, LipsyncRequest
from worker.jobs.resources import Resources
from worker.names import QUEUE_JOBS, TASK_SUBMIT

RAW = {"sheet_id": 101, "cell_id": 3000, "video_resource_id": 5001, "audio_resource_id": 6001}


def test_a_request_without_a_job_id_takes_the_task_id(res: Resources) -> None:
    started = steps.create(dict(RAW), task_id="5d0c-task-id", res=res)
    assert started.job.job_id == "5d0c-task-id" and started.created
    record = res.jobs.get("5d0c-task-id")
    assert record is not None and record.task_id == "5d0c-task-id"
    # lipsync.run redelivered: the same job, not a second one.
    again = steps.create(dict(RAW), task_id="5d0c-task-id", res=res)
    assert not again.created and again.job.job_id == "5d0c-task-id"


def test_a_job_id_the_producer_chose_is_kept(res: Resources) -> None:
    started = steps.create({**RAW, "job_id": "episode-1"}, task_id="other", res=res)
    assert started.job.job_id == "episode-1"


def test_a_job_message_from_a_newer_worker_is_read_without_the_fields_this_version_lacks() -> None:
    """A rolling upgrade: a newer worker's message (fields this version does not know, in the job's
    state and in its request) is driven here; a caller's request is still read strictly."""
    job = Job.model_validate(
        {
            "request": {**_NEWER_REQUEST, "lip_shape": None},
            "model": "gen",
            "deadline_at": 2_000_000_000.0,
            "next_poll_hint": 12.5,
        }
    )
    assert job.request.cell_id == _NEWER_REQUEST["cell_id"] and job.model == "gen"
    with pytest.raises(ValidationError, match="lip_shape"):
        LipsyncRequest.model_validate({**_NEWER_REQUEST, "lip_shape": None})


_NEWER_REQUEST: dict[str, Any] = {
    "job_id": "rolling-1",
    "sheet_id": "101",
    "cell_id": "3000",
    "video_resource_id": "5001",
    "audio_resource_id": "6001",
}


class FlakyQueue:
    """A task queue over the real one whose first ``fail`` chain sends the broker refuses."""

    def __init__(self, real: CeleryQueue, fail: int) -> None:
        self.real, self.fail, self.sent = real, fail, 0

    def send_chain(self, tasks: Any, job: dict[str, Any], **options: Any) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker refused the publish")
        self.real.send_chain(tasks, job, **options)
        self.sent += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_chain_is_started_once_and_a_failed_send_can_be_sent_again(
    res: Resources, queue: CeleryQueue
) -> None:
    started = steps.create({**RAW, "job_id": "episode-2"}, task_id="episode-2", res=res)
    flaky = FlakyQueue(queue, fail=1)
    with pytest.raises(ConnectionError):
        steps.start(flaky, res, started)
    # The refused send cleared the flag: the producer's retry sends the chain ...
    assert steps.start(flaky, res, started)
    (message,) = queued(res, QUEUE_JOBS)
    assert (message["task"], message["last_id"]) == (TASK_SUBMIT, "episode-2")
    # ... once: a second producer, a redelivered settle or lipsync.run finds it started.
    again = steps.create({**RAW, "job_id": "episode-2"}, task_id="x", res=res)
    assert not steps.start(flaky, res, again)
    assert res.jobs.mark_once("episode-2", "chain_started") is False
    assert flaky.sent == 1


def test_an_ended_job_gets_no_chain(res: Resources, queue: CeleryQueue) -> None:
    started = steps.create({**RAW, "job_id": "episode-3"}, task_id="episode-3", res=res)
    res.jobs.end("episode-3", {"job_id": "episode-3", "status": "cancelled"}, state="cancelled", overdue_at=0)
    again = steps.create({**RAW, "job_id": "episode-3"}, task_id="episode-3", res=res)
    assert again.record.outcome is not None and not started.record.outcome
    assert not steps.start(queue, res, again)
    assert queued(res, QUEUE_JOBS) == []
