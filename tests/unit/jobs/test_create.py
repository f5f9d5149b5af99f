"""Creating a job from what a producer sent by hand."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from worker.jobs import steps
from worker.jobs.models import Job, LipsyncRequest
from worker.jobs.resources import Resources

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
