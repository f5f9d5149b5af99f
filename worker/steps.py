"""What each step of a job does, without Celery: start, submit, poll, fetch, and turning errors into
failures. The tasks in :mod:`tasks.lipsync` only translate the answers into Celery terms (return,
``self.retry(countdown=...)``, or raise).

A step either returns the updated :class:`Job` (move on), returns :class:`Again` (run me again in
``countdown`` seconds with this job), or raises. What it raises decides the failure: see
:func:`failure_for`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from worker.backoff import clamp_to_deadline, poll_delay, retry_delay
from worker.context import Resources
from worker.download import download
from worker.errors import (
    ConfigurationError,
    FailureStatus,
    GenAPIError,
    GenBadResponse,
    GenerationFailed,
    GenerationStopped,
    GenNotStoppable,
    JobError,
    JobTimeout,
    OutputError,
    OutputInvalid,
    RequestInvalid,
    UnknownGenerationStatus,
)
from worker.failpoints import failpoint
from worker.gen_client import idempotency_key_for
from worker.jobstore import FETCHING, POLLING, SUBMITTING, JobRecord
from worker.models import (
    Generation,
    GenerationStatus,
    Job,
    LipsyncFailure,
    LipsyncRequest,
    LipsyncResult,
    StoredOutput,
    Timings,
)
from worker.ratelimit import Budget

log = logging.getLogger("lipsync.steps")


@dataclass(frozen=True)
class Again:
    """Run the same step again after ``countdown`` seconds, with ``job`` as its argument."""

    job: Job
    countdown: float
    reason: str


class BadUpstream(JobError):
    """GEN kept answering with bodies we cannot read."""

    error_code = "bad_upstream_response"


class UpstreamUnavailable(JobError):
    """GEN kept failing with transient errors until we gave up."""

    error_code = "gen_unavailable"


# --------------------------------------------------------------------------------------------
# start
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """What :func:`start` found: the job, and whether this run created its record."""

    job: Job
    created: bool
    record: JobRecord


def start(raw_request: Any, *, task_id: str, res: Resources) -> Started:
    """Validate the request and open its job record, or find the record of an earlier enqueue.

    Raises:
        RequestInvalid: the request is not valid; nothing was recorded.
    """
    request = LipsyncRequest.parse(raw_request)
    model = request.model or res.settings.default_model
    now = time.time()
    job = Job(
        request=request,
        model=model,
        task_id=task_id,
        enqueued_at=now,
        deadline_at=now + res.settings.job_timeout,
    )
    created, record = res.jobs.claim(
        request.job_id,
        task_id=task_id,
        model=model,
        job=job.model_dump(mode="json"),
        overdue_at=now + res.settings.queued_recovery,
    )
    if not created and record.job is not None:
        # A redelivered or duplicate run carries on with the job as recorded (same deadline,
        # same caller task id, same drive token).
        job = Job.model_validate(record.job)
    return Started(job, created, record)


#: Celery id of the task running the current step (set by tasks.lipsync), recorded so a
#: cancellation can revoke it.
CURRENT_TASK_ID: ContextVar[str | None] = ContextVar("lipsync_current_task_id", default=None)


def expect_next(job: Job, res: Resources, *, within: float, **fields: Any) -> None:
    """Record the job's state and when its next sign of life is due (plus the recovery grace)."""
    res.jobs.update(
        job.job_id,
        job=job.model_dump(mode="json"),
        overdue_at=time.time() + within + res.settings.recovery_grace,
        step_task_id=CURRENT_TASK_ID.get(),
        **fields,
    )


# --------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------


def submit(job: Job, res: Resources, *, record: JobRecord | None) -> Job | Again:
    """Start the generation on GEN, once per job.

    ``record`` is the job record as the task just read it. If it holds a generation id (a
    redelivered or duplicate submit), nothing is sent. Otherwise generate is called with an
    Idempotency-Key derived from the job id, so even a retry after an ambiguous failure (timeout
    after GEN accepted) returns the same generation instead of paying for a second one.
    """
    if record is not None and record.generation_id:
        return _submitted(job, record.generation_id, status=record.gen_status, res=res)
    if time.time() >= job.deadline_at:
        raise JobTimeout("the deadline passed before GEN accepted the generation")
    s = res.settings
    throttled = _throttle(job, res, "generate")
    if throttled is not None:
        return throttled
    expect_next(job, res, within=s.gen_connect_timeout + s.gen_read_timeout, state=SUBMITTING)
    request = job.request
    try:
        accepted = res.gen.generate_lipsync(
            sheet_id=request.sheet_id,
            cell_id=request.cell_id,
            layer_id=request.layer_id,
            model=job.model,
            video_resource_id=request.video_resource_id,
            audio_resource_id=request.audio_resource_id,
            idempotency_key=idempotency_key_for(job.job_id),
        )
    except GenAPIError as exc:
        return _transient_or_raise(job, exc, res)
    failpoint("submit.after_generate")
    generation_id = res.jobs.set_generation(job.job_id, accepted.generation_id)
    if res.jobs.cancel_requested(job.job_id):
        # Cancelled while GEN was accepting: do not leave a paid generation running.
        with contextlib.suppress(GenAPIError):
            res.gen.stop_generation(generation_id)
    return _submitted(job, generation_id, status=accepted.status, res=res)


