"""The lipsync job as Celery tasks: ``lipsync.run`` → ``submit`` → ``poll`` ⟲ → ``fetch_output``.

Each task is a thin translation of a step in :mod:`worker.steps` into Celery terms:

* the step returns a :class:`~worker.models.Job` → the task returns it (as JSON) and the chain
  moves on;
* the step returns :class:`~worker.steps.Again` → ``self.retry(countdown=...)`` with the updated
  job: the worker slot is free until then, nobody sleeps;
* the step raises → the job's failure is recorded and delivered once, and the task raises
  :class:`~worker.errors.LipsyncJobFailed` so Celery marks the caller's result FAILURE and runs the
  caller's ``link_error``.

Before doing anything, every task checks the job record (:func:`_guard`): a job that already ended,
or a message whose drive token is older than the record's (the sweeper re-drove the job, or it was
cancelled), does nothing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

import redis
from celery import Task, chain
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from pydantic import TypeAdapter, ValidationError

from worker import metrics
from worker.app import QUEUE_FETCH, app
from worker.context import Resources, resources
from worker.delivery import WebhookFailed, WebhookRejected, attempt_time_limits, post_webhook
from worker.errors import LipsyncJobFailed, StillRunning, UnsafeURL
from worker.jobstore import JobRecord
from worker.logs import bind_generation
from worker.models import Callback, Job, JobId, StageEvent
from worker.outbox import Attempt
from worker.outcomes import emit_event, finish
from worker.progress import report
from worker.steps import CURRENT_TASK_ID, Again, failure_for
from worker.steps import fetch as fetch_step
from worker.steps import poll as poll_step
from worker.steps import start as start_step
from worker.steps import submit as submit_step

log = logging.getLogger("lipsync.tasks")

AnyTask = Task[Any, Any]

#: Custom task states, visible through the caller's AsyncResult and ``lipsync-worker status``.
STATE_SUBMITTED = "SUBMITTED"
STATE_POLLING = "POLLING"
STATE_FETCHING = "FETCHING"
STATE_JOINED = "JOINED"

_JOB_ID: TypeAdapter[str] = TypeAdapter(JobId)

_STEP_OPTIONS: dict[str, Any] = {
    "bind": True,
    # Our own bounds (deadline, transient-retry cap) decide when to give up, not Celery's count.
    "max_retries": None,
    "acks_late": True,
    # A failed job is an expected outcome: log it without a traceback.
    "throws": (LipsyncJobFailed,),
}


@app.task(name="lipsync.run", **_STEP_OPTIONS)
def run(self: AnyTask, request: Any = None) -> Any:
    """Validate ``request`` and replace this task with the chain submit → poll → fetch_output.

    The chain inherits this task's id, so the caller's AsyncResult resolves to the final result,
    and the caller's ``link``/``link_error`` move onto the chain. A second enqueue of a job id that
    is already running joins it (``lipsync.await_job``) instead of starting anything at GEN.
    """
    res = resources()
    try:
        started = start_step(request, task_id=str(self.request.id), res=res)
    except redis.RedisError as exc:
        raise _retry_after_redis_error(self, exc) from None
    except Exception as exc:  # noqa: BLE001 - every other failure to start becomes the job's failure
        _fail_unstarted(self, request, exc, res)
    job = started.job
    if started.record.outcome is not None:
        return _deliver_recorded(started.record.outcome)
    if not res.jobs.mark_once(job.job_id, "chain_started"):
        log.info("job %s: already running; this enqueue joins it", job.job_id)
        return self.replace(await_job.s(job.job_id))
    log.info("job %s: starting (%s, %s)", job.job_id, job.model, _target(job))
    body = job.model_dump(mode="json")
    return self.replace(chain(submit.s(body).set(argsrepr=f"(job={job.job_id})"), poll.s(), fetch_output.s()))


@app.task(name="lipsync.submit", **_STEP_OPTIONS)
def submit(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Start the generation on GEN (once per job; see :func:`worker.steps.submit`)."""
    current = Job.model_validate(job)
    res = resources()
    record = _guard(current, res)
    outcome = _run_step(self, current, res, functools.partial(submit_step, record=record))
    assert isinstance(outcome, Job)
    bind_generation(outcome.generation_id)
    _report(self, outcome, STATE_SUBMITTED)
    emit_event(self.app, res, outcome, StageEvent.SUBMITTED, {"gen_status": outcome.gen_status})
    log.info("job %s: GEN generation %s accepted", outcome.job_id, outcome.generation_id)
    return outcome.model_dump(mode="json")


