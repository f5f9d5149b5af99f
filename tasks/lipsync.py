"""The lipsync job as Celery tasks: ``lipsync.run`` → ``submit`` → ``poll`` ⟲ → ``fetch_output``.

Each task is a thin translation of a step in :mod:`worker.steps` into Celery terms:

* the step returns a :class:`~worker.models.Job` → the task returns it (as JSON) and the chain
  moves on;
* the step returns :class:`~worker.steps.Again` → ``self.retry(countdown=...)`` with the updated
  job: the worker slot is free until then, nobody sleeps;
* the step raises → the job's failure is recorded and delivered once, and the task raises
  :class:`~worker.errors.LipsyncJobFailed` so Celery marks the caller's result FAILURE and runs the
  caller's ``link_error``.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from celery import Task, chain
from pydantic import TypeAdapter, ValidationError

from worker.app import app
from worker.context import Resources, resources
from worker.delivery import WebhookFailed, WebhookRejected, post_webhook
from worker.errors import LipsyncJobFailed, UnsafeURL
from worker.models import Callback, Job, JobId, StageEvent
from worker.outcomes import emit_event, finish
from worker.steps import Again, failure_for
from worker.steps import fetch as fetch_step
from worker.steps import poll as poll_step
from worker.steps import start as start_step
from worker.steps import submit as submit_step

log = logging.getLogger("lipsync.tasks")

#: Custom task states, visible through the caller's AsyncResult and ``lipsync-worker status``.
STATE_SUBMITTED = "SUBMITTED"
STATE_POLLING = "POLLING"
STATE_FETCHING = "FETCHING"

_JOB_ID: TypeAdapter[str] = TypeAdapter(JobId)

AnyTask = Task[Any, Any]

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
    and the caller's ``link``/``link_error`` move onto the chain.
    """
    res = resources()
    task_id = str(self.request.id)
    try:
        job = start_step(request, task_id=task_id, res=res)
    except Exception as exc:  # noqa: BLE001 - every failure to start becomes the job's failure
        _fail_unstarted(self, request, exc, res)
    log.info("job %s: starting (%s, %s)", job.job_id, job.model, _target(job))
    body = job.model_dump(mode="json")
    return self.replace(chain(submit.s(body), poll.s(), fetch_output.s()))


@app.task(name="lipsync.submit", **_STEP_OPTIONS)
def submit(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Start the generation on GEN (once per job; see :func:`worker.steps.submit`)."""
    current = Job.model_validate(job)
    res = resources()
    outcome = _run_step(self, current, res, submit_step)
    assert isinstance(outcome, Job)
    _report(self, outcome, STATE_SUBMITTED)
    emit_event(self.app, res, outcome, StageEvent.SUBMITTED, {"gen_status": outcome.gen_status})
    log.info("job %s: GEN generation %s accepted", outcome.job_id, outcome.generation_id)
    return outcome.model_dump(mode="json")


@app.task(name="lipsync.poll", **_STEP_OPTIONS)
def poll(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Check the generation once; re-queued with a countdown until GEN reports a terminal status."""
    current = Job.model_validate(job)
    res = resources()
    outcome = _run_step(self, current, res, poll_step)
    assert isinstance(outcome, Job) and outcome.output_resource is not None
    emit_event(
        self.app,
        res,
        outcome,
        StageEvent.GENERATION_COMPLETED,
        {"url": outcome.output_resource.url, "execution_cost": outcome.execution_cost},
    )
    return outcome.model_dump(mode="json")


@app.task(name="lipsync.fetch_output", **_STEP_OPTIONS)
def fetch_output(self: AnyTask, job: dict[str, Any]) -> dict[str, Any]:
    """Stream the output video into storage, then record and deliver the result."""
    current = Job.model_validate(job)
    res = resources()
    _report(self, current, STATE_FETCHING)
    result = _run_step(self, current, res, fetch_step)
    assert not isinstance(result, Job | Again)
    emit_event(
        self.app, res, current, StageEvent.OUTPUT_FETCHED, {"output": result.output.model_dump(mode="json")}
    )
    stored = finish(self.app, res, job_id=current.job_id, callback=current.request.callback, outcome=result)
    log.info("job %s: completed, output at %s", current.job_id, result.output.uri)
    return stored


@app.task(name="lipsync.deliver_webhook", bind=True, max_retries=None, acks_late=True, ignore_result=True)
def deliver_webhook(self: AnyTask, url: str, payload: dict[str, Any], msg_id: str) -> None:
    """POST one signed webhook; retried on LIPSYNC_WEBHOOK_RETRY_DELAYS with the same webhook id."""
    res = resources()
    settings = res.settings
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    attempt = self.request.retries
    try:
        post_webhook(
            res.http,
            url,
            payload,
            msg_id=msg_id,
            secret=secret,
            timeout=settings.webhook_timeout,
            allow_private=settings.allow_private_urls,
        )
    except WebhookFailed as exc:
        delays = settings.webhook_retry_delays
        if attempt < len(delays):
            log.warning("%s; retrying in %.0f s (attempt %d)", exc, delays[attempt], attempt + 1)
            raise self.retry(countdown=delays[attempt]) from None
        _dead_letter(res, url, payload, msg_id, str(exc), attempt + 1)
    except (WebhookRejected, UnsafeURL) as exc:
        _dead_letter(res, url, payload, msg_id, str(exc), attempt + 1)
    else:
        log.info("webhook %s delivered (attempt %d)", msg_id, attempt + 1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _run_step(self: AnyTask, job: Job, res: Resources, step: Any) -> Any:
    """Run a step; retry it on :class:`Again`, end the job on an exception."""
    try:
        outcome = step(job, res)
    except Exception as exc:  # noqa: BLE001 - steps raise only what ends the job; see worker.steps
        _fail(self, job, exc, res)
    if isinstance(outcome, Again):
        if outcome.job.gen_status:
            _report(self, outcome.job, STATE_POLLING)
        raise self.retry(args=(outcome.job.model_dump(mode="json"),), countdown=outcome.countdown)
    return outcome


def _fail(self: AnyTask, job: Job, exc: BaseException, res: Resources) -> NoReturn:
    failure = failure_for(exc, job=job, job_id=job.job_id, metadata=job.request.metadata)
    stored = finish(self.app, res, job_id=job.job_id, callback=job.request.callback, outcome=failure)
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
    res.jobs.claim(job_id, task_id=str(self.request.id), model=str(raw_dict.get("model") or ""))
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
    for task_id in {job.task_id, self.request.id} - {None}:
        self.update_state(task_id=task_id, state=state, meta=meta)


def _target(job: Job) -> str:
    r = job.request
    layer = f"/layers/{r.layer_id}" if r.layer_id else ""
    return f"sheet {r.sheet_id} cell {r.cell_id}{layer}"


def _dead_letter(
    res: Resources, url: str, payload: dict[str, Any], msg_id: str, error: str, attempts: int
) -> None:
    log.error("webhook %s given up after %d attempts: %s", msg_id, attempts, error)
    res.jobs.dead_letter(
        {"msg_id": msg_id, "url": url, "payload": payload, "error": error, "attempts": attempts}
    )
