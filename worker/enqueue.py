"""The Python helper other services use to enqueue a job and read its state.

Services that do not import this package send the same message by hand::

    celery_app.send_task("lipsync.run", kwargs={"request": {...}})

The helper adds what a raw ``send_task`` cannot: the request is validated before it is sent (a
:class:`~worker.errors.RequestInvalid` naming the field, at enqueue time), and the Celery task id
is the job id, so ``AsyncResult(job_id)`` and ``lipsync-worker status JOB_ID`` find it; and the
job record is written before the message is sent, so the job is never lost with its message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from worker.context import resources_of
from worker.jobstore import JobRecord, JobStore
from worker.models import Job, LipsyncRequest

RUN_TASK = "lipsync.run"


def enqueue(
    request: LipsyncRequest | Mapping[str, Any],
    *,
    app: Celery | None = None,
    link: Any = None,
    link_error: Any = None,
    queue: str | None = None,
) -> AsyncResult[Any]:
    """Validate and enqueue one lipsync job. ``result.get()`` returns the result JSON.

    Raises:
        RequestInvalid: the request is not valid (nothing was sent).
    """
    if app is None:
        from worker.app import app as default_app

        app = default_app
    parsed = request if isinstance(request, LipsyncRequest) else LipsyncRequest.parse(dict(request))
    options: dict[str, Any] = {"task_id": parsed.job_id}
    if queue:
        options["queue"] = queue
    if link is not None:
        options["link"] = link
    if link_error is not None:
        options["link_error"] = link_error
    payload = parsed.model_dump(mode="json", exclude_none=True)
    # Record the job before sending it: from here on the sweeper knows the job, so even a message
    # lost before any worker started it (a broker restart at the wrong moment) is re-driven.
    res = resources_of(app)
    store, settings = res.jobs, res.settings
    now = time.time()
    job = Job(
        request=parsed,
        model=parsed.model or settings.default_model,
        task_id=parsed.job_id,
        enqueued_at=now,
        deadline_at=now + settings.job_timeout,
    )
    created, _ = store.claim(
        parsed.job_id,
        task_id=parsed.job_id,
        model=job.model,
        job=job.model_dump(mode="json"),
        overdue_at=now + settings.queued_recovery,
    )
    try:
        return app.send_task(RUN_TASK, kwargs={"request": payload}, **options)
    except BaseException:
        if created:
            # The caller learns the enqueue failed: the job must not run behind its back.
            store.forget(parsed.job_id)
        raise


def job_status(job_id: str, *, store: JobStore | None = None) -> JobRecord | None:
    """The job's durable record (state, generation id, polls, outcome...), or None if unknown."""
    if store is None:
        from worker.context import resources

        store = resources().jobs
    return store.get(job_id)


def cancel(
    job_id: str, *, app: Celery | None = None, reason: str = "cancelled by request"
) -> dict[str, Any] | None:
    """Cancel a job: stop its messages and its generation on GEN, fire the failure callback once.

    Returns the job's outcome (``status: "cancelled"``, or how it ended before), or None if unknown.
    """
    from worker.cancel import cancel_job

    if app is None:
        from worker.app import app as default_app

        app = default_app
    return cancel_job(app, resources_of(app), job_id, reason=reason)