@app.task(name="lipsync.poll", **_STEP_OPTIONS)
def poll(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Check the generation once; re-queued with a countdown until GEN reports a terminal status."""
    current = Job.model_validate(job)
    res = resources()
    _guard(current, res)
    outcome = _run_step(self, current, res, poll_step)
    assert isinstance(outcome, Job) and outcome.output_resource is not None
    data = {"url": outcome.output_resource.url, "execution_cost": outcome.execution_cost}
    emit_event(self.app, res, outcome, StageEvent.GENERATION_COMPLETED, data)
    return outcome.model_dump(mode="json")


@app.task(name="lipsync.fetch_output", **_STEP_OPTIONS)
def fetch_output(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Stream the output video into storage, then record and deliver the result."""
    current = Job.model_validate(job)
    res = resources()
    record = _guard(current, res, final=True)
    if record is not None and record.outcome is not None:
        return _deliver_recorded(record.outcome)
    _report(self, current, STATE_FETCHING)
    result = _run_step(self, current, res, fetch_step)
    assert not isinstance(result, Job | Again)
    output = result.output.model_dump(mode="json")
    emit_event(self.app, res, current, StageEvent.OUTPUT_FETCHED, {"output": output})
    stored = finish(self.app, res, job_id=current.job_id, callback=current.request.callback, outcome=result)
    log.info("job %s: completed, output at %s", current.job_id, result.output.uri)
    return _deliver_recorded(stored)


@app.task(name="lipsync.await_job", bind=True, max_retries=None, acks_late=True, throws=(LipsyncJobFailed,))
def await_job(self: AnyTask, job_id: str) -> dict[str, Any]:
    """Resolve to the outcome of a job someone else drives (a duplicate enqueue joined it)."""
    record = resources().jobs.get(job_id)
    if record is not None and record.outcome is not None:
        return _deliver_recorded(record.outcome)
    self.update_state(state=STATE_JOINED, meta={"job_id": job_id, "state": record.state if record else None})
    raise self.retry(countdown=min(5.0, 0.5 * (self.request.retries + 1)))


@app.task(name="lipsync.deliver_webhook", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def deliver_webhook(
    self: AnyTask,
    msg_id: str,
    drive: int | None = None,
    url: str | None = None,
    payload: dict[str, Any] | None = None,
) -> None:
    """POST one signed webhook from the outbox; retried on LIPSYNC_WEBHOOK_RETRY_DELAYS with the
    same webhook id, then dead-lettered.

    ``url`` and ``payload`` come only in messages sent by releases before the outbox (which may still
    sit in queues, or come back after the visibility timeout, during an upgrade): they are put into
    the outbox and delivered from there.
    """
    try:
        res = resources()
        if drive is None:
            if url is None or payload is None:
                log.error("webhook %s: message carries neither an outbox token nor a webhook", msg_id)
                return
            drive = res.outbox.put(msg_id, url, payload, due_at=time.time() + res.settings.queued_recovery)
        _deliver(self, res, msg_id, drive)
    except redis.RedisError as exc:
        # The outbox blinked; the entry stays owed (and the sweeper re-sends it if this retry is lost).
        raise _retry_after_redis_error(self, exc) from None


def _deliver(self: AnyTask, res: Resources, msg_id: str, drive: int) -> None:
    settings = res.settings
    delays = settings.webhook_retry_delays
    _, hard_limit = attempt_time_limits(settings.webhook_timeout)
    # If this worker dies during the attempt, the sweeper sends the webhook again after this.
    attempt = res.outbox.claim(msg_id, drive, due_at=time.time() + hard_limit + settings.recovery_grace)
    if attempt is None:
        log.info("webhook %s: already delivered, dead-lettered or re-sent; dropping this copy", msg_id)
        return
    if attempt.number > len(delays) + 1:
        # Attempts that never reported back (their workers died) count too: do not loop forever.
        _dead_letter(res, attempt, f"webhook {msg_id}: {attempt.number - 1} attempts did not succeed")
        return
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    try:
        post_webhook(
            res.http,
            attempt.url,
            attempt.payload,
            msg_id=msg_id,
            secret=secret,
            timeout=settings.webhook_timeout,
            allow_private=settings.allow_private_urls,
        )
    except (WebhookFailed, SoftTimeLimitExceeded) as exc:
        reason = str(exc) if isinstance(exc, WebhookFailed) else f"webhook {msg_id}: no answer in time"
        metrics.record_callback(res.redis, kind="webhook", outcome="failed_attempt")
        if attempt.number > len(delays):
            _dead_letter(res, attempt, reason)
            return
        delay = delays[attempt.number - 1]
        if not res.outbox.reschedule(msg_id, drive, due_at=time.time() + delay + settings.recovery_grace):
            log.info("webhook %s: taken over by a newer message; not retrying this copy", msg_id)
            return
        log.warning("%s; retrying in %.0f s (attempt %d)", reason, delay, attempt.number)
        raise self.retry(countdown=delay) from None
    except (WebhookRejected, UnsafeURL) as exc:
        _dead_letter(res, attempt, str(exc))
    else:
        res.outbox.delivered(msg_id)
        metrics.record_callback(res.redis, kind="webhook", outcome="delivered")
        log.info("webhook %s delivered (attempt %d)", msg_id, attempt.number)


# --------------------------------------------------------------------------------------------
# re-driving (used by the sweeper)
# --------------------------------------------------------------------------------------------


def redrive_job(job: Job) -> None:
    """Send a fresh chain for ``job`` from the step it is at: submit, poll or fetch.

    The last task takes the caller's task id, so the caller's AsyncResult resolves when it ends.
    """
    steps = [fetch_output.signature(queue=QUEUE_FETCH, task_id=job.task_id)]
    if job.output_resource is None:
        steps.insert(0, poll.s())
        if not job.generation_id:
            steps.insert(0, submit.s())
    first, *rest = steps
    chain(first.clone(args=(job.model_dump(mode="json"),)), *rest).apply_async()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _guard(job: Job, res: Resources, *, final: bool = False) -> JobRecord | None:
    """Read the job record; stop here if the job ended or this message is stale.

    The final task of a job that already ended gets the record back, to deliver its outcome.
    """
    record = res.jobs.get(job.job_id)
    if record is None:
        return None
    if record.outcome is not None:
        if final:
            return record
        raise Ignore()
    if record.drive != job.drive:
        log.info(
            "job %s: stale message (drive %d, current %d); dropping it", job.job_id, job.drive, record.drive
        )
        raise Ignore()
    return record


def _deliver_recorded(outcome: dict[str, Any]) -> dict[str, Any]:
    """Return a recorded result, or raise a recorded failure, as the chain's last task does."""
    if outcome.get("status") == "completed":
        return outcome
    raise LipsyncJobFailed(outcome)


def _run_step(self: AnyTask, job: Job, res: Resources, step: Callable[[Job, Resources], Any]) -> Any:
    """Run a step; retry it on :class:`Again`, end the job on an exception."""
    token = CURRENT_TASK_ID.set(str(self.request.id))
    try:
        outcome = step(job, res)
    except redis.RedisError as exc:
        # Our own state store blinked: that ends nothing. Run the step again.
        raise _retry_after_redis_error(self, exc) from None
    except Exception as exc:  # noqa: BLE001 - steps raise only what ends the job; see worker.steps
        _fail(self, job, exc, res)
    finally:
        CURRENT_TASK_ID.reset(token)
    if isinstance(outcome, Again):
        if outcome.job.gen_status:
            _report(self, outcome.job, STATE_POLLING)
        # `exc` travels in the retry event, which is what Flower shows for the whole wait; the
        # short argsrepr keeps callback URLs and metadata out of monitoring.
        raise self.retry(  # type: ignore[call-arg]  # Celery passes **options on
            args=(outcome.job.model_dump(mode="json"),),
            countdown=outcome.countdown,
            exc=StillRunning(
                f"{_progress_line(outcome.job)}; {outcome.reason}; next try in {outcome.countdown:.1f} s"
            ),
            argsrepr=f"({_progress_line(outcome.job)})",
        )
    return outcome


def _retry_after_redis_error(self: AnyTask, exc: redis.RedisError) -> Exception:
    """Re-run this task shortly. If the broker is down too, the publish fails and Celery drops this
    message; the job record (written before the chain moved) lets the sweeper re-drive the job."""
    log.warning("Redis error in %s (%s); retrying the step", self.name, type(exc).__name__)
    return self.retry(countdown=min(30.0, 2.0 * (self.request.retries + 1)), exc=exc)


def _fail(self: AnyTask, job: Job, exc: BaseException, res: Resources) -> NoReturn:
    failure = failure_for(exc, job=job, job_id=job.job_id, metadata=job.request.metadata)
    stored = finish(self.app, res, job_id=job.job_id, callback=job.request.callback, outcome=failure)
    if job.task_id and job.task_id != self.request.id:
        # Celery stores the failure under the caller's id, but monitors (Flower) only learn a task's
        # state from events: tell them the caller's task failed too.
        with self.app.events.default_dispatcher(hostname=self.request.hostname) as dispatcher:
            dispatcher.send(
                "task-failed", uuid=job.task_id, exception=repr(LipsyncJobFailed(stored)), traceback=""
            )
    log.info(
        "job %s: %s (%s): %s", job.job_id, stored["status"], stored.get("error_code"), stored.get("message")
    )
    raise LipsyncJobFailed(stored) from None


def _fail_unstarted(self: AnyTask, raw: Any, exc: BaseException, res: Resources) -> NoReturn:
    """A request that could not start: fail it, and tell its callback if one can be read."""
    raw_dict = raw if isinstance(raw, dict) else {}
    job_id = _job_id_of(raw_dict) or str(self.request.id)
    raw_metadata = raw_dict.get("metadata")
    metadata: dict[str, Any] = raw_metadata if isinstance(raw_metadata, dict) else {}
    failure = failure_for(exc, job=None, job_id=job_id, metadata=metadata)
    callback = _callback_of(raw_dict)
    existing = res.jobs.get(job_id)
    if existing is not None and existing.task_id != str(self.request.id):
        # The id belongs to another, valid job: report this request's failure without touching it.
        raise LipsyncJobFailed(failure.model_dump(mode="json")) from None
    res.jobs.claim(job_id, task_id=str(self.request.id), model="", job=None, overdue_at=0)
    stored = finish(self.app, res, job_id=job_id, callback=callback, outcome=failure)
    log.info("job %s: rejected: %s", job_id, stored.get("message"))
    raise LipsyncJobFailed(stored) from None


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


def _report(self: AnyTask, job: Job, state: str) -> None:
    """Publish progress under the caller's task id (and this task's, for Flower)."""
    meta = {
        "job_id": job.job_id,
        "generation_id": job.generation_id,
        "gen_status": job.gen_status,
        "polls": job.polls,
        "model": job.model,
    }
    report(self, caller_task_id=job.task_id, state=state, meta=meta)


def _progress_line(job: Job) -> str:
    return f"job={job.job_id} generation={job.generation_id} gen_status={job.gen_status} polls={job.polls}"


def _target(job: Job) -> str:
    r = job.request
    layer = f"/layers/{r.layer_id}" if r.layer_id else ""
    return f"sheet {r.sheet_id} cell {r.cell_id}{layer}"


def _dead_letter(res: Resources, attempt: Attempt, error: str) -> None:
    if not res.outbox.give_up(attempt, error=error):
        log.info("webhook %s: taken over by a newer message; leaving it to that one", attempt.msg_id)
        return
    log.error("webhook %s given up after %d attempts: %s", attempt.msg_id, attempt.number, error)
    metrics.record_callback(res.redis, kind="webhook", outcome="dead_lettered")
