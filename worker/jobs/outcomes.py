"""Ending a job exactly once, and telling the caller.

The outcome is written to the job record with HSETNX: the first writer decides, later writers (a
redelivered step, a second chain joined to the same job) read it back. Callbacks are dispatched
until the record says they were; a crash between dispatch and that mark re-dispatches with the
same message ids, which receivers dedupe on.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.callbacks.delivery import dispatch
from worker.callbacks.models import Callback, StageEvent
from worker.jobs.models import Job, LipsyncFailure, LipsyncResult, StageEventPayload
from worker.jobs.records import JobRecord
from worker.jobs.resources import Resources
from worker.ops import metrics
from worker.ops.failpoints import failpoint
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.outcomes")


def finish(
    queue: TaskQueue,
    res: Resources,
    *,
    job_id: str,
    callback: Callback | None,
    outcome: LipsyncResult | LipsyncFailure,
) -> dict[str, Any]:
    """Record the outcome (unless one is recorded) and deliver it. Returns the recorded outcome.

    The outcome goes to the callback in the job record; ``callback`` is the caller's knowledge of
    it, used (and recorded) only when the record has none: a request refused before it became a job,
    or a job whose message carried its callback.
    """
    payload = outcome.model_dump(mode="json")
    # Until the callbacks are marked dispatched, the sweeper will re-dispatch them after the grace.
    due = res.clock() + res.settings.recovery_grace
    # One step records the outcome (or reads the recorded one) and reads where it goes and whose
    # result it is, as the record holds them then.
    ended = res.jobs.end(
        job_id,
        payload,
        state=payload["status"],
        overdue_at=due,
        callback=None if callback is None else callback.model_dump(mode="json"),
    )
    first, stored = ended.first, ended.outcome
    callback = None if ended.callback is None else Callback.model_validate(ended.callback)
    if first:
        timings = payload.get("timings") or {}
        metrics.record_job_finished(
            res.redis,
            model=payload.get("model") or "unknown",
            status=payload["status"],
            seconds=float(timings.get("total_seconds") or 0.0),
        )
    else:
        log.info(
            "job %s already ended as %s; not recording %s", job_id, stored.get("status"), payload["status"]
        )
    # Whoever recorded the outcome dispatches; a later writer only if that dispatch is unconfirmed.
    if first or not ended.callbacks_dispatched:
        dispatch(
            queue,
            res.outbox,
            callback,
            stored,
            job_id=job_id,
            kind="outcome",
            queued_recovery=res.settings.queued_recovery,
        )
        if callback is not None and callback.task:
            metrics.record_callback(res.redis, kind="task", outcome="sent")
        # The caller's AsyncResult resolves now, not only when the chain's last task returns: that
        # task can still die, or be cancelled when its worker loses the broker, after this point,
        # and nothing would run it again for a job that has its outcome.
        if ended.task_id is not None:
            queue.resolve(ended.task_id, stored)
        failpoint("finish.after_dispatch")
        res.jobs.mark_callbacks_dispatched(job_id)
    _tell_batch(queue, res, job_id, stored)
    return stored


def _tell_batch(queue: TaskQueue, res: Resources, job_id: str, outcome: dict[str, Any]) -> None:
    """If the job is a batch item, its batch records the end and starts its next item. Never fails
    the job's end: a batch that missed it is continued by the sweeper."""
    from worker.batches.progress import job_ended  # here: the batches build on this module

    try:
        job_ended(queue, res, job_id, outcome)
    except Exception:
        log.exception("job %s: could not tell its batch; the sweeper will", job_id)


def _callback_of(res: Resources, job_id: str) -> Callback | None:
    raw = res.jobs.callback(job_id)
    return None if raw is None else Callback.model_validate(raw)


def subscribed(res: Resources, job: Job, event: StageEvent, *, record: JobRecord | None) -> bool:
    """Whether the job's callback asks for ``event`` (``record`` as for :func:`emit_event`): a step
    need not read anything more for an event nobody asked for."""
    return _subscriber(res, job, event, record=record) is not None


def _subscriber(res: Resources, job: Job, event: StageEvent, *, record: JobRecord | None) -> Callback | None:
    if record is not None:
        raw = record.callback_json()
        recorded = None if raw is None else Callback.model_validate(raw)
    else:
        recorded = _callback_of(res, job.job_id)
    callback = recorded or job.request.callback
    return callback if callback is not None and event in callback.events else None


def emit_event(
    queue: TaskQueue,
    res: Resources,
    job: Job,
    event: StageEvent,
    data: dict[str, Any],
    *,
    record: JobRecord | None = None,
) -> None:
    """Send a stage event to subscribers, once per job and event. ``record``: the job's record as
    the step read it, whose callback saves reading it again (most jobs subscribe to no event)."""
    callback = _subscriber(res, job, event, record=record)
    if callback is None:
        return
    if not res.jobs.mark_once(job.job_id, f"event:{event.value}"):
        return
    payload = StageEventPayload(
        event=event,
        job_id=job.job_id,
        generation_id=job.generation_id,
        at=res.clock(),
        data=data,
        metadata=job.request.metadata,
    ).model_dump(mode="json")
    dispatch(
        queue,
        res.outbox,
        callback,
        payload,
        job_id=job.job_id,
        kind=f"event.{event.value}",
        queued_recovery=res.settings.queued_recovery,
    )
