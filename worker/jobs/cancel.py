"""Cancelling a job: invalidate its messages, stop the generation on GEN, tell the caller once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.jobs.models import Job, LipsyncFailure
from worker.jobs.outcomes import finish
from worker.jobs.records import JobRecord
from worker.jobs.resources import Resources
from worker.jobs.steps import Stop, stop_due, stop_generation
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.cancel")

DEFAULT_REASON = "cancelled by request"


def cancel_job(
    queue: TaskQueue,
    res: Resources,
    job_id: str,
    *,
    reason: str = DEFAULT_REASON,
    sleep: Callable[[float], None] = time.sleep,
    superseded_by: str | None = None,
    supersede: bool = False,
) -> dict[str, Any] | None:
    """Cancel ``job_id``. Returns the job's outcome (the cancellation, or an earlier end), or None
    if no such job is known.

    1. Bump the drive token: every queued or countdown message of the job becomes stale and does
       nothing when it runs; the queued ones are also revoked.
    2. ``POST /v1/generations/{id}/stop`` on GEN: the stop is what refunds the credits, so transient
       failures are retried (transient policy, sleeping with ``sleep`` in between). A 422 means it
       already ended there; the job is still cancelled here.
    3. Record the ``cancelled`` failure, saying whether GEN confirmed the stop, and fire the failure
       callback once; the caller's AsyncResult resolves as FAILURE.

    A canceller that dies between 1 and 3 leaves the rest to the sweeper (:func:`finish_cancel`).

    ``supersede``: the job ends ``superseded`` instead (by ``superseded_by``, if a job replaced it),
    also when the sweeper finishes the cancel (the record says so).
    """
    record = res.jobs.get(job_id)
    if record is None:
        return None
    if record.outcome is not None:
        return record.outcome
    if supersede:
        res.jobs.update(job_id, superseded=1, superseded_by=superseded_by)
    # Until the stop is due, the sweeper leaves this cancel to us; past it, we are presumed dead.
    record = res.jobs.request_cancel(job_id, reason=reason, overdue_at=stop_due(res))
    if record is None:
        return None
    job = Job.model_validate(record.job) if record.job is not None else None
    revoke = [tid for tid in (record.task_id, record.step_task_id) if tid]
    if revoke:
        queue.revoke(revoke)
    stop = None
    if record.generation_id:
        stop = stop_generation(res, job_id, record.generation_id, sleep=sleep)
    return finish_cancel(queue, res, job_id, job=job, reason=reason, stop=stop)


def finish_cancel(
    queue: TaskQueue, res: Resources, job_id: str, *, job: Job | None, reason: str, stop: Stop | None
) -> dict[str, Any]:
    """Record the ``cancelled`` failure (once), deliver it, and resolve the caller's AsyncResult.

    ``stop``: what GEN said to our stop (None: we stopped nothing). A submit that was accepting the
    generation as the cancel came stops it itself and records what GEN said: that is reported too.
    """
    latest = res.jobs.get(job_id)
    generation_id = latest.generation_id if latest is not None else None
    if stop is None and latest is not None:
        stop = _recorded_stop(latest)
    superseded = latest is not None and latest.superseded
    failure = LipsyncFailure(
        job_id=job_id,
        generation_id=generation_id,
        status="superseded" if superseded else "cancelled",
        error_code="superseded" if superseded else "cancelled",
        superseded_by=latest.superseded_by if latest is not None and superseded else None,
        message=reason if stop is None else f"{reason}; {stop.describe()}",
        model=job.model if job is not None else None,
        metadata=job.request.metadata if job is not None else {},
        generation_stopped=None if stop is None else stop.result == "stopped",
    )
    callback = job.request.callback if job is not None else None
    # finish resolves the caller's AsyncResult when it records (or first dispatches) the outcome.
    stored = finish(queue, res, job_id=job_id, callback=callback, outcome=failure)
    log.info("job %s: %s (%s)", job_id, stored.get("status"), stored.get("message"))
    return stored


def _recorded_stop(record: JobRecord) -> Stop | None:
    if record.generation_id is None or record.stop_result is None:
        return None
    return Stop(record.stop_result, record.stop_error)
