"""``lipsync.run_batch``: many lipsync jobs as one request, with one batch callback.

The task validates the whole batch (each item as a single job's request), records it, and starts
its first items as normal jobs; the rest start as earlier items end (:mod:`worker.batches.progress`).
It returns at once with a receipt; the batch's result goes to the batch callback
(``lipsync.batch_result``) and is readable with ``lipsync-worker status BATCH_ID``.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.base import AnyTask, retry_after_redis_error
from worker.app import app
from worker.batches import progress
from worker.batches.models import BatchInvalid, BatchRejected
from worker.batches.validation import reject, validate
from worker.celery_queue import CeleryQueue
from worker.jobs.resources import resources
from worker.names import TASK_RUN_BATCH

log = logging.getLogger("lipsync.tasks")


# No STARTED state: Celery would store it with the task's arguments, which hold callbacks.
@app.task(
    name=TASK_RUN_BATCH,
    bind=True,
    max_retries=None,
    acks_late=True,
    throws=(BatchRejected,),
    track_started=False,
)
def run_batch(self: AnyTask, batch: Any = None, batch_id: str | None = None) -> dict[str, Any]:
    """Record ``batch`` and start it, or (``batch_id`` alone: the Python helper recorded it) start a
    recorded batch. A batch id that is recorded already joins that batch: nothing runs twice.

    Raises:
        BatchRejected: the batch is not valid; nothing of it runs, and its callback (when it can be
            read) gets a ``lipsync.batch_failure`` with every problem, items by index.
    """
    res, queue = resources(), CeleryQueue(self.app)
    task_id = str(self.request.id)
    store = progress.store_of(res)
    try:
        if batch is None and batch_id is not None and store.get(batch_id) is not None:
            record = progress.advance(queue, res, batch_id)
            total = record.total if record is not None else 0
            return {"batch_id": batch_id, "total": total, "created": False}
        parsed = validate(batch, res.settings, default_id=batch_id or task_id)
        created = progress.start(queue, res, parsed)
    except BatchInvalid as exc:
        failure = reject(queue, res, store, batch, exc, batch_id=batch_id or task_id)
        _without_batch(self)
        raise BatchRejected(failure) from None
    except Exception as exc:  # a Redis blink is retried; anything else is a bug
        retry_after_redis_error(self, exc)
        raise
    _without_batch(self)
    return {"batch_id": parsed.batch_id, "total": len(parsed.items), "created": created}


def _without_batch(task: AnyTask) -> None:
    """Drop the batch from the request Celery keeps with this task's result: its callbacks' webhook
    URLs can carry receivers' tokens, and the batch record has them."""
    request = task.request
    if isinstance(request.kwargs, dict) and "batch" in request.kwargs:
        request.kwargs = {k: v for k, v in request.kwargs.items() if k != "batch"}
    if request.args:
        request.args = []
