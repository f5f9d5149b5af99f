"""``lipsync.deliver_webhook``: one attempt at an owed webhook (see :mod:`worker.callbacks.webhooks`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from tasks.base import AnyTask, redis_blinks_retried
from worker.app import app
from worker.callbacks import webhooks
from worker.jobs.resources import resources
from worker.names import TASK_DELIVER_WEBHOOK

log = logging.getLogger("lipsync.tasks")


@app.task(name=TASK_DELIVER_WEBHOOK, bind=True, max_retries=None, acks_late=True, ignore_result=True)
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
    with redis_blinks_retried(self):
        res = resources()
        if drive is None:
            if url is None or payload is None:
                log.error("webhook %s: message carries neither an outbox token nor a webhook", msg_id)
                return
            drive = res.outbox.put(msg_id, url, payload, due_at=time.time() + res.settings.queued_recovery)
        countdown = webhooks.attempt(res.outbox, res.http, res.settings, msg_id, drive, post=_post_in_time)
    if countdown is not None:
        raise self.retry(countdown=countdown)


def _post_in_time(*args: Any, **kwargs: Any) -> int:
    """The POST, with this task's soft time limit counted as a failed attempt: requests' timeout
    bounds each read, not the whole request (see webhooks.attempt_time_limits)."""
    try:
        return webhooks.post_webhook(*args, **kwargs)
    except SoftTimeLimitExceeded:
        raise webhooks.WebhookFailed(f"webhook {kwargs.get('msg_id')}: no answer in time") from None
