"""Jobs, outcomes and queue read-backs the fast tests of the job layer share."""

from __future__ import annotations

from typing import Any

from tests.unit.conftest import queued
from worker.jobs import steps
from worker.jobs.errors import FailureStatus
from worker.jobs.models import Job, LipsyncFailure, LipsyncResult, StoredOutput, Timings
from worker.jobs.resources import Resources
from worker.names import ALL_QUEUES

#: The caller's task id (the helper makes it the job id; a raw send_task leaves it a uuid).
TASK_ID = "caller-task-1"
#: The downstream pipeline's own queue and task, for task callbacks.
CALLBACK_QUEUE = "media"
TASK_CALLBACK = {"task": "pipeline.on_lipsync", "queue": CALLBACK_QUEUE}


def request(job_id: str = "j1", **extra: Any) -> dict[str, Any]:
    """A valid request on the simulator's seeded world (layer endpoint, model gen)."""
    return {
        "job_id": job_id,
        "sheet_id": 101,
        "cell_id": 3000,
        "layer_id": 4000,
        "video_resource_id": 5001,
        "audio_resource_id": 6001,
        "model": "gen",
        **extra,
    }


def created(res: Resources, job_id: str = "j1", **extra: Any) -> Job:
    return steps.create(request(job_id, **extra), task_id=TASK_ID, res=res).job


def submitted(res: Resources, job_id: str = "j1", *, step_task_id: str | None = None, **extra: Any) -> Job:
    """A job GEN accepted (its record holds the generation id), as the submit task leaves it."""
    job = created(res, job_id, **extra)
    token = steps.CURRENT_TASK_ID.set(step_task_id)
    try:
        result = steps.submit(job, res, record=res.jobs.get(job_id))
    finally:
        steps.CURRENT_TASK_ID.reset(token)
    assert isinstance(result, Job) and result.generation_id
    return result


def failure(
    status: FailureStatus = "failed", code: str = "generation_failed", job_id: str = "j1"
) -> LipsyncFailure:
    return LipsyncFailure(
        job_id=job_id, generation_id="9001", status=status, error_code=code, message="nope", model="gen"
    )


def result(job_id: str = "j1") -> LipsyncResult:
    return LipsyncResult(
        job_id=job_id,
        generation_id="9001",
        model="gen",
        output=StoredOutput(
            uri=f"file:///out/{job_id}.mp4",
            size_bytes=1234,
            sha256="ab" * 32,
            content_type="video/mp4",
            url=f"https://cdn.example.com/{job_id}.mp4",
        ),
        polls=3,
        timings=Timings(enqueued_at=100.0, finished_at=142.5, total_seconds=42.5),
    )


def all_messages(res: Resources) -> list[dict[str, Any]]:
    """Every message waiting in our queues and the callback queue."""
    return [message for name in (*ALL_QUEUES, CALLBACK_QUEUE) for message in queued(res, name)]
