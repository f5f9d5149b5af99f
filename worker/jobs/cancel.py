"""Cancelling a job: invalidate its messages, stop the generation on GEN, tell the caller once."""

from __future__ import annotations

import logging
from typing import Any

from worker.gen.errors import GenAPIError, GenNotStoppable
from worker.jobs.models import Job, LipsyncFailure
from worker.jobs.outcomes import finish
from worker.jobs.resources import Resources
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.cancel")


def cancel_job(
    queue: TaskQueue, res: Resources, job_id: str, *, reason: str = "cancelled by request"
) -> dict[str, Any] | None:
    """Cancel ``job_id``. Returns the job's outcome (the cancellation, or an earlier end), or None
    if no such job is known.

    1. Bump the drive token: every queued or countdown message of the job becomes stale and does
       nothing when it runs; the queued ones are also revoked.
    2. ``POST /v1/generations/{id}/stop`` on GEN (credits are refunded). A 422 means it already
       ended there; the job is still cancelled here.
    3. Record the ``cancelled`` failure and fire the failure callback once; the caller's AsyncResult
       resolves as FAILURE.
    """
    record = res.jobs.get(job_id)
    if record is None:
        return None
    if record.outcome is not None:
        return record.outcome
    record = res.jobs.request_cancel(job_id)
    assert record is not None and record.job is not None
    job = Job.model_validate(record.job)
    revoke = [tid for tid in (job.task_id, record.step_task_id) if tid]
    if revoke:
        queue.revoke(revoke)
    if record.generation_id:
        _stop_on_gen(res, job_id, record.generation_id)
    failure = LipsyncFailure(
        job_id=job_id,
        generation_id=record.generation_id,
        status="cancelled",
        error_code="cancelled",
        message=reason,
        model=job.model,
        metadata=job.request.metadata,
    )
    stored = finish(queue, res, job_id=job_id, callback=job.request.callback, outcome=failure)
    if stored.get("status") == "cancelled" and job.task_id:
        queue.resolve(job.task_id, stored)
    log.info("job %s: %s", job_id, stored.get("status"))
    return stored


def _stop_on_gen(res: Resources, job_id: str, generation_id: str) -> None:
    try:
        res.gen.stop_generation(generation_id)
    except GenNotStoppable:
        log.info("job %s: generation %s had already ended on GEN", job_id, generation_id)
    except GenAPIError as exc:
        log.warning("job %s: could not stop generation %s on GEN: %s", job_id, generation_id, exc)
