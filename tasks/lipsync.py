"""The lipsync job as Celery tasks: ``lipsync.run`` → ``submit`` → ``poll`` ⟲ → ``fetch_output``.

Each task is a thin translation of a step in :mod:`worker.jobs.steps` into Celery terms:

* the step returns a :class:`~worker.jobs.models.Job` → the task returns it (as JSON) and the chain
  moves on;
* the step returns :class:`~worker.jobs.steps.Again` → ``self.retry(countdown=...)`` with the
  updated job: the worker slot is free until then, nobody sleeps;
* the step raises → the job's failure is recorded and delivered once, and the task raises
  :class:`~worker.errors.LipsyncJobFailed` so Celery marks the caller's result FAILURE and runs the
  caller's ``link_error``;
* the step finds nothing to do (the job ended, or the message is stale) → ``Ignore``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore

from tasks.base import STEP_OPTIONS, AnyTask, retry_after_redis_error, without_callback
from worker.app import app
from worker.callbacks.models import StageEvent
from worker.celery_queue import CeleryQueue
from worker.errors import LipsyncJobFailed, StillRunning
from worker.jobs import steps
from worker.jobs.failures import failure_for, reject
from worker.jobs.models import Job
from worker.jobs.outcomes import emit_event, finish, subscribed
from worker.jobs.records import JobRecord
from worker.jobs.resources import Resources, resources
from worker.names import (
    CHAIN,
    STATE_JOINED,
    TASK_AWAIT,
    TASK_FETCH,
    TASK_POLL,
    TASK_RUN,
    TASK_SUBMIT,
    Stage,
)
from worker.ops.logs import bind_generation
from worker.ops.progress import report

log = logging.getLogger("lipsync.tasks")


# No STARTED state (STEP_OPTIONS): Celery would store it with this task's arguments, the caller's
# request with its callback (see tasks.base.without_callback).
@app.task(name=TASK_RUN, **STEP_OPTIONS)
def run(self: AnyTask, request: Any = None) -> Any:
    """Validate ``request`` and replace this task with the chain submit → poll → fetch_output.

    The chain inherits this task's id, so the caller's AsyncResult resolves to the final result,
    and the caller's ``link``/``link_error`` move onto the chain. A second enqueue of a job id that
    is already running joins it (``lipsync.await_job``) instead of starting anything at GEN.
    """
    res = resources()
    task_id = str(self.request.id)
    try:
        started = steps.create(request, task_id=task_id, res=res)
    except Exception as exc:  # noqa: BLE001 - the retry decision tells a Redis blink from a bad request
        retry_after_redis_error(self, exc)
        failure = reject(_queue(self), res, request, exc, task_id=task_id)
        without_callback(self, "request")
        raise LipsyncJobFailed(failure) from None
    without_callback(self, "request")
    job = started.job
    if job.request.callback is not None:
        # A record from before the callback had its own field holds it in its job only; the chain
        # carries none.
        res.jobs.keep_callback(job.job_id, job.request.callback.model_dump(mode="json"))
    if started.record.outcome is not None:
        return _deliver_recorded(started.record.outcome)
    if not res.jobs.mark_once(job.job_id, "chain_started"):
        log.info("job %s: already running; this enqueue joins it", job.job_id)
        return self.replace(await_job.s(job.job_id))
    log.info("job %s: starting (%s, %s)", job.job_id, job.model, _target(job))
    return self.replace(_queue(self).chain_of(CHAIN, job.for_message(), last_task_id=None))


@app.task(name=TASK_SUBMIT, **STEP_OPTIONS)
def submit(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Start the generation on GEN (once per job; see :func:`worker.jobs.steps.submit`)."""
    current, res = Job.model_validate(job), resources()
    record = _guard(current, res)
    outcome = _run_step(self, current, res, lambda j, r: steps.submit(j, r, record=record))
    assert isinstance(outcome, Job)
    bind_generation(outcome.generation_id)
    _first_poll_later(self, outcome, res)
    _report(self, outcome, Stage.POLLING)
    data = {"gen_status": outcome.gen_status}
    emit_event(_queue(self), res, outcome, StageEvent.SUBMITTED, data, record=record)
    log.info("job %s: GEN generation %s accepted", outcome.job_id, outcome.generation_id)
    return outcome.for_message()