def _submitted(job: Job, generation_id: str, *, status: str | None, res: Resources) -> Job:
    updated = job.model_copy(
        update={
            "generation_id": generation_id,
            "submitted_at": job.submitted_at or time.time(),
            "gen_status": status,
            "step_retries": 0,
        }
    )
    # The first poll now waits in the queue, where a backlog is normal.
    expect_next(updated, res, within=res.settings.queued_recovery, state=POLLING, gen_status=status)
    return updated


def _throttle(job: Job, res: Resources, budget: Budget) -> Again | None:
    """Ask the fleet-wide limiter; when over budget, come back when the window has room.

    Waiting for the limiter is not an error: it does not count as a retry.
    """
    wait = res.limiter.acquire(budget)
    if wait <= 0:
        return None
    # A little spread, so the processes that were refused do not all return at the same instant.
    countdown = wait + random.uniform(0, min(1.0, wait))
    expect_next(job, res, within=countdown)
    return Again(job, countdown, f"fleet {budget} rate limit")


def _transient_or_raise(job: Job, exc: GenAPIError | OutputError, res: Resources) -> Again:
    """Retry a retryable error with backoff, up to LIPSYNC_MAX_TRANSIENT_RETRIES; else raise it."""
    if not exc.retryable:
        raise exc
    if job.step_retries >= res.settings.max_transient_retries:
        raise UpstreamUnavailable(
            f"gave up after {job.step_retries + 1} attempts: {exc}", generation_id=job.generation_id
        ) from exc
    retry_after = getattr(exc, "retry_after", None)
    delay = retry_delay(job.step_retries, retry_after=retry_after, cap=res.settings.retry_max_delay)
    updated = job.model_copy(update={"step_retries": job.step_retries + 1})
    expect_next(updated, res, within=delay, last_error=str(exc))
    return Again(updated, delay, str(exc))


# --------------------------------------------------------------------------------------------
# poll
# --------------------------------------------------------------------------------------------


def poll(job: Job, res: Resources) -> Job | Again:
    """Read the generation's status once; move on when it completed, come back later if not.

    Raises:
        GenerationFailed, GenerationStopped, UnknownGenerationStatus, JobTimeout, BadUpstream, and
        non-retryable GenAPIErrors (e.g. 404 for the generation).
    """
    assert job.generation_id is not None, "poll needs a submitted job"
    settings = res.settings
    if time.time() >= job.deadline_at:
        return _deadline_passed(job, res)
    throttled = _throttle(job, res, "status")
    if throttled is not None:
        return throttled
    try:
        generation = res.gen.get_generation(job.generation_id)
    except GenBadResponse as exc:
        if job.bad_responses >= settings.max_bad_responses:
            raise BadUpstream(
                f"GEN answered {job.bad_responses + 1} times with unreadable bodies: {exc}",
                generation_id=job.generation_id,
            ) from exc
        again = _poll_again_after_error(
            job.model_copy(update={"bad_responses": job.bad_responses + 1}), exc, res
        )
        return again
    except GenAPIError as exc:
        if not exc.retryable:
            raise
        return _poll_again_after_error(job, exc, res)
    return _classify(job.model_copy(update={"polls": job.polls + 1, "step_retries": 0}), generation, res)


def _poll_again_after_error(job: Job, exc: GenAPIError, res: Resources) -> Again:
    # While polling, transient errors are bounded by the job's deadline, not by a count: GEN being
    # down for ten minutes should not lose a generation that is still running there.
    delay = retry_delay(job.step_retries, retry_after=exc.retry_after, cap=res.settings.retry_max_delay)
    updated = job.model_copy(update={"step_retries": job.step_retries + 1})
    countdown = clamp_to_deadline(delay, now=time.time(), deadline=job.deadline_at)
    expect_next(updated, res, within=countdown, last_error=str(exc))
    return Again(updated, countdown, str(exc))


def _classify(job: Job, generation: Generation, res: Resources) -> Job | Again:
    status = generation.status
    if status == GenerationStatus.COMPLETED:
        done = _completed(job, generation)
        # The fetch now waits in its queue.
        expect_next(done, res, within=res.settings.queued_recovery, gen_status=status, polls=job.polls)
        return done
    if status == GenerationStatus.FAILED:
        reason = generation.failed_reason or "GEN reported the generation as failed without a reason"
        raise GenerationFailed(reason, generation_id=job.generation_id)
    if status == GenerationStatus.STOPPED:
        raise GenerationStopped("the generation was stopped on GEN", generation_id=job.generation_id)
    if status in (GenerationStatus.PENDING, GenerationStatus.PROCESSING):
        s = res.settings
        delay = poll_delay(
            job.polls - 1,
            initial=s.poll_initial_delay,
            factor=s.poll_backoff_factor,
            cap=s.poll_max_delay,
            jitter=s.poll_jitter,
        )
        now = time.time()
        countdown = clamp_to_deadline(delay, now=now, deadline=job.deadline_at)
        waiting = job.model_copy(update={"gen_status": status})
        expect_next(
            waiting,
            res,
            within=countdown,
            gen_status=status,
            polls=job.polls,
            next_poll_at=repr(now + countdown),
            last_error=None,
        )
        return Again(waiting, countdown, f"GEN status {status}")
    res.jobs.update(job.job_id, gen_status=status, polls=job.polls)
    raise UnknownGenerationStatus(
        f"GEN reported an unknown generation status {status[:50]!r}", generation_id=job.generation_id
    )


