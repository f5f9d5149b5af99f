"""The Python helper other services use to enqueue a job, read its state and cancel it.

Services that do not import this package send the same message by hand::

    celery_app.send_task("lipsync.run", kwargs={"request": {...}})

The helper adds what a raw ``send_task`` cannot: the request is validated before it is sent (a
:class:`~worker.errors.RequestInvalid` naming the field, at enqueue time), and the Celery task id
is the job id, so ``AsyncResult(job_id)`` and ``lipsync-worker status JOB_ID`` find it; and the
job record is written before the message is sent (:func:`worker.jobs.steps.create`, the same
function ``lipsync.run`` uses), so the job is never lost with its message. With the record written
here, the helper sends the chain itself (:func:`worker.jobs.steps.start`) and a new job runs as
three tasks, submit → poll → fetch_output, instead of four: ``lipsync.run`` is then needed only to
join a job id that exists already.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from worker.batches.progress import cancel as cancel_batch_items
from worker.batches.progress import store_of
from worker.batches.store import BatchRecord
from worker.batches.validation import validate
from worker.celery_queue import CeleryQueue
from worker.jobs import steps
from worker.jobs.cancel import cancel_job
from worker.jobs.models import LipsyncRequest
from worker.jobs.records import JobRecord, JobStore
from worker.jobs.resources import Resources, resources
from worker.names import TASK_RUN, TASK_RUN_BATCH


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
    app = app or _default_app()
    parsed = request if isinstance(request, LipsyncRequest) else LipsyncRequest.parse(dict(request))
    options: dict[str, Any] = {"task_id": parsed.job_id}
    if queue:
        options["queue"] = queue
    if link is not None:
        options["link"] = link
    if link_error is not None:
        options["link_error"] = link_error
    # Record the job before sending it: from here on the sweeper knows the job, so even a message
    # lost before any worker started it (a broker restart at the wrong moment) is re-driven.
    res = resources_of(app)
    started = steps.create(parsed, task_id=parsed.job_id, res=res)
    # The callback is in the record now; a webhook URL (which may carry a receiver's token) stays
    # out of the message, and so out of Flower and of the result Celery stores with its arguments.
    payload = parsed.model_dump(mode="json", exclude_none=True, exclude={"callback"})
    try:
        links = {name: value for name, value in options.items() if name in ("link", "link_error")}
        if queue is None and steps.start(CeleryQueue(app), res, started, links):
            return app.AsyncResult(parsed.job_id)
        # A job id that exists (its chain running, or its outcome recorded), or lipsync.run asked
        # for on a queue of the caller's: lipsync.run joins the job or starts it.
        return app.send_task(TASK_RUN, kwargs={"request": payload}, **options)
    except BaseException:
        if started.created:
            # The caller learns the enqueue failed: the job must not run behind its back.
            res.jobs.forget(parsed.job_id)
        raise


def enqueue_batch(batch: Mapping[str, Any], *, app: Celery | None = None) -> AsyncResult[Any]:
    """Validate and enqueue a batch (``{batch_id?, items: [request, ...], callback, metadata,
    max_parallel?}``). The result's id is the batch id; it resolves to a receipt as soon as the
    batch started, and the batch's result goes to its callback (``lipsync.batch_result``) and to
    :func:`batch_status`. Enqueuing a batch id that exists joins that batch.

    Raises:
        BatchInvalid: the batch or any item is not valid (errors name items by index); nothing was
            sent.
    """
    app = app or _default_app()
    res = resources_of(app)
    parsed = validate(dict(batch), res.settings)
    # Recorded before the message is sent, callbacks included, so the message carries only the id
    # (webhook URLs stay out of Flower) and a lost message is continued by the sweeper.
    store = store_of(res)
    created = store.create(
        parsed, max_parallel=res.settings.batch_max_parallel, due_at=res.clock() + res.settings.recovery_grace
    )
    try:
        return app.send_task(TASK_RUN_BATCH, kwargs={"batch_id": parsed.batch_id}, task_id=parsed.batch_id)
    except BaseException:
        if created:
            store.forget(parsed.batch_id)  # the caller learns it failed: it must not run behind its back
        raise


def batch_status(batch_id: str, *, app: Celery | None = None) -> BatchRecord | None:
    """The batch's record (counts, in flight, its result once every item ended), or None."""
    return store_of(resources_of(app or _default_app())).get(batch_id)


def cancel_batch(
    batch_id: str, *, app: Celery | None = None, reason: str = "batch cancelled by request"
) -> BatchRecord | None:
    """Cancel every unfinished item of the batch (stopped on GEN); the batch callback follows with
    status ``cancelled``. Returns the batch's record, or None if unknown."""
    app = app or _default_app()
    return cancel_batch_items(CeleryQueue(app), resources_of(app), batch_id, reason=reason)


def job_status(job_id: str, *, store: JobStore | None = None) -> JobRecord | None:
    """The job's durable record (state, generation id, polls, outcome...), or None if unknown."""
    return (store or resources().jobs).get(job_id)


def cancel(
    job_id: str, *, app: Celery | None = None, reason: str = "cancelled by request"
) -> dict[str, Any] | None:
    """Cancel a job: stop its messages and its generation on GEN, fire the failure callback (at least
    once, under one id).

    Returns the job's outcome (``status: "cancelled"``, or how it ended before), or None if unknown.
    """
    app = app or _default_app()
    return cancel_job(CeleryQueue(app), resources_of(app), job_id, reason=reason)


def configure_card(card: Mapping[str, Any], *, app: Celery | None = None) -> dict[str, Any] | None:
    """Store a target's Lipsync card (docs/cards.md), as ``lipsync.configure_card`` does; returns it
    (its callback left out) with its target's state.

    Raises:
        RequestInvalid: the card is not valid, e.g. an unknown model (nothing was stored).
    """
    from worker.cards import flow

    res = resources_of(app or _default_app())
    return flow.show(res, flow.configure(res, dict(card)).target)


def source_changed(change: Mapping[str, Any], *, app: Celery | None = None) -> AsyncResult[Any]:
    """Tell the workers a target's sources changed (``lipsync.source_changed``); validated first.

    Raises:
        RequestInvalid: the change names neither side, or a bad field (nothing was sent).
    """
    from worker.cards.models import SourceChange
    from worker.names import TASK_SOURCE_CHANGED

    app = app or _default_app()
    change_json = SourceChange.parse(dict(change)).model_dump(mode="json", exclude_none=True)
    return app.send_task(TASK_SOURCE_CHANGED, kwargs={"change": change_json})


def resources_of(app: Celery) -> Resources:
    """The resources of a Celery app made by :func:`worker.app.create_app` with its own settings
    (a producer can hold apps for several deployments), per process like
    :func:`worker.jobs.resources.resources`."""
    settings = getattr(app, "lipsync_settings", None)
    if settings is None:
        return resources()
    cached: tuple[int, Resources] | None = getattr(app, "_lipsync_resources", None)
    if cached is None or cached[0] != os.getpid():
        cached = (os.getpid(), Resources(settings))
        app._lipsync_resources = cached  # type: ignore[attr-defined]
    return cached[1]


def _default_app() -> Celery:
    # Imported here, not at the top: building the default app reads the environment, which a
    # producer passing its own app must not depend on.
    from worker.app import app

    return app
