"""Handing outcomes and stage events to the caller: a Celery task by name, and/or a webhook.

Every message has an id derived from the job id and the message kind (``<job_id>.outcome``,
``<job_id>.event.submitted``...). It is the Celery task id of a signature callback and the
``webhook-id`` of a webhook, so a re-send after a crash carries the same id and receivers can
dedupe on it. Webhooks are kept in the outbox (:mod:`worker.outbox`) until delivered.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import requests
from celery import Celery

from worker.models import Callback
from worker.outbox import Outbox
from worker.urlguard import check_url
from worker.webhooks import signed_headers

log = logging.getLogger("lipsync.delivery")

WEBHOOK_TASK = "lipsync.deliver_webhook"


class WebhookRejected(Exception):
    """The receiver answered in a way that retrying will not fix (HTTP 410 Gone)."""


class WebhookFailed(Exception):
    """This attempt failed (connection, timeout, non-2xx); a later attempt may succeed."""


def attempt_time_limits(webhook_timeout: float) -> tuple[float, float]:
    """Soft and hard time limits (seconds) of one delivery task.

    requests' timeout bounds each socket read, not the whole request: a receiver answering one byte
    at a time would hold a worker slot for as long as it likes. The soft limit ends the attempt as a
    failed one; the hard limit (the pool kills the process) is the backstop.
    """
    return webhook_timeout + 1.0, webhook_timeout + 10.0


def message_id(job_id: str, kind: str) -> str:
    return f"{job_id}.{kind}"


def dispatch(
    app: Celery,
    outbox: Outbox,
    callback: Callback | None,
    payload: dict[str, Any],
    *,
    job_id: str,
    kind: str,
    queued_recovery: float,
) -> None:
    """Send ``payload`` to the callback's targets. Raises if Redis or the broker refuses.

    A webhook is owed (:func:`owe_webhook`); its message is expected to start within
    ``queued_recovery`` (a queue may have a backlog) before the sweeper sends it again.
    """
    if callback is None:
        return
    msg_id = message_id(job_id, kind)
    if callback.task:
        options: dict[str, Any] = {"task_id": msg_id}
        if callback.queue:
            options["queue"] = callback.queue
        app.send_task(callback.task, args=[payload], **options)
        log.info("callback task %s sent for job %s (%s)", callback.task, job_id, kind)
    if callback.webhook_url:
        owe_webhook(app, outbox, msg_id, str(callback.webhook_url), payload, queued_recovery=queued_recovery)


def owe_webhook(
    app: Celery, outbox: Outbox, msg_id: str, url: str, payload: dict[str, Any], *, queued_recovery: float
) -> None:
    """Put the webhook in the outbox, then send the message that delivers it: never the other way
    round, so a failed send or a lost message still leaves it owed."""
    drive = outbox.put(msg_id, url, payload, due_at=time.time() + queued_recovery)
    send_delivery(app, msg_id, drive)


def send_delivery(app: Celery, msg_id: str, drive: int) -> None:
    """Send the message that makes one worker deliver an outbox entry (only its id travels)."""
    app.send_task(
        WEBHOOK_TASK, kwargs={"msg_id": msg_id, "drive": drive}, task_id=f"{msg_id}.webhook.{drive}"
    )


def post_webhook(
    session: requests.Session,
    url: str,
    payload: dict[str, Any],
    *,
    msg_id: str,
    secret: str | None,
    timeout: float,
    allow_private: bool,
) -> int:
    """One delivery attempt. Returns the HTTP status on success (2xx).

    Redirects are not followed (a 3xx is a failure, as Standard Webhooks says): following one would
    let a receiver bounce us to an internal address.

    Raises:
        WebhookRejected: 410 Gone; the receiver asked us to stop.
        WebhookFailed: anything else that is not 2xx, or the request did not complete.
        UnsafeURL: the URL points at an address we refuse.
    """
    check_url(url, allow_private=allow_private)
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = signed_headers(secret, msg_id, body)
    try:
        response = session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise WebhookFailed(f"webhook {msg_id}: {type(exc).__name__}") from None
    with response:
        if 200 <= response.status_code < 300:
            return response.status_code
        if response.status_code == 410:
            raise WebhookRejected(f"webhook {msg_id}: receiver answered 410 Gone")
        raise WebhookFailed(f"webhook {msg_id}: receiver answered HTTP {response.status_code}")


def replay_dead_letters(
    app: Celery, outbox: Outbox, msg_ids: set[str] | None, *, queued_recovery: float
) -> list[str]:
    """Owe dead-lettered webhooks again (all of them, or those named), each with its original id."""
    replayed = []
    for entry in outbox.dead_letters():
        if msg_ids is not None and entry["msg_id"] not in msg_ids:
            continue
        owe_webhook(
            app, outbox, entry["msg_id"], entry["url"], entry["payload"], queued_recovery=queued_recovery
        )
        outbox.remove_dead_letter(entry)
        replayed.append(entry["msg_id"])
    return replayed
