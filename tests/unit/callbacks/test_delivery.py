"""Handing payloads to callbacks (worker.callbacks.delivery) over a real Celery queue and outbox.

Nothing consumes the queue: :func:`queued` reads back what a worker would get. Where a test needs
the webhook delivered, it runs :func:`webhooks.attempt` with the queued message's own kwargs, as the
``lipsync.deliver_webhook`` task does, against a real receiver.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest
from kombu.exceptions import OperationalError

from gensim import GenSimulator
from tests.unit.conftest import queued, unit_settings
from tests.webhook_receiver import WebhookReceiver
from worker.app import create_app
from worker.callbacks import webhooks
from worker.callbacks.delivery import dispatch, message_id, owe_webhook, replay_dead_letters
from worker.callbacks.models import Callback
from worker.callbacks.outbox import Outbox
from worker.celery_queue import CeleryQueue
from worker.dev.embedded_redis import free_port
from worker.jobs.resources import Resources
from worker.names import ALL_QUEUES, QUEUE_CALLBACKS, TASK_DELIVER_WEBHOOK, WEBHOOKS_PENDING_KEY

PAYLOAD: dict[str, Any] = {"job_id": "j1", "status": "completed", "metadata": {"note": "café", "x": 0.1}}
#: A URL with a receiver's token in it: it must never travel in a task message.
HOOK_URL = "https://hooks.example.com/lipsync?token=SeCrEt-42"
QUEUED_RECOVERY = 300.0


def everything_queued(res: Resources) -> list[dict[str, Any]]:
    return [message for name in ALL_QUEUES for message in queued(res, name)]


def deliver(res: Resources, message: dict[str, Any]) -> float | None:
    """What the ``lipsync.deliver_webhook`` task does with its message."""
    assert message["task"] == TASK_DELIVER_WEBHOOK and message["args"] == []
    return webhooks.attempt(res.outbox, res.http, res.settings, **message["kwargs"])


def entry_drive(res: Resources, msg_id: str) -> int:
    raw = res.redis.hget(Outbox.key(msg_id), "drive")
    assert raw is not None
    return int(raw)


def test_message_ids_are_the_job_id_and_the_kind() -> None:
    assert message_id("j1", "outcome") == "j1.outcome"
    assert message_id("j1", "event.submitted") == "j1.event.submitted"


def test_no_callback_sends_nothing(res: Resources, queue: CeleryQueue) -> None:
    dispatch(queue, res.outbox, None, PAYLOAD, job_id="j1", kind="outcome", queued_recovery=QUEUED_RECOVERY)
    assert everything_queued(res) == []
    assert res.outbox.pending_count() == 0


@pytest.mark.parametrize("kind", ["outcome", "event.submitted"])
def test_a_task_callback_gets_one_message_with_the_payload_on_its_queue(
    res: Resources, queue: CeleryQueue, kind: str
) -> None:
    callback = Callback(task="pipeline.on_lipsync", queue="pipeline-results")

    dispatch(queue, res.outbox, callback, PAYLOAD, job_id="j1", kind=kind, queued_recovery=QUEUED_RECOVERY)

    (message,) = queued(res, "pipeline-results")
    assert message["task"] == "pipeline.on_lipsync"
    assert message["id"] == f"j1.{kind}"
    assert message["args"] == [PAYLOAD] and message["kwargs"] == {}
    assert everything_queued(res) == [], "nothing else was sent"
    assert res.outbox.pending_count() == 0, "no webhook owed"


def test_a_webhook_is_owed_and_its_message_carries_only_the_id_and_token(
    res: Resources, queue: CeleryQueue
) -> None:
    callback = Callback(webhook_url=HOOK_URL)  # pydantic parses the str

    before = time.time()
    dispatch(
        queue, res.outbox, callback, PAYLOAD, job_id="j1", kind="outcome", queued_recovery=QUEUED_RECOVERY
    )
    after = time.time()

    drive = entry_drive(res, "j1.outcome")
    (message,) = queued(res, QUEUE_CALLBACKS)
    assert message["task"] == TASK_DELIVER_WEBHOOK
    assert message["kwargs"] == {"msg_id": "j1.outcome", "drive": drive}
    assert message["args"] == []
    assert message["id"] == f"j1.outcome.webhook.{drive}"
    raw = b"".join(cast("list[bytes]", res.redis.lrange(QUEUE_CALLBACKS, 0, -1)))
    for secret in (b"hooks.example.com", b"SeCrEt-42", b"completed", b"caf"):
        assert secret not in raw, "URL and payload stay in the outbox"
    # The webhook itself is in the outbox, expected to start within queued_recovery.
    stored = cast("dict[bytes, bytes]", res.redis.hgetall(Outbox.key("j1.outcome")))
    assert stored[b"url"].decode() == HOOK_URL
    pending = res.outbox.pending("j1.outcome")
    assert pending is not None and pending["attempts"] == 0
    assert before + QUEUED_RECOVERY <= pending["due_at"] <= after + QUEUED_RECOVERY
    assert res.redis.zscore(WEBHOOKS_PENDING_KEY, "j1.outcome") == pending["due_at"]


def test_the_webhook_is_owed_before_its_message_is_sent(
    redis_url: str, sim: GenSimulator, tmp_path: Path, res: Resources
) -> None:
    # A broker that refuses: the send fails, and the webhook must still be owed (the sweeper
    # sends it again), which it is only if it went into the outbox first.
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    # Only the broker is down: results and records (`res`) stay on the live Redis.
    refusing = unit_settings(dead_broker, sim.base_url, tmp_path / "o", result_backend=redis_url)
    app = create_app(refusing)
    # Fail at once rather than after Celery's and kombu's retries.
    app.conf.task_publish_retry = False
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_retries": 0}
    callback = Callback(webhook_url=HOOK_URL)

    with pytest.raises(OperationalError):
        dispatch(
            CeleryQueue(app),
            res.outbox,
            callback,
            PAYLOAD,
            job_id="j1",
            kind="outcome",
            queued_recovery=QUEUED_RECOVERY,
        )

    pending = res.outbox.pending("j1.outcome")
    assert pending is not None and pending["attempts"] == 0
    assert res.outbox.overdue(time.time() + QUEUED_RECOVERY + 1) == ["j1.outcome"]


def test_task_and_webhook_both_get_the_same_message_id(
    res: Resources, queue: CeleryQueue, receiver: WebhookReceiver
) -> None:
    callback = Callback(task="pipeline.on_lipsync", webhook_url=receiver.url)

    dispatch(
        queue, res.outbox, callback, PAYLOAD, job_id="j1", kind="outcome", queued_recovery=QUEUED_RECOVERY
    )

    task_messages = [m for m in everything_queued(res) if m["task"] == "pipeline.on_lipsync"]
    (webhook_message,) = queued(res, QUEUE_CALLBACKS)
    assert [m["id"] for m in task_messages] == ["j1.outcome"]
    assert deliver(res, webhook_message) is None
    assert receiver.ids() == ["j1.outcome"]
    assert receiver.received[0].verified and receiver.received[0].payload == PAYLOAD


def test_owing_again_makes_the_earlier_message_stale(
    res: Resources, queue: CeleryQueue, receiver: WebhookReceiver
) -> None:
    for _ in range(2):  # a re-dispatch after a crash
        owe_webhook(queue, res.outbox, "j1.outcome", receiver.url, PAYLOAD, queued_recovery=QUEUED_RECOVERY)

    first, second = queued(res, QUEUE_CALLBACKS)
    assert first["kwargs"]["drive"] < second["kwargs"]["drive"] == entry_drive(res, "j1.outcome")
    assert deliver(res, first) is None
    assert receiver.attempts == 0, "the stale message sent nothing"
    assert deliver(res, second) is None
    assert receiver.ids() == ["j1.outcome"]


def dead_letter(res: Resources, queue: CeleryQueue, receiver: WebhookReceiver, *msg_ids: str) -> None:
    """Owe each webhook and have the receiver answer 410 Gone to it: dead-lettered."""
    receiver.fail_next, receiver.fail_status = len(msg_ids), 410
    for msg_id in msg_ids:
        owe_webhook(queue, res.outbox, msg_id, receiver.url, {**PAYLOAD, "id": msg_id}, queued_recovery=60)
    for message in queued(res, QUEUE_CALLBACKS):
        assert deliver(res, message) is None
    res.redis.delete(QUEUE_CALLBACKS)
    assert [d["msg_id"] for d in res.outbox.dead_letters()] == list(msg_ids)
    assert res.outbox.pending_count() == 0 and receiver.received == []


def test_replaying_all_dead_letters_owes_them_again_with_their_ids(
    res: Resources, queue: CeleryQueue, receiver: WebhookReceiver
) -> None:
    dead_letter(res, queue, receiver, "a.outcome", "b.event.submitted")

    replayed = replay_dead_letters(queue, res.outbox, None, queued_recovery=QUEUED_RECOVERY)

    assert replayed == ["a.outcome", "b.event.submitted"]
    assert res.outbox.dead_letters() == []
    for msg_id in replayed:
        pending = res.outbox.pending(msg_id)
        assert pending is not None and pending["attempts"] == 0, "attempts start over"
    messages = queued(res, QUEUE_CALLBACKS)
    assert [m["kwargs"]["msg_id"] for m in messages] == replayed
    for message in messages:
        assert deliver(res, message) is None
    assert sorted(receiver.ids()) == ["a.outcome", "b.event.submitted"]
    assert {r.msg_id: r.payload["id"] for r in receiver.received} == {
        "a.outcome": "a.outcome",
        "b.event.submitted": "b.event.submitted",
    }
    assert all(r.verified for r in receiver.received)
    assert res.outbox.pending_count() == 0


def test_replaying_named_dead_letters_leaves_the_others(
    res: Resources, queue: CeleryQueue, receiver: WebhookReceiver
) -> None:
    dead_letter(res, queue, receiver, "a.outcome", "b.outcome", "c.outcome")

    replayed = replay_dead_letters(
        queue, res.outbox, {"b.outcome", "nope.outcome"}, queued_recovery=QUEUED_RECOVERY
    )

    assert replayed == ["b.outcome"]
    assert [d["msg_id"] for d in res.outbox.dead_letters()] == ["a.outcome", "c.outcome"]
    (message,) = queued(res, QUEUE_CALLBACKS)
    assert message["kwargs"]["msg_id"] == "b.outcome"
    assert res.outbox.pending("a.outcome") is None and res.outbox.pending("nope.outcome") is None
    assert deliver(res, message) is None
    assert receiver.ids() == ["b.outcome"]


def test_replaying_nothing_sends_nothing(
    res: Resources, queue: CeleryQueue, receiver: WebhookReceiver
) -> None:
    dead_letter(res, queue, receiver, "a.outcome")
    assert replay_dead_letters(queue, res.outbox, set(), queued_recovery=QUEUED_RECOVERY) == []
    assert everything_queued(res) == []
    assert len(res.outbox.dead_letters()) == 1