def _completed(job: Job, generation: Generation) -> Job:
    videos = [r for r in generation.output_resources if (r.object_type or "video").lower() == "video"]
    if not videos:
        raise OutputInvalid("GEN reported completed but listed no output video")
    return job.model_copy(
        update={
            "gen_status": GenerationStatus.COMPLETED.value,
            "generation_completed_at": time.time(),
            "output_resource": videos[0],
            "execution_cost": generation.execution_cost,
        }
    )


def _deadline_passed(job: Job, res: Resources) -> Job | Again:
    """Stop the generation on GEN (refunding its credits) and fail with ``timeout``.

    If GEN refuses the stop because the generation just reached a terminal state, that state wins:
    a video that completed at the last second is still delivered.
    """
    assert job.generation_id is not None
    try:
        res.gen.stop_generation(job.generation_id)
    except GenNotStoppable:
        generation = res.gen.get_generation(job.generation_id)
        if generation.status == GenerationStatus.COMPLETED:
            return _completed(job, generation)
    except GenAPIError as exc:
        log.warning("job %s: could not stop generation %s: %s", job.job_id, job.generation_id, exc)
    last = job.gen_status or "unknown"
    raise JobTimeout(
        f"GEN did not finish within {res.settings.job_timeout:.0f} s (last status: {last});"
        " the generation was stopped",
        generation_id=job.generation_id,
    )


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def fetch(job: Job, res: Resources) -> LipsyncResult | Again:
    """Download GEN's output into storage and build the result."""
    resource = job.output_resource
    assert resource is not None and job.generation_id is not None, "fetch needs a completed generation"
    expect_next(job, res, within=res.settings.download_timeout, state=FETCHING)
    started = time.time()
    try:
        downloaded = download(
            resource.url,
            dest_dir=res.storage.staging_dir(),
            limits=res.download_limits,
            session=res.http,
        )
        published = res.storage.publish(
            job.job_id, downloaded.path, content_type=downloaded.content_type, sha256=downloaded.sha256
        )
    except OutputError as exc:
        # Download and upload failures alike (StorageError is retryable): fetch again from GEN.
        return _transient_or_raise(job, exc, res)
    finished = time.time()
    return LipsyncResult(
        job_id=job.job_id,
        generation_id=job.generation_id,
        model=job.model,
        output=StoredOutput(
            path=published.path,
            uri=published.uri,
            size_bytes=downloaded.size_bytes,
            sha256=downloaded.sha256,
            content_type=downloaded.content_type,
            url=resource.url,
            thumbnail_url=resource.thumbnail_url,
            id=resource.id,
        ),
        execution_cost=job.execution_cost,
        polls=job.polls,
        timings=_timings(job, finished, fetch_seconds=finished - started),
        metadata=job.request.metadata,
    )


def _timings(job: Job | None, finished: float, *, fetch_seconds: float | None = None) -> Timings:
    enqueued = job.enqueued_at if job else finished
    generation_seconds = None
    if job and job.submitted_at and job.generation_completed_at:
        generation_seconds = job.generation_completed_at - job.submitted_at
    return Timings(
        enqueued_at=enqueued,
        submitted_at=job.submitted_at if job else None,
        generation_completed_at=job.generation_completed_at if job else None,
        finished_at=finished,
        total_seconds=max(0.0, finished - enqueued),
        generation_seconds=generation_seconds,
        fetch_seconds=fetch_seconds,
    )


# --------------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------------


def failure_for(
    exc: BaseException, *, job: Job | None, job_id: str, metadata: dict[str, Any]
) -> LipsyncFailure:
    """The failure JSON for an exception that ended a job. Messages never carry secrets."""
    status: FailureStatus = "failed"
    errors = None
    generation_id = job.generation_id if job else None
    if isinstance(exc, RequestInvalid):
        status, code, message, errors = "rejected", "validation_error", str(exc), exc.errors
    elif isinstance(exc, JobError):
        status, code, message = exc.status, exc.error_code, exc.message
        generation_id = exc.generation_id or generation_id
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
        code, message = "internal_error", f"{type(exc).__name__}: {str(exc)[:300]}"
    return LipsyncFailure(
        job_id=job_id,
        generation_id=generation_id,
        status=status,
        error_code=code,
        message=message,
        errors=errors,
        model=job.model if job else None,
        timings=_timings(job, time.time()) if job else None,
        metadata=metadata,
    )
