"""Handing outcomes and stage events to the caller: a Celery task by name, and/or a webhook.

Delivery is at least once, never "exactly once": every message has an id derived from the job id
and the message kind (``<job_id>.outcome``, ``<job_id>.event.submitted``...). It is the Celery task
id of a task callback and the ``webhook-id`` of a webhook, so a re-send after a crash (or a webhook
retried after a lost answer) carries the same id, and receivers dedupe on it. A webhook is owed from
the outbox (:mod:`worker.callbacks.outbox`) until it is delivered; :mod:`worker.callbacks.webhooks`
makes the attempts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from worker.callbacks.models import Callback, StageEvent
from worker.callbacks.outbox import Outbox
from worker.names import TASK_DELIVER_WEBHOOK
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.delivery")

#: The kinds of message one job can send, for looking up what it still owes.
MESSAGE_KINDS = ("outcome", *(f"event.{event.value}" for event in StageEvent))


def message_id(job_id: str, kind: str) -> str:
    return f"{job_id}.{kind}"


def dispatch(
    queue: TaskQueue,
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
        queue.send(callback.task, args=[payload], task_id=msg_id, queue=callback.queue)
        log.info("callback task %s sent for job %s (%s)", callback.task, job_id, kind)
    if callback.webhook_url:
        owe_webhook(
            queue, outbox, msg_id, str(callback.webhook_url), payload, queued_recovery=queued_recovery
        )


def owe_webhook(
    queue: TaskQueue,
    outbox: Outbox,
    msg_id: str,
    url: str,
    payload: dict[str, Any],
    *,
    queued_recovery: float,
) -> None:
    """Put the webhook in the outbox, then send the message that delivers it: never the other way
    round, so a failed send or a lost message still leaves it owed."""
    drive = outbox.put(msg_id, url, payload, due_at=time.time() + queued_recovery)
    send_delivery(queue, msg_id, drive)


def send_delivery(queue: TaskQueue, msg_id: str, drive: int) -> None:
    """Send the message that makes one worker deliver an outbox entry (only its id travels)."""
    queue.send(
        TASK_DELIVER_WEBHOOK, kwargs={"msg_id": msg_id, "drive": drive}, task_id=f"{msg_id}.webhook.{drive}"
    )


def replay_dead_letters(
    queue: TaskQueue, outbox: Outbox, msg_ids: set[str] | None, *, queued_recovery: float
) -> list[str]:
    """Owe dead-lettered webhooks again (all of them, or those named), each with its original id."""
    replayed = []
    for entry in outbox.dead_letters():
        if msg_ids is not None and entry["msg_id"] not in msg_ids:
            continue
        owe_webhook(
            queue, outbox, entry["msg_id"], entry["url"], entry["payload"], queued_recovery=queued_recovery
        )
        outbox.remove_dead_letter(entry)
        replayed.append(entry["msg_id"])
    return replayed
