"""Creating a job from what a producer sent by hand."""

from __future__ import annotations

from worker.jobs import steps
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
