"""What each step of a job does, without Celery: create, submit, poll and fetch.

The tasks in :mod:`tasks.lipsync` only translate the answers into Celery terms. A step either
returns the updated :class:`Job` (move on), returns :class:`Again` (run me again in ``countdown``
seconds with this job), or raises. What it raises decides the job's failure
(:func:`worker.jobs.failures.failure_for`). Whether an error is worth another attempt, and when, is
:func:`worker.retry.decide`'s call, never a step's own.

Every step reads the time from ``res.clock`` and records in the job record when its next sign of
life is due (:func:`expect_next`), which is what the sweeper re-drives by.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from worker.cards.store import CardStore
from worker.errors import LipsyncError
from worker.gen.client import idempotency_key_for
from worker.gen.errors import GenAPIError, GenBadResponse, GenNotStoppable, GenRateLimited
from worker.gen.models import Generation, GenerationStatus
from worker.jobs.backoff import clamp_to_deadline
from worker.jobs.errors import (
    BadUpstream,
    GenerationFailed,
    GenerationStopped,
    JobError,
    JobTimeout,
    UnknownGenerationStatus,
    UpstreamUnavailable,
)
from worker.jobs.models import Job, LipsyncRequest, LipsyncResult, StoredOutput, Timings
from worker.jobs.ratelimit import Budget
from worker.jobs.records import JobRecord, StopResult
from worker.jobs.resources import Resources
from worker.jobs.schedule import Observation
from worker.jobs.sources import refuse_unusable_sources
from worker.jobs.uploads import needs_upload, upload_sources
from worker.names import CHAIN, TASK_FETCH, TASK_POLL, TASK_SUBMIT, Stage
from worker.ops.failpoints import failpoint
from worker.output.download import download
from worker.output.errors import OutputError, OutputInvalid
from worker.retry import GiveUp, Retry, RetryPolicy, decide
from worker.settings import Settings
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.steps")


@dataclass(frozen=True)
class Again:
    """Run the same step again after ``countdown`` seconds, with ``job`` as its argument."""

    job: Job
    countdown: float
    reason: str


class NothingToDo(LipsyncError):
    """This message has nothing left to do: its job ended, or a newer message drives it (the sweeper
    re-drove the job, or it was cancelled). The task drops the message quietly."""


# --------------------------------------------------------------------------------------------
# retry policies (the decision itself is worker.retry.decide)
# --------------------------------------------------------------------------------------------


def transient_policy(s: Settings) -> RetryPolicy:
    """Submit and fetch: a bounded number of retries, then ``gen_unavailable``."""
    return RetryPolicy(limit=s.max_transient_retries, cap=s.retry_max_delay)


def poll_policy(s: Settings) -> RetryPolicy:
    """While polling, transient errors are bounded by the job's deadline, not by a count: GEN being
    down for ten minutes should not lose a generation that is still running there."""
    return RetryPolicy(limit=None, cap=s.retry_max_delay)


def bad_body_policy(s: Settings) -> RetryPolicy:
    """Unreadable answers while polling: a proxy hiccup heals, a changed schema does not."""
    return RetryPolicy(limit=s.max_bad_responses, cap=s.retry_max_delay)


# --------------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """What :func:`create` found: the job, and whether this call created its record."""

    job: Job
    created: bool
    record: JobRecord


def create(request: LipsyncRequest | Any, *, task_id: str, res: Resources) -> Started:
    """The one way a job comes to exist: validate the request and open its job record, or find the
    record of an earlier enqueue of the same job id. Used by the Python helper (before it sends the
    message) and by ``lipsync.run`` (for producers that send the message by hand).

    Raises:
        RequestInvalid: the request is not valid, or names a webhook that could only go out
            unsigned here; nothing was recorded.
    """
    from worker.callbacks.webhooks import refuse_unsigned

    if not isinstance(request, LipsyncRequest):
        if isinstance(request, dict) and request.get("job_id") is None:
            # A producer that sent lipsync.run by hand without a job id: the task id is the job id,
            # so `lipsync-worker status <task id>` and AsyncResult(<task id>) find the job.
            request = {**request, "job_id": task_id}
        request = LipsyncRequest.parse(request)
    refuse_unsigned(request.callback, res.settings)
    refuse_unusable_sources(request, res.settings)
    # No model named: the target's Lipsync card's (worker.cards), then LIPSYNC_DEFAULT_MODEL.
    model = (
        request.model
        or CardStore(res.redis).model_for(request.sheet_id, request.cell_id, request.layer_id)
        or res.settings.default_model
    )
    now = res.clock()
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


def start(
    queue: TaskQueue, res: Resources, started: Started, options: Mapping[str, Any] | None = None
) -> bool:
    """Send the chain of a job :func:`create` found not started: submit → poll → fetch, the last
    step under the job's task id, so its caller's AsyncResult resolves to the job's result.
    ``options`` go to the whole chain (a producer's ``link`` and ``link_error``).

    Returns False, sending nothing, when the job ended or its chain was started already (by
    another producer, ``lipsync.run`` or the sweeper): it goes on without a second chain. The flag
    is set before the send, so two producers cannot both send; a send that fails clears it, so the
    caller's retry can send again (if Redis is gone too, the queued-recovery timer re-drives it).

    A producer that starts the chain itself saves the job a whole task: ``lipsync.run`` (what
    producers that send by hand use) opens the record and then replaces itself with this chain.
    """
    if started.record.outcome is not None or not res.jobs.mark_once(started.job.job_id, "chain_started"):
        return False
    try:
        queue.send_chain(CHAIN, started.job.for_message(), last_task_id=started.job.task_id, options=options)
    except BaseException:
        try:
            res.jobs.unmark(started.job.job_id, "chain_started")
        except redis.RedisError:
            log.warning("job %s: chain not sent, and its started flag not cleared", started.job.job_id)
        raise
    return True


def guard(job: Job, res: Resources, *, final: bool = False) -> JobRecord | None:
    """Read the job record before a step runs; raise :class:`NothingToDo` if the job ended or this
    message is stale. The final step of a job that already ended gets the record back, to hand its
    outcome to the caller."""
    record = res.jobs.get(job.job_id)
    if record is None:
        return None
    if record.outcome is not None:
        if final:
            return record
        raise NothingToDo(f"job {job.job_id} already ended")
    if record.drive != job.drive:
        log.info(
            "job %s: stale message (drive %d, current %d); dropping it", job.job_id, job.drive, record.drive
        )
        raise NothingToDo(f"job {job.job_id}: stale message")
    return record


#: Celery id of the task running the current step (set by tasks.lipsync), recorded so a
#: cancellation can revoke it.
CURRENT_TASK_ID: ContextVar[str | None] = ContextVar("lipsync_current_task_id", default=None)


def expect_next(job: Job, res: Resources, *, within: float, **fields: Any) -> None:
    """Record the job's state and when its next sign of life is due (plus the recovery grace)."""
    res.jobs.update(
        job.job_id,
        job=job.model_dump(mode="json"),
        overdue_at=res.clock() + within + res.settings.recovery_grace,
        step_task_id=CURRENT_TASK_ID.get(),
        **fields,
    )


def remaining_steps(job: Job) -> tuple[str, ...]:
    """The chain that takes ``job`` on from where it is: submit, poll or fetch (see worker.names)."""
    if job.output_resource is not None:
        return (TASK_FETCH,)
    if job.generation_id:
        return (TASK_POLL, TASK_FETCH)
    return (TASK_SUBMIT, TASK_POLL, TASK_FETCH)


# --------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------


def submit(
    job: Job, res: Resources, *, record: JobRecord | None, sleep: Callable[[float], None] = time.sleep
) -> Job | Again:
    """Start the generation on GEN, once per job.

    ``record`` is the job record as the task just read it. If it holds a generation id (a
    redelivered or duplicate submit), nothing is sent. Otherwise generate is called with an
    Idempotency-Key derived from the job id, so even a retry after an ambiguous failure (timeout
    after GEN accepted) returns the same generation instead of paying for a second one.

    Raises:
        NothingToDo: the job was cancelled while GEN accepted it; the generation was stopped
            (retrying transient failures, sleeping with ``sleep``) and the cancel reports the end.
    """
    if record is not None and record.generation_id:
        # A redelivered message can carry the job from before GEN accepted it: the record's job
        # knows when that was.
        recorded = (record.job or {}).get("submitted_at")
        first = job.model_copy(update={"submitted_at": job.submitted_at or recorded})
        return _submitted(first, record.generation_id, status=record.gen_status, res=res)
    if res.clock() >= job.deadline_at:
        raise JobTimeout("the deadline passed before GEN accepted the generation")
    s = res.settings
    if needs_upload(job, res):
        # autocontentengine takes resource ids: upload URL sources to GEN first, and record the ids.
        expect_next(job, res, within=4 * (s.gen_connect_timeout + s.gen_read_timeout), state=Stage.SUBMITTING)
        try:
            job = upload_sources(job, res)
        except (GenAPIError, OutputError) as exc:
            return _again_or_raise(job, exc, res, transient_policy(s))
    request = job.request
    # The body first: in the vidsheet dialect it takes two resource lookups, which must not sit
    # between the fleet's generate limiter admitting this call and GEN receiving it.
    expect_next(job, res, within=3 * (s.gen_connect_timeout + s.gen_read_timeout), state=Stage.SUBMITTING)
    try:
        body = res.gen.lipsync_body(
            job.model,
            request.video_resource_id,
            request.audio_resource_id,
            video_url=request.video_url,
            audio_url=request.audio_url,
        )
    except GenAPIError as exc:
        return _again_or_raise(job, exc, res, transient_policy(s))
    throttled = _throttle(job, res, "generate")
    if throttled is not None:
        return throttled
    # The due time written before the body covers the generate call too (the lookups take
    # milliseconds); a dead worker is found by its silence long before it (worker.jobs.liveness).
    try:
        accepted = res.gen.generate_lipsync(
            sheet_id=request.sheet_id,
            cell_id=request.cell_id,
            layer_id=request.layer_id,
            model=job.model,
            video_resource_id=request.video_resource_id,
            audio_resource_id=request.audio_resource_id,
            video_url=request.video_url,
            audio_url=request.audio_url,
            idempotency_key=idempotency_key_for(job.job_id),
            body=body,
        )
    except GenRateLimited as exc:
        # GEN asks us to slow down: a busy GEN is never a reason to fail a job (a batch of 500
        # must not lose items to it). Wait as it says, backing off, until the job's deadline.
        return _again_or_raise(job, exc, res, poll_policy(s), until_deadline=True)
    except GenAPIError as exc:
        return _again_or_raise(job, exc, res, transient_policy(s))
    failpoint("submit.after_generate")
    target = {"cell_id": request.cell_id, "layer_id": request.layer_id}
    recorded = res.jobs.accept(job.job_id, accepted.generation_id, target=target)
    generation_id = recorded.generation_id
    if recorded.cancel_requested:
        # Cancelled while GEN was accepting: do not leave a paid generation running. The record
        # says whether GEN confirmed the stop; the cancel (or the sweeper) reports the job's end.
        stop = stop_generation(res, job.job_id, generation_id, sleep=sleep)
        raise NothingToDo(f"job {job.job_id} was cancelled while GEN accepted it; {stop.describe()}")
    return _submitted(job, generation_id, status=accepted.status, res=res)


def _submitted(job: Job, generation_id: str, *, status: str | None, res: Resources) -> Job:
    updated = job.model_copy(
        update={
            "generation_id": generation_id,
            "submitted_at": job.submitted_at or res.clock(),
            "gen_status": status,
            "step_retries": 0,
        }
    )
    # The first poll now waits in the queue, where a backlog is normal.
    expect_next(updated, res, within=res.settings.queued_recovery, state=Stage.POLLING, gen_status=status)
    return updated


def _throttle(job: Job, res: Resources, budget: Budget) -> Again | None:
    """Ask the fleet-wide limiter; when over budget, come back when the window has room.

    Waiting for the limiter is not an error: it does not count as a retry.
    """
    wait = res.limiter.acquire(budget)
    if wait <= 0:
        return None
    # A little spread, so the processes that were refused do not all return at the same instant;
    # never past the deadline, which the next run must notice on time.
    countdown = wait + random.uniform(0, min(1.0, wait))
    countdown = clamp_to_deadline(countdown, now=res.clock(), deadline=job.deadline_at)
    expect_next(job, res, within=countdown)
    return Again(job, countdown, f"fleet {budget} rate limit")


def _again_or_raise(
    job: Job,
    exc: GenAPIError | OutputError,
    res: Resources,
    policy: RetryPolicy,
    *,
    retries: int | None = None,
    until_deadline: bool = False,
    exhausted: type[JobError] = UpstreamUnavailable,
) -> Again:
    """Come back after a retryable error when :func:`worker.retry.decide` says so; else raise.

    ``retries``: what the policy counts (the step's transient retries unless given).
    ``until_deadline``: never wait past the job's deadline (polls: the next run must notice it).
    ``exhausted``: the job's failure when the policy's retries are spent.
    """
    counted = job.step_retries if retries is None else retries
    verdict = decide(exc, retries=counted, policy=policy)
    if isinstance(verdict, GiveUp):
        if not verdict.exhausted:
            raise exc
        message = exhausted.gave_up.format(attempts=counted + 1, cause=exc)
        raise exhausted(message, generation_id=job.generation_id) from exc
    countdown = verdict.delay
    if until_deadline:
        countdown = clamp_to_deadline(countdown, now=res.clock(), deadline=job.deadline_at)
    return _retry(job, res, countdown, str(exc))


def _retry(job: Job, res: Resources, countdown: float, reason: str) -> Again:
    """Come back in ``countdown`` seconds after a retryable failure (counted in ``step_retries``)."""
    updated = job.model_copy(update={"step_retries": job.step_retries + 1})
    expect_next(updated, res, within=countdown, last_error=reason)
    return Again(updated, countdown, reason)


# --------------------------------------------------------------------------------------------
# stopping a generation on GEN (a cancel, the deadline)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    """What GEN said to a stop of the generation (the stop is what refunds its credits)."""

    result: StopResult
    #: GEN's refusal or the error, when the stop was not confirmed.
    detail: str | None = None
    #: A transient failure the retry policy says to try again after this many seconds.
    retry_in: float | None = None

    def describe(self) -> str:
        """The stop, as the end of a failure's message."""
        if self.result == "stopped":
            return "the generation was stopped on GEN"
        if self.result == "already_ended":
            return "the generation had already ended on GEN"
        return f"stopping it on GEN failed: {self.detail}"


def try_stop(res: Resources, job_id: str, generation_id: str, *, retries: int) -> Stop:
    """Ask GEN once to stop the generation, ``retries`` retries into it.

    A transient failure that :func:`worker.retry.decide` says is worth another try (transient
    policy) comes back with ``retry_in`` and is not recorded; any other answer is final and is
    recorded in the job record (``stop_result``), so whoever reports the job's end says the truth.
    """
    try:
        res.gen.stop_generation(generation_id)
    except GenNotStoppable as exc:
        stop = Stop("already_ended", str(exc))
    except GenAPIError as exc:
        verdict = decide(exc, retries=retries, policy=transient_policy(res.settings))
        if isinstance(verdict, Retry):
            return Stop("failed", str(exc), retry_in=verdict.delay)
        stop = Stop("failed", str(exc))
    else:
        stop = Stop("stopped")
    if stop.result != "stopped":
        log.warning("job %s: generation %s: %s", job_id, generation_id, stop.describe())
    res.jobs.update(job_id, stop_result=stop.result, stop_error=stop.detail)
    return stop


def stop_generation(
    res: Resources, job_id: str, generation_id: str, *, sleep: Callable[[float], None] = time.sleep
) -> Stop:
    """Stop the generation on GEN, retrying transient failures here, in between sleeping, as
    the transient policy allows (for callers that cannot come back later: a cancel)."""
    retries = 0
    while True:
        stop = try_stop(res, job_id, generation_id, retries=retries)
        if stop.retry_in is None:
            return stop
        log.warning(
            "job %s: stopping generation %s failed (%s); trying again in %.1f s",
            job_id,
            generation_id,
            stop.detail,
            stop.retry_in,
        )
        # Still alive: the sweeper leaves a cancel in progress alone until this is overdue.
        res.jobs.update(job_id, overdue_at=stop_due(res, within=stop.retry_in))
        sleep(stop.retry_in)
        retries += 1


def stop_due(res: Resources, *, within: float = 0.0) -> float:
    """When a stop on GEN that starts within ``within`` seconds is over (one call, plus the recovery
    grace): past it, the sweeper takes over a cancel whose process died half-way."""
    s = res.settings
    return res.clock() + within + s.gen_connect_timeout + s.gen_read_timeout + s.recovery_grace


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
    asked_at = res.clock()
    if asked_at >= job.deadline_at:
        return _deadline_passed(job, res)
    if job.polls == 0 and job.drive == 1 and job.submitted_at is not None:
        # Straight after the submit: GEN's generations of this model usually take longer than
        # this, so the first question waits for when they usually end (a learned plan). The submit
        # sends this poll with that countdown (its own, or its lead's); one that came before any
        # job of the plan would ask (sent without one) waits for its own. A job driven again
        # (GEN's event nudged it, or it was recovered) asks at once.
        elapsed = asked_at - job.submitted_at
        if res.planner.earliest_poll_in(job.model, elapsed=elapsed) > EARLY_ENOUGH:
            first_in = res.planner.first_poll_in(job.model, elapsed=elapsed, job_id=job.job_id)
            if first_in > EARLY_ENOUGH:
                return _wait(job, res, countdown=first_in)
    throttled = _throttle(job, res, "status")
    if throttled is not None:
        return throttled
    try:
        generation = res.gen.get_generation(job.generation_id)
    except GenBadResponse as exc:
        counted = job.model_copy(update={"bad_responses": job.bad_responses + 1})
        policy = bad_body_policy(res.settings)
        return _again_or_raise(
            counted, exc, res, policy, retries=job.bad_responses, until_deadline=True, exhausted=BadUpstream
        )
    except GenAPIError as exc:
        return _again_or_raise(job, exc, res, poll_policy(res.settings), until_deadline=True)
    asked = job.model_copy(update={"polls": job.polls + 1, "step_retries": 0})
    return _classify(asked, generation, res, asked_at=asked_at)


#: A first poll this close to the plan's first time asks GEN rather than waiting once more (the
#: countdown that brought it here may fire a little early).
EARLY_ENOUGH = 0.25


def _classify(job: Job, generation: Generation, res: Resources, *, asked_at: float) -> Job | Again:
    status = generation.status
    if status == GenerationStatus.COMPLETED:
        _learn(job, res, done_at=asked_at)
        done = _completed(job, generation, res)
        # The fetch now waits in its queue.
        expect_next(done, res, within=res.settings.queued_recovery, gen_status=status, polls=job.polls)
        return done
    if status == GenerationStatus.FAILED:
        reason = generation.failed_reason or "GEN reported the generation as failed without a reason"
        raise GenerationFailed(reason, generation_id=job.generation_id)
    if status == GenerationStatus.STOPPED:
        raise GenerationStopped("the generation was stopped on GEN", generation_id=job.generation_id)
    if status in (GenerationStatus.PENDING, GenerationStatus.PROCESSING):
        running = job.model_copy(update={"gen_status": status, "last_running_at": asked_at})
        return _wait(running, res)
    res.jobs.update(job.job_id, gen_status=status, polls=job.polls)
    raise UnknownGenerationStatus(
        f"GEN reported an unknown generation status {status[:50]!r}", generation_id=job.generation_id
    )


def _wait(job: Job, res: Resources, *, countdown: float | None = None) -> Again:
    """GEN is still working: poll again when the plan says (:mod:`worker.jobs.durations`)."""
    now = res.clock()
    if countdown is None:
        elapsed = now - (job.submitted_at or now)
        countdown = res.planner.next_poll_in(job.model, elapsed=elapsed, polls=job.polls, job_id=job.job_id)
    countdown = clamp_to_deadline(countdown, now=now, deadline=job.deadline_at)
    expect_next(
        job,
        res,
        within=countdown,
        gen_status=job.gen_status,
        polls=job.polls,
        next_poll_at=repr(now + countdown),
        last_error=None,
    )
    return Again(job, countdown, f"GEN status {job.gen_status}")


def _learn(job: Job, res: Resources, *, done_at: float) -> None:
    """Tell the fleet how long this generation took: between the last poll that found it running
    and this one. Never in the way of the job: a Redis blink loses one interval, nothing else (in a
    worker task the interval rides the record write that follows; worker.ops.deferred logs a lost
    one)."""
    if job.submitted_at is None:
        return
    running_at = job.last_running_at or job.submitted_at
    seen = Observation.of(running_at - job.submitted_at, done_at - job.submitted_at)
    try:
        res.planner.learn(job.model, seen)
    except redis.RedisError as exc:
        log.warning("job %s: could not record its generation time: %s", job.job_id, exc)


def _completed(job: Job, generation: Generation, res: Resources) -> Job:
    videos = [r for r in generation.output_resources if (r.object_type or "video").lower() == "video"]
    if not videos:
        raise OutputInvalid("GEN reported completed but listed no output video")
    return job.model_copy(
        update={
            "gen_status": GenerationStatus.COMPLETED.value,
            "generation_completed_at": res.clock(),
            "output_resource": videos[0],
            "execution_cost": generation.execution_cost,
        }
    )


def _deadline_passed(job: Job, res: Resources) -> Job | Again:
    """Stop the generation on GEN (refunding its credits) and fail with ``timeout``, saying whether
    GEN confirmed the stop. A stop that fails transiently is tried again (transient policy).

    If GEN refuses the stop because the generation already ended, what GEN reports wins: a video
    that completed at the last second is still delivered, a generation that failed fails the job
    with GEN's reason.
    """
    assert job.generation_id is not None
    stop = try_stop(res, job.job_id, job.generation_id, retries=job.step_retries)
    if stop.retry_in is not None:
        return _retry(job, res, stop.retry_in, f"stopping the generation: {stop.detail}")
    if stop.result == "already_ended":
        return _ended_before_the_stop(job, res)
    raise JobTimeout(f"{_timed_out(job, res)}; {stop.describe()}", generation_id=job.generation_id)


def _ended_before_the_stop(job: Job, res: Resources) -> Job | Again:
    """GEN refused the stop: the generation ended. Read how, and end the job as any poll would."""
    assert job.generation_id is not None
    asked_at = res.clock()
    try:
        generation = res.gen.get_generation(job.generation_id)
    except GenAPIError as exc:
        verdict = decide(exc, retries=job.step_retries, policy=transient_policy(res.settings))
        if isinstance(verdict, Retry):
            return _retry(job, res, verdict.delay, str(exc))
        raise JobTimeout(
            f"{_timed_out(job, res)}; GEN refused to stop the generation (it had ended) and its"
            f" status could not be read: {exc}",
            generation_id=job.generation_id,
        ) from exc
    read = job.model_copy(update={"polls": job.polls + 1, "step_retries": 0})
    if generation.status in (GenerationStatus.PENDING, GenerationStatus.PROCESSING):
        # Refused, yet still running: we cannot stop it; say so rather than poll past the deadline.
        refused = Stop("failed", f"GEN refused the stop while reporting the generation {generation.status}")
        res.jobs.update(job.job_id, stop_result=refused.result, stop_error=refused.detail)
        raise JobTimeout(f"{_timed_out(read, res)}; {refused.describe()}", generation_id=job.generation_id)
    return _classify(read, generation, res, asked_at=asked_at)


def _timed_out(job: Job, res: Resources) -> str:
    last = job.gen_status or "unknown"
    return f"GEN did not finish within {res.settings.job_timeout:.0f} s (last status: {last})"


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------


def fetch(job: Job, res: Resources) -> LipsyncResult | Again:
    """Download GEN's output into storage and build the result.

    Raises:
        NothingToDo: the job was cancelled (or ended, or re-driven) during the download; nothing
            was published and the downloaded file is gone.
    """
    resource = job.output_resource
    assert resource is not None and job.generation_id is not None, "fetch needs a completed generation"
    expect_next(job, res, within=res.settings.download_timeout, state=Stage.FETCHING)
    started = res.clock()
    try:
        downloaded = download(
            resource.url,
            dest_dir=res.storage.staging_dir(),
            limits=res.download_limits,
            session=res.http,
        )
        # A download takes a while: a cancel meanwhile must not see the output published after it.
        _still_current(job, res, staged=downloaded.path)
        published = res.storage.publish(
            job.job_id, downloaded.path, content_type=downloaded.content_type, sha256=downloaded.sha256
        )
    except OutputError as exc:
        # Download and upload failures alike (StorageError is retryable): fetch again from GEN.
        return _again_or_raise(job, exc, res, transient_policy(res.settings))
    finished = res.clock()
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
        timings=Timings.of(job, finished, fetch_seconds=finished - started),
        metadata=job.request.metadata,
    )


def _still_current(job: Job, res: Resources, *, staged: Path) -> None:
    """Raise :class:`NothingToDo` (dropping the staged file) if the job ended or this message went
    stale since the step began."""
    try:
        guard(job, res)
    except NothingToDo:
        staged.unlink(missing_ok=True)
        raise
