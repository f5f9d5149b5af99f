"""The JSON contract of a batch: what callers send (``lipsync.run_batch``'s ``batch``) and the one
batch callback they get back (``lipsync.batch_result``, or ``lipsync.batch_failure`` when the batch
was refused).

Each item is a :class:`~worker.jobs.models.LipsyncRequest`, validated exactly as a single job's, and
becomes a job of its own (id ``<batch_id>.<index>`` unless the item names one).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.callbacks.models import Callback
from worker.errors import LipsyncJobFailed, RequestInvalid, describe_validation_error
from worker.jobs.models import SCHEMA_VERSION, JobId, LipsyncRequest

#: Longest batch id: its items' job ids (``<batch_id>.<index>``) must stay valid job ids.
MAX_BATCH_ID = 100


class BatchInvalid(RequestInvalid):
    """A batch failed validation: nothing of it runs. ``errors`` lists ``{"field", "message"}``
    (batch fields) and ``{"index", "field", "message"}`` (an item's field) entries; ``code`` is
    ``validation_error``, ``empty_batch`` or ``batch_too_large``."""

    def __init__(self, errors: list[dict[str, Any]], code: str = "validation_error") -> None:
        self.code = code
        super().__init__(errors)

    @staticmethod
    def _describe(errors: list[dict[str, Any]]) -> str:
        parts = [
            (f"items[{e['index']}].{e['field']}" if "index" in e else str(e["field"])) + f": {e['message']}"
            for e in errors[:20]
        ]
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        return "invalid lipsync batch: " + "; ".join(parts) + more

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors, self.code))


class BatchRequest(BaseModel):
    """A batch as a caller hands it to us. Items are validated one by one (:meth:`parse`)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    #: The caller's id for this batch; generated when absent. Enqueuing the same id twice joins it.
    batch_id: JobId = Field(default_factory=lambda: uuid.uuid4().hex)
    items: list[LipsyncRequest]
    #: Where the one batch callback goes (each item's own callback, if it has one, fires as well).
    callback: Callback | None = None
    #: Passed through untouched into the batch callback.
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: Items of this batch in flight at once; absent: LIPSYNC_BATCH_MAX_PARALLEL.
    max_parallel: int | None = Field(default=None, ge=1, le=1000)

    def job_ids(self) -> list[str]:
        return [item.job_id for item in self.items]

    @classmethod
    def parse(cls, data: Any, *, max_items: int, default_id: str | None = None) -> BatchRequest:
        """Validate a raw batch: every item with :meth:`LipsyncRequest.parse`'s rules, each error
        reported with its item's index, and the batch's own fields. An item without a job id gets
        ``<batch_id>.<index>``.

        Raises:
            BatchInvalid: anything is wrong (all problems at once, items by index).
        """
        if not isinstance(data, dict):
            raise BatchInvalid([{"field": "batch", "message": "must be a JSON object"}])
        raw_items = data.get("items")
        if not isinstance(raw_items, list):
            raise BatchInvalid([{"field": "items", "message": "must be a list of requests"}])
        if not raw_items:
            raise BatchInvalid(
                [{"field": "items", "message": "a batch needs at least one item"}], "empty_batch"
            )
        if len(raw_items) > max_items:
            message = f"{len(raw_items)} items; at most {max_items} (LIPSYNC_MAX_BATCH_ITEMS)"
            raise BatchInvalid([{"field": "items", "message": message}], "batch_too_large")
        errors: list[dict[str, Any]] = []
        try:
            head = _BatchFields.model_validate({k: v for k, v in data.items() if k != "items"})
        except ValidationError as exc:
            errors.extend(describe_validation_error(exc))
            head = None
        batch_id = head.batch_id if head and head.batch_id else default_id or uuid.uuid4().hex
        if len(batch_id) > MAX_BATCH_ID:
            # Item job ids are <batch_id>.<index>, and a job id has at most 128 characters.
            message = f"at most {MAX_BATCH_ID} characters (items' job ids are <batch_id>.<index>)"
            raise BatchInvalid([{"field": "batch_id", "message": message}])
        items: list[LipsyncRequest] = []
        seen: dict[str, int] = {}
        for index, raw in enumerate(raw_items):
            if isinstance(raw, dict) and raw.get("job_id") is None:
                raw = {**raw, "job_id": f"{batch_id}.{index}"}
            try:
                item = LipsyncRequest.parse(raw)
            except RequestInvalid as exc:
                errors.extend({"index": index, **e} for e in exc.errors)
                continue
            if item.job_id in seen:
                message = f"job id {item.job_id!r} is also item {seen[item.job_id]}'s"
                errors.append({"index": index, "field": "job_id", "message": message})
                continue
            seen[item.job_id] = index
            items.append(item)
        if errors or head is None:
            raise BatchInvalid(errors)
        return cls(
            batch_id=batch_id,
            items=items,
            callback=head.callback,
            metadata=head.metadata,
            max_parallel=head.max_parallel,
        )


class _BatchFields(BaseModel):
    """The batch's own fields, validated apart from its items (so both report their errors)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    batch_id: JobId | None = None
    callback: Callback | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    max_parallel: int | None = Field(default=None, ge=1, le=1000)


class BatchResult(BaseModel):
    """The batch callback: every item is terminal. ``items`` in the batch's order, each the item's
    result (``lipsync.result``) or failure (``lipsync.failure``) as its own callback got it."""

    schema_version: int = SCHEMA_VERSION
    type: Literal["lipsync.batch_result"] = "lipsync.batch_result"
    batch_id: str
    #: ``completed``: every item ran to its end (some may have failed: see ``counts``).
    #: ``cancelled``: the batch was cancelled; items that had not started are ``cancelled``.
    status: Literal["completed", "cancelled"]
    total: int
    #: Items by their outcome status (``completed``, ``failed``, ``cancelled``...).
    counts: dict[str, int]
    items: list[dict[str, Any]]
    created_at: float
    finished_at: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class BatchFailure(BaseModel):
    """A batch refused as a whole (nothing of it ran): the batch callback of an invalid batch."""

    schema_version: int = SCHEMA_VERSION
    type: Literal["lipsync.batch_failure"] = "lipsync.batch_failure"
    batch_id: str
    status: Literal["rejected"] = "rejected"
    #: ``validation_error``, ``empty_batch`` or ``batch_too_large``.
    error_code: str
    message: str
    #: ``{"field", "message"}`` for the batch's fields, ``{"index", "field", "message"}`` for items.
    errors: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class BatchRejected(LipsyncJobFailed):
    """Raised by ``lipsync.run_batch`` for a batch refused whole; its argument is the
    :class:`BatchFailure` JSON (so the task's ``exc_message`` carries it)."""

    def __str__(self) -> str:
        f = self.failure
        return f"lipsync batch {f.get('batch_id')} rejected ({f.get('error_code')}): {f.get('message')}"
