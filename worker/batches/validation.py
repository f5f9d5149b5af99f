"""Checking a batch before any of it runs, and refusing it whole when it is not valid."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from worker.batches.models import BatchFailure, BatchInvalid, BatchRequest
from worker.batches.store import BatchStore
from worker.callbacks.delivery import dispatch
from worker.callbacks.models import Callback
from worker.callbacks.webhooks import refuse_unsigned
from worker.errors import RequestInvalid
from worker.jobs.models import JobId
from worker.jobs.resources import Resources
from worker.settings import Settings
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.batches")


def validate(data: Any, settings: Settings, *, default_id: str | None = None) -> BatchRequest:
    """The batch, every item validated as a single job's request (webhooks that could only go out
    unsigned refused too), or :class:`BatchInvalid` naming every problem, items by index."""
    batch = BatchRequest.parse(data, max_items=settings.max_batch_items, default_id=default_id)
    errors: list[dict[str, Any]] = []
    try:
        refuse_unsigned(batch.callback, settings)
    except RequestInvalid as exc:
        errors.extend(exc.errors)
    for index, item in enumerate(batch.items):
        try:
            refuse_unsigned(item.callback, settings)
        except RequestInvalid as exc:
            errors.extend({"index": index, **e} for e in exc.errors)
    if errors:
        raise BatchInvalid(errors)
    return batch


def reject(
    queue: TaskQueue, res: Resources, store: BatchStore, raw: Any, exc: BatchInvalid, *, batch_id: str
) -> dict[str, Any]:
    """Tell the batch's callback (when it can be read) that the batch was refused; nothing of it
    ran. Returns the failure JSON. A batch id that names a recorded batch is left alone: its own
    result owns the id ``<batch_id>.batch``."""
    raw_dict = raw if isinstance(raw, dict) else {}
    metadata = raw_dict.get("metadata")
    failure = BatchFailure(
        batch_id=_batch_id_of(raw_dict) or batch_id,
        error_code=exc.code,
        message=str(exc),
        errors=exc.errors,
        metadata=metadata if isinstance(metadata, dict) else {},
    ).model_dump(mode="json")
    if store.get(failure["batch_id"]) is None:
        dispatch(
            queue,
            res.outbox,
            _callback_of(raw_dict),
            failure,
            job_id=failure["batch_id"],
            kind="batch",
            queued_recovery=res.settings.queued_recovery,
        )
    log.info("batch %s: rejected: %s", failure["batch_id"], failure["message"])
    return failure


def _batch_id_of(raw: dict[str, Any]) -> str | None:
    try:
        return TypeAdapter(JobId).validate_python(raw.get("batch_id"))
    except ValidationError:
        return None


def _callback_of(raw: dict[str, Any]) -> Callback | None:
    try:
        return Callback.model_validate(raw["callback"])
    except (KeyError, ValueError):
        return None
