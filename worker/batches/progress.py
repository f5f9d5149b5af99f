"""Driving a batch: start its items as normal jobs, at most ``max_parallel`` at a time, learn each
item's end, and send the one batch callback when the last item ends.

Who moves a batch on:

* ``lipsync.run_batch`` records the batch and starts its first items (:func:`start`);
* each item's end: :func:`worker.jobs.outcomes.finish` calls :func:`job_ended`, which records the
  item's outcome in the batch and starts the next item (so a batch's submits enter the queue only
  as earlier items finish: a single job enqueued meanwhile waits behind at most ``max_parallel``
  of them);
* the sweeper (:func:`sweep_batches`) for a batch that stopped moving: an admission lost with a
  dying worker (items reserved but never recorded as jobs), an item end the batch never learned
  (a worker died between the job's outcome and this module), a batch result recorded but not
  dispatched.

Each item is a job with a deterministic id (``<batch_id>.<index>`` unless the item names its own),
made by :func:`worker.jobs.steps.create`, the one way a job comes to exist: an id that exists
already joins that job, and one with an outcome is not run again.

The batch callback (``<batch_id>.batch``) is dispatched by whoever records the batch's result first
(HSETNX); if that worker dies before marking it dispatched, the sweeper dispatches it again after
``LIPSYNC_RECOVERY_GRACE``, with the same id.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.batches.models import BatchRequest, BatchResult
from worker.batches.store import BatchRecord, BatchStore
from worker.callbacks.delivery import dispatch
from worker.callbacks.models import Callback
from worker.errors import RequestInvalid
from worker.jobs import steps
from worker.jobs.cancel import cancel_job
from worker.jobs.models import LipsyncFailure
from worker.jobs.resources import Resources
from worker.ops.failpoints import failpoint
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.batches")

#: The batch callback's message kind: its id is ``<batch_id>.batch``.
BATCH_KIND = "batch"
#: Overdue batches the sweeper looks at per round.
PAGE = 100


def store_of(res: Resources) -> BatchStore:
    """The batch records, in the job records' Redis, living as long as the jobs' records."""
    return BatchStore(res.redis, ttl=int(res.settings.job_timeout) + res.settings.result_ttl)


def start(queue: TaskQueue, res: Resources, batch: BatchRequest) -> bool:
    """Record the batch (unless it exists: then this joins it) and start as many items as it may
    run. Returns whether this call created the batch."""
    store = store_of(res)
    created = store.create(batch, max_parallel=res.settings.batch_max_parallel, due_at=_next_check(res))
    if created:
        log.info("batch %s: %d items, starting", batch.batch_id, len(batch.items))
    else:
        log.info("batch %s: already recorded; this enqueue joins it", batch.batch_id)
    advance(queue, res, batch.batch_id)
    return created


def job_ended(queue: TaskQueue, res: Resources, job_id: str, outcome: dict[str, Any]) -> None:
    """A job ended with ``outcome``: if it is a batch item, record it and move the batch on."""
    store = store_of(res)
    found = store.batch_of(job_id)
    if found is None:
        return
    batch_id, index = found
    store.item_ended(batch_id, index, outcome)
    advance(queue, res, batch_id)


def advance(queue: TaskQueue, res: Resources, batch_id: str) -> BatchRecord | None:
    """Start the items there is room for; finish the batch if every item ended."""
    store = store_of(res)
    while True:
        reserved = store.admit(batch_id)
        if not reserved:
            break
        failpoint("batch.after_admit")
        for index, request in zip(reserved, store.items(batch_id, reserved), strict=True):
            _start_item(queue, res, store, batch_id, index, request)
        store.due(batch_id, _next_check(res))
    record = store.get(batch_id)
    if record is not None and record.outcome is None and record.ended >= record.total:
        _finish(queue, res, store, record)
        record = store.get(batch_id)
    return record


def _start_item(
    queue: TaskQueue, res: Resources, store: BatchStore, batch_id: str, index: int, request: dict[str, Any]
) -> None:
    """Start one item as a normal job (record first, then its chain: :func:`worker.jobs.steps.start`)."""
    job_id = str(request["job_id"])
    try:
        started = steps.create(request, task_id=job_id, res=res)
    except RequestInvalid as exc:
        # Validated when the batch was recorded; a setting changed since (webhooks refused).
        failure = LipsyncFailure(
            job_id=job_id,
            status="rejected",
            error_code="validation_error",
            message=str(exc),
            errors=exc.errors,
            metadata=request.get("metadata") or {},
        )
        store.item_ended(batch_id, index, failure.model_dump(mode="json"))
        return
    if started.record.outcome is not None:
        # A job with this id ended before (a re-sent batch): its outcome is the item's, nothing reruns.
        store.item_ended(batch_id, index, started.record.outcome)
        return
    if not started.created:
        # Someone else started it (a sweeper continuing this batch, or an earlier job with this id):
        # its end reaches the batch all the same.
        return
    if store.state(batch_id) == "cancelled":
        # Cancelled while this item was being started: the cancel may have missed its job.
        cancel_job(queue, res, job_id, reason="batch cancelled")
        return
    try:
        steps.start(queue, res, started)
    except Exception:
        # The job is recorded: the sweeper sends it once its queued recovery passes.
        log.exception("batch %s: item %d (job %s) recorded but not sent", batch_id, index, job_id)


def _finish(queue: TaskQueue, res: Resources, store: BatchStore, record: BatchRecord) -> None:
    """Record the batch's result; whoever records it first dispatches the batch callback."""
    results = store.results(record.batch_id)
    items = [results[index] for index in range(record.total)]
    counts: dict[str, int] = {}
    for item in items:
        counts[str(item.get("status"))] = counts.get(str(item.get("status")), 0) + 1
    result = BatchResult(
        batch_id=record.batch_id,
        status="cancelled" if record.state == "cancelled" else "completed",
        total=record.total,
        counts=counts,
        items=items,
        created_at=record.created_at,
        finished_at=res.clock(),
        metadata=record.metadata,
    )
    # Until it is marked dispatched, the sweeper dispatches it again after the grace.
    store.due(record.batch_id, _next_check(res))
    first, stored = store.record_outcome(record.batch_id, result.model_dump(mode="json"))
    if not first:
        return  # another worker recorded it and dispatches it (or the sweeper will)
    failpoint("batch.after_result")
    log.info("batch %s: every item ended: %s", record.batch_id, counts)
    _dispatch(queue, res, store, record, stored)


