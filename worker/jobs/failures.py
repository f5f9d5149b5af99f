"""Turning what ended a job into its failure JSON, and refusing a request that could not start."""

from __future__ import annotations

import logging
import re
import traceback
from typing import Any

from pydantic import TypeAdapter, ValidationError

from worker.callbacks.models import Callback
from worker.errors import ConfigurationError, RequestInvalid
from worker.gen.errors import GenAPIError
from worker.jobs.errors import FailureStatus, JobError
from worker.jobs.models import Job, JobId, LipsyncFailure, Timings
from worker.jobs.outcomes import finish
from worker.jobs.resources import Resources
from worker.output.errors import OutputError, StorageError
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.failures")

_JOB_ID: TypeAdapter[str] = TypeAdapter(JobId)


def failure_for(
    exc: BaseException, *, job: Job | None, job_id: str, metadata: dict[str, Any], now: float
) -> LipsyncFailure:
    """The failure JSON for an exception that ended a job. Messages never carry secrets: the
    errors of this package word their own messages; any other exception is reported by its type
    only, and its text goes to the worker's log (scrubbed, see :func:`scrub_urls`)."""
    status: FailureStatus = "failed"
    errors = None
    generation_id = job.generation_id if job else None
    if isinstance(exc, RequestInvalid):
        status, code, message, errors = "rejected", "validation_error", str(exc), exc.errors
    elif isinstance(exc, JobError):
        status, code, message = exc.status, exc.error_code, exc.message
        generation_id = exc.generation_id or generation_id
        if isinstance(exc.__cause__, StorageError):
            # The steps give up on every transient error alike (UpstreamUnavailable); when what
            # kept failing was our own storage, GEN is not to blame and operators must look at
            # the disk or bucket instead.
            code = exc.__cause__.error_code
    elif isinstance(exc, GenAPIError):
        # GEN refused the job (401/403/404/422): nothing ran, nothing was charged.
        status = "rejected" if generation_id is None else "failed"
        code = exc.error_code or (f"http_{exc.status_code}" if exc.status_code else "gen_error")
        message = str(exc)
    elif isinstance(exc, OutputError):
        code, message = exc.error_code, str(exc)
    elif isinstance(exc, ConfigurationError):
        code, message = "configuration_error", str(exc)
    else:
        # An exception's text can hold a signed URL or a local path, and the failure goes to
        # callers and monitors: they get the type, the worker's log gets the rest.
        code = "internal_error"
        message = f"internal error ({type(exc).__name__}); details are in the worker's log"
        log.error("job %s ended by an unexpected error:\n%s", job_id, scrub_urls(_traceback_of(exc)))
    return LipsyncFailure(
        job_id=job_id,
        generation_id=generation_id,
        status=status,
        error_code=code,
        message=message,
        errors=errors,
        model=job.model if job else None,
        timings=Timings.of(job, now) if job else None,
        metadata=metadata,
    )


#: A URL in free text: scheme, optional credentials, host and path, optional query or fragment.
_URL = re.compile(
    r"""(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:[^@/\s'"]*@)?(?P<place>[^?#\s'"]*)(?P<query>[?#][^\s'"]*)?"""
)


def scrub_urls(text: str) -> str:
    """``text`` with every URL's credentials and query string (signatures, tokens) removed; the
    scheme, host and path stay, since they are what an operator looks for."""

    def scrub(match: re.Match[str]) -> str:
        query = "?[redacted]" if match.group("query") else ""
        return f"{match.group('scheme')}{match.group('place')}{query}"

    return _URL.sub(scrub, text)


def _traceback_of(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


def reject(queue: TaskQueue, res: Resources, raw: Any, exc: BaseException, *, task_id: str) -> dict[str, Any]:
    """End a request that could not start (``lipsync.run`` refused it) and tell its callback, if one
    can be read. Returns the failure JSON; the job is findable by the request's job id when that id
    is valid, else by the task id."""
    raw_dict = raw if isinstance(raw, dict) else {}
    job_id = _job_id_of(raw_dict) or task_id
    raw_metadata = raw_dict.get("metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    failure = failure_for(exc, job=None, job_id=job_id, metadata=metadata, now=res.clock())
    existing = res.jobs.get(job_id)
    if existing is not None and existing.task_id != task_id:
        # The id belongs to another, valid job: report this request's failure without touching it.
        return failure.model_dump(mode="json")
    res.jobs.claim(job_id, task_id=task_id, model="", job=None, overdue_at=0)
    stored = finish(queue, res, job_id=job_id, callback=_callback_of(raw_dict), outcome=failure)
    log.info("job %s: rejected: %s", job_id, stored.get("message"))
    return stored


def _job_id_of(raw: dict[str, Any]) -> str | None:
    """The caller's job id if it is a valid one (a failure must still be findable by it)."""
    try:
        return _JOB_ID.validate_python(raw.get("job_id"))
    except ValidationError:
        return None


def _callback_of(raw: dict[str, Any]) -> Callback | None:
    try:
        return Callback.model_validate(raw["callback"])
    except (KeyError, ValueError):
        return None
