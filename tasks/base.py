"""What every lipsync task shares: its options, and what it does when our own Redis blinks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Task

from worker.errors import LipsyncJobFailed
from worker.retry import Retry, RetryPolicy, decide

log = logging.getLogger("lipsync.tasks")

AnyTask = Task[Any, Any]

STEP_OPTIONS: dict[str, Any] = {
    "bind": True,
    # Our own bounds (deadline, retry policies) decide when to give up, not Celery's count.
    "max_retries": None,
    "acks_late": True,
    # A failed job is an expected outcome: log it without a traceback.
    "throws": (LipsyncJobFailed,),
    # No STARTED state in the result backend for each step (one write per task): callers read the
    # progress under their own id (worker.ops.progress), Flower reads the task-started events.
    "track_started": False,
}

#: Our own state store (job records, outbox) blinked: that ends nothing. Run the step again, a
#: little later each time, for as long as it takes.
REDIS_BLINK = RetryPolicy(limit=None, delays=tuple(2.0 * n for n in range(1, 16)))


def retry_after_redis_error(task: AnyTask, exc: BaseException) -> None:
    """If ``exc`` is a Redis error, re-run this task shortly (raises Celery's Retry); else return.

    If the broker is down too, the publish fails and Celery drops this message; the job record
    (written before the chain moved) lets the sweeper re-drive the job.
    """
    if not isinstance(exc, redis.RedisError):
        return
    verdict = decide(exc, retries=task.request.retries, policy=REDIS_BLINK)
    assert isinstance(verdict, Retry)  # an unlimited policy never gives up
    log.warning("Redis error in %s (%s); retrying the step", task.name, type(exc).__name__)
    raise task.retry(countdown=verdict.delay, exc=exc) from None


@contextmanager
def redis_blinks_retried(task: AnyTask) -> Iterator[None]:
    """Run the block; a Redis error in it runs this task again shortly (:func:`retry_after_redis_error`),
    anything else goes on up."""
    try:
        yield
    except redis.RedisError as exc:
        retry_after_redis_error(task, exc)
        raise  # not reached: a Redis error always retries


def without_callback(task: AnyTask, argument: str) -> None:
    """Drop the callback from the ``argument`` Celery keeps with this task's result (it stores a
    task's arguments): its webhook URL can carry a receiver's token, and our own store (the job
    record, the card) has it. The argument itself was read already."""
    request = task.request

    def scrub(value: Any) -> Any:
        return {k: v for k, v in value.items() if k != "callback"} if isinstance(value, dict) else value

    if isinstance(request.kwargs, dict) and argument in request.kwargs:
        request.kwargs = {**request.kwargs, argument: scrub(request.kwargs[argument])}
    if request.args:
        request.args = [scrub(arg) for arg in request.args]