# A poll runs every few seconds for minutes: no RETRY or result write of its own in the result
# backend (the caller's id carries the progress; Flower sees every run, retry and reason in the
# task events). Its failure is stored all the same (_fail): Celery hands a caller's link_error the
# id of the step that failed, and errbacks read its result.
@app.task(name=TASK_POLL, **{**STEP_OPTIONS, "ignore_result": True})
def poll(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Check the generation once; re-queued with a countdown until GEN reports a terminal status."""
    current, res = Job.model_validate(job), resources()
    record = _guard(current, res)
    outcome = _run_step(self, current, res, steps.poll)
    assert isinstance(outcome, Job) and outcome.output_resource is not None
    data = {"url": outcome.output_resource.url, "execution_cost": outcome.execution_cost}
    emit_event(_queue(self), res, outcome, StageEvent.GENERATION_COMPLETED, data, record=record)
    return outcome.for_message()


@app.task(name=TASK_FETCH, **STEP_OPTIONS)
def fetch_output(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Stream the output video into storage, then record and deliver the result."""
    current, res = Job.model_validate(job), resources()
    record = _guard(current, res, final=True)
    if record is not None and record.outcome is not None:
        return _deliver_recorded(record.outcome)
    _report(self, current, Stage.FETCHING)
    try:
        result = _run_step(self, current, res, steps.fetch)
    except Ignore:
        # The job ended during the download (a cancel); nothing was published. This task runs
        # under the caller's id: it ends with the recorded outcome, once there is one.
        ended = res.jobs.get(current.job_id)
        if ended is not None and ended.outcome is not None:
            return _deliver_recorded(ended.outcome)
        raise
    assert not isinstance(result, Job | steps.Again)
    queue = _queue(self)
    # The record is read again only for a job that asked for the event (most ask for none): an end
    # meanwhile (a cancel) must not be followed by it. Without it, finish hands back such an end.
    if subscribed(res, current, StageEvent.OUTPUT_FETCHED, record=record):
        try:
            latest = steps.guard(current, res)
        except steps.NothingToDo:
            pass  # ended while the output was stored: no event; finish hands back the recorded end
        else:
            output = {"output": result.output.model_dump(mode="json")}
            emit_event(queue, res, current, StageEvent.OUTPUT_FETCHED, output, record=latest)
    stored = finish(queue, res, job_id=current.job_id, callback=current.request.callback, outcome=result)
    log.info("job %s: completed, output at %s", current.job_id, result.output.uri)
    return _deliver_recorded(stored)


@app.task(name=TASK_AWAIT, bind=True, max_retries=None, acks_late=True, throws=(LipsyncJobFailed,))
def await_job(self: AnyTask, job_id: str) -> dict[str, Any]:
    """Resolve to the outcome of a job someone else drives (a duplicate enqueue joined it)."""
    record = resources().jobs.get(job_id)
    if record is not None and record.outcome is not None:
        return _deliver_recorded(record.outcome)
    self.update_state(state=STATE_JOINED, meta={"job_id": job_id, "state": record.state if record else None})
    # Waiting for another job is not an error: a short, gently growing poll of its record.
    raise self.retry(countdown=min(5.0, 0.5 * (self.request.retries + 1)))


# --------------------------------------------------------------------------------------------
# translating steps into Celery terms
# --------------------------------------------------------------------------------------------


def _queue(task: AnyTask) -> CeleryQueue:
    return CeleryQueue(task.app)


def _guard(job: Job, res: Resources, *, final: bool = False) -> JobRecord | None:
    try:
        return steps.guard(job, res, final=final)
    except steps.NothingToDo:
        raise Ignore() from None


def _first_poll_later(task: AnyTask, job: Job, res: Resources) -> None:
    """Send the chain's poll with the countdown to its first question (the learned plan), rather
    than at once only to be retried: one task run fewer per job. A poll that comes early anyway
    (a re-drive, an older worker) still waits (worker.jobs.steps.poll)."""
    following = task.request.chain
    if not following or job.submitted_at is None:
        return
    first_in = res.planner.first_poll_in(job.model, elapsed=res.clock() - job.submitted_at, job_id=job.job_id)
    following_step = following[-1]
    if first_in > 0 and isinstance(following_step, dict):
        # Celery pops the next signature (a dict in the message) from the end of the request's
        # chain and sends it with its options when this task returns.
        following_step.setdefault("options", {})["countdown"] = first_in


def _deliver_recorded(outcome: dict[str, Any]) -> dict[str, Any]:
    """Return a recorded result, or raise a recorded failure, as the chain's last task does."""
    if outcome.get("status") == "completed":
        return outcome
    raise LipsyncJobFailed(outcome)


def _run_step(self: AnyTask, job: Job, res: Resources, step: Callable[[Job, Resources], Any]) -> Any:
    """Run a step; retry it on :class:`~worker.jobs.steps.Again`, end the job on an exception."""
    token = steps.CURRENT_TASK_ID.set(str(self.request.id))
    try:
        outcome = step(job, res)
    except steps.NothingToDo:
        # The job ended or moved on while the step ran (a cancel): whoever ended it reports it.
        raise Ignore() from None
    except Exception as exc:  # noqa: BLE001 - steps raise only what ends the job (or a Redis blink)
        retry_after_redis_error(self, exc)
        _fail(self, job, exc, res)
    finally:
        steps.CURRENT_TASK_ID.reset(token)
    if isinstance(outcome, steps.Again):
        # Progress goes to the caller when GEN's status changes, not on every poll: a poll that
        # finds nothing new writes nothing beyond its own retry.
        if outcome.job.gen_status and outcome.job.gen_status != job.gen_status:
            _report(self, outcome.job, Stage.POLLING)
        line = _progress_line(outcome.job)
        # `exc` travels in the retry event, which is what Flower shows for the whole wait; the
        # short argsrepr keeps callback URLs and metadata out of monitoring.
        raise self.retry(  # type: ignore[call-arg]  # Celery passes **options on
            args=(outcome.job.for_message(),),
            countdown=outcome.countdown,
            exc=StillRunning(f"{line}; {outcome.reason}; next try in {outcome.countdown:.1f} s"),
            argsrepr=f"({line})",
        )
    return outcome


def _fail(self: AnyTask, job: Job, exc: BaseException, res: Resources) -> NoReturn:
    failure = failure_for(exc, job=job, job_id=job.job_id, metadata=job.request.metadata, now=res.clock())
    stored = finish(_queue(self), res, job_id=job.job_id, callback=job.request.callback, outcome=failure)
    if self.ignore_result and self.request.id:
        # Celery keeps no result of this task, but a link_error names it: store its failure.
        failed = LipsyncJobFailed(stored)
        self.backend.mark_as_failure(self.request.id, failed, request=self.request, call_errbacks=False)
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


def _report(self: Task[Any, Any], job: Job, stage: Stage) -> None:
    """Publish progress under the caller's task id (and this task's, for Flower)."""
    meta = {
        "job_id": job.job_id,
        "generation_id": job.generation_id,
        "gen_status": job.gen_status,
        "polls": job.polls,
        "model": job.model,
    }
    report(self, caller_task_id=job.task_id, state=stage.task_state, meta=meta)


def _progress_line(job: Job) -> str:
    return f"job={job.job_id} generation={job.generation_id} gen_status={job.gen_status} polls={job.polls}"


def _target(job: Job) -> str:
    r = job.request
    layer = f"/layers/{r.layer_id}" if r.layer_id else ""
    return f"sheet {r.sheet_id} cell {r.cell_id}{layer}"