def _dispatch(
    queue: TaskQueue, res: Resources, store: BatchStore, record: BatchRecord, outcome: dict[str, Any]
) -> None:
    callback = Callback.model_validate(record.callback) if record.callback else None
    dispatch(
        queue,
        res.outbox,
        callback,
        outcome,
        job_id=record.batch_id,
        kind=BATCH_KIND,
        queued_recovery=res.settings.queued_recovery,
    )
    store.mark_dispatched(record.batch_id)


def _next_check(res: Resources) -> float:
    return res.clock() + res.settings.recovery_grace


# --------------------------------------------------------------------------------------------
# cancel
# --------------------------------------------------------------------------------------------


def cancel(queue: TaskQueue, res: Resources, batch_id: str, *, reason: str) -> BatchRecord | None:
    """Cancel every unfinished item: items not started never start (recorded ``cancelled``), items
    in flight are cancelled as jobs (stopped on GEN, their own callbacks told). The batch callback
    follows, with status ``cancelled``. None: no such batch."""
    store = store_of(res)
    admitted, total = store.cancel(batch_id)
    if admitted == -1:
        return None
    if admitted >= 0:
        unstarted = range(admitted, total)
        for index, request in zip(unstarted, store.items(batch_id, unstarted), strict=True):
            failure = LipsyncFailure(
                job_id=str(request["job_id"]),
                status="cancelled",
                error_code="cancelled",
                message=f"{reason}; the batch was cancelled before this item started",
                metadata=request.get("metadata") or {},
            )
            store.item_ended(batch_id, index, failure.model_dump(mode="json"))
        _cancel_in_flight(queue, res, store, batch_id, range(admitted), reason=reason)
    return advance(queue, res, batch_id)


def _cancel_in_flight(
    queue: TaskQueue, res: Resources, store: BatchStore, batch_id: str, started: range, *, reason: str
) -> None:
    ended = store.ended_indexes(batch_id)
    for index, job_id in _open_items(store, batch_id, started, ended):
        outcome = cancel_job(queue, res, job_id, reason=reason)
        if outcome is None:
            # Reserved but its job never recorded (its admitter died): it never ran.
            failure = LipsyncFailure(
                job_id=job_id, status="cancelled", error_code="cancelled", message=reason
            )
            outcome = failure.model_dump(mode="json")
        store.item_ended(batch_id, index, outcome)


def _open_items(store: BatchStore, batch_id: str, started: range, ended: set[int]) -> list[tuple[int, str]]:
    indexes = [index for index in started if index not in ended]
    return list(zip(indexes, store.job_ids_at(batch_id, indexes), strict=True))


# --------------------------------------------------------------------------------------------
# the sweeper's part
# --------------------------------------------------------------------------------------------


def sweep_batches(queue: TaskQueue, res: Resources, now: float) -> list[str]:
    """Continue every batch that stopped moving (see the module's docstring). Returns their ids."""
    store = store_of(res)
    continued = []
    for batch_id in store.overdue(now, limit=PAGE):
        try:
            if _continue(queue, res, store, batch_id):
                continued.append(batch_id)
        except Exception:
            log.exception("batch %s: could not continue it; will try again next round", batch_id)
    return continued


def _continue(queue: TaskQueue, res: Resources, store: BatchStore, batch_id: str) -> bool:
    record = store.get(batch_id)
    if record is None:
        store.forget_active(batch_id)
        return False
    if record.outcome is not None:
        if not record.dispatched:
            log.warning("batch %s: result recorded but its callback not confirmed; dispatching", batch_id)
            _dispatch(queue, res, store, record, record.outcome)
            return True
        store.forget_active(batch_id)
        return False
    moved = False
    ended = store.ended_indexes(batch_id)
    for index, job_id in _open_items(store, batch_id, range(record.admitted), ended):
        job = res.jobs.get(job_id)
        if job is None:
            log.warning(
                "batch %s: item %d (job %s) admitted, never started; starting it", batch_id, index, job_id
            )
            (request,) = store.items(batch_id, range(index, index + 1))
            _start_item(queue, res, store, batch_id, index, request)
            moved = True
        elif job.outcome is not None:
            log.warning("batch %s: item %d (job %s) ended unnoticed; recording it", batch_id, index, job_id)
            store.item_ended(batch_id, index, job.outcome)
            moved = True
        elif record.state == "cancelled":
            # A cancel that died half-way: its end reaches the batch through finish.
            cancel_job(queue, res, job_id, reason="batch cancelled")
            moved = True
    store.due(batch_id, _next_check(res))
    advance(queue, res, batch_id)
    return moved
