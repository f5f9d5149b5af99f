"""The Celery tasks themselves, run in this process on the real broker and result store (see
:mod:`tests.unit.jobs.inline`): what they leave in messages and results, and what a cancel during
the download leaves behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gensim import Fault, GenSimulator
from tests.unit.conftest import DURATIONS, FakeClock, queued
from tests.unit.jobs.builders import CALLBACK_QUEUE, TASK_CALLBACK, TASK_ID, request, submitted
from tests.unit.jobs.inline import InlineWorker, use_resources
from worker.celery_queue import CeleryQueue
from worker.errors import LipsyncJobFailed
from worker.jobs.cancel import cancel_job
from worker.jobs.records import JobStore
from worker.jobs.resources import Resources
from worker.names import (
    QUEUE_CALLBACKS,
    QUEUE_FETCH,
    QUEUE_JOBS,
    TASK_FETCH,
    TASK_POLL,
    TASK_RUN,
    TASK_SUBMIT,
)

#: A receiver's token in its webhook URL: it must stay in the job record (and the outbox entry).
TOKEN = "tok-SECRET-b7f3e1"
WEBHOOK_URL = f"https://hooks.example.com/lipsync?token={TOKEN}"
EVERY_EVENT = ["submitted", "generation_completed", "output_fetched"]


@pytest.fixture
def worker(res: Resources, queue: CeleryQueue, monkeypatch: pytest.MonkeyPatch) -> InlineWorker:
    use_resources(monkeypatch, res)
    return InlineWorker(queue.app, res)


def assert_no_token(worker: InlineWorker) -> None:
    for key, raw in worker.broker_and_results(CALLBACK_QUEUE):
        assert TOKEN.encode() not in raw, f"the webhook URL's token is in {key}"


def owed_url(res: Resources, msg_id: str) -> str:
    """The URL the outbox owes ``msg_id`` to (read as a delivery attempt would)."""
    [message] = [m for m in queued(res, QUEUE_CALLBACKS) if m["kwargs"]["msg_id"] == msg_id]
    attempt = res.outbox.claim(msg_id, message["kwargs"]["drive"], due_at=time.time() + 60)
    assert attempt is not None
    return attempt.url


def test_a_run_keeps_the_webhook_url_out_of_every_message_and_result(
    worker: InlineWorker, res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    callback = {**TASK_CALLBACK, "webhook_url": WEBHOOK_URL, "events": EVERY_EVENT}
    # The producer's own message carries it (that is how the job reaches us); nothing after it does.
    queue.app.send_task(TASK_RUN, kwargs={"request": request(callback=callback)}, task_id=TASK_ID)

    assert worker.run_next(QUEUE_JOBS) == TASK_RUN
    assert_no_token(worker)
    assert worker.run_next(QUEUE_JOBS) == TASK_SUBMIT
    assert_no_token(worker)
    clock.advance(DURATIONS["gen"] + 1)
    assert worker.run_next(QUEUE_JOBS) == TASK_POLL
    assert_no_token(worker)
    assert worker.run_next(QUEUE_FETCH) == TASK_FETCH
    assert_no_token(worker)

    # The callbacks still went where the record says.
    caller = queue.app.AsyncResult(TASK_ID)
    assert caller.state == "SUCCESS" and isinstance(caller.result, dict)
    assert caller.result["status"] == "completed"
    sent = {message["id"] for message in queued(res, CALLBACK_QUEUE)}
    assert sent == {
        "j1.outcome",
        "j1.event.submitted",
        "j1.event.generation_completed",
        "j1.event.output_fetched",
    }
    assert owed_url(res, "j1.outcome") == WEBHOOK_URL
    assert owed_url(res, "j1.event.output_fetched") == WEBHOOK_URL


def test_a_run_refused_at_the_edge_keeps_the_webhook_url_out_of_its_result(
    worker: InlineWorker, res: Resources, queue: CeleryQueue
) -> None:
    callback = {"webhook_url": WEBHOOK_URL}
    queue.app.send_task(
        TASK_RUN, kwargs={"request": request(sheet_id=None, callback=callback)}, task_id=TASK_ID
    )

    assert worker.run_next(QUEUE_JOBS) == TASK_RUN

    assert_no_token(worker)
    caller = queue.app.AsyncResult(TASK_ID)
    assert caller.state == "FAILURE" and isinstance(caller.result, LipsyncJobFailed)
    assert caller.result.failure["status"] == "rejected"
    assert owed_url(res, "j1.outcome") == WEBHOOK_URL


def test_messages_and_records_from_before_still_deliver_to_the_webhook(
    worker: InlineWorker, res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    """A record that kept the callback in its job only, and chain messages that carry it (both
    written before the callback got a place of its own in the record), still deliver."""
    job = submitted(res, callback={**TASK_CALLBACK, "webhook_url": WEBHOOK_URL, "events": EVERY_EVENT})
    old = job.model_dump(mode="json")
    assert old["request"]["callback"]["webhook_url"] == WEBHOOK_URL
    res.redis.hdel(JobStore.key("j1"), "callback")
    res.jobs.update("j1", job=old)
    queue.send_chain((TASK_POLL, TASK_FETCH), old, last_task_id=TASK_ID)
    clock.advance(DURATIONS["gen"] + 1)

    assert worker.run_next(QUEUE_JOBS) == TASK_POLL
    assert worker.run_next(QUEUE_FETCH) == TASK_FETCH

    assert queue.app.AsyncResult(TASK_ID).state == "SUCCESS"
    assert owed_url(res, "j1.outcome") == WEBHOOK_URL
    assert owed_url(res, "j1.event.output_fetched") == WEBHOOK_URL
    assert "j1.outcome" in {message["id"] for message in queued(res, CALLBACK_QUEUE)}


def test_a_job_redriven_from_a_record_from_before_keeps_its_callback(
    worker: InlineWorker, res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    """The sweeper re-drives from the record's job; a record from before holds the callback only
    there, and the re-driven messages do not carry it."""
    from worker.jobs.sweeper import sweep_once

    job = submitted(res, callback={"webhook_url": WEBHOOK_URL})
    res.redis.hdel(JobStore.key("j1"), "callback")
    res.jobs.update("j1", job=job.model_dump(mode="json"))
    clock.advance(res.settings.queued_recovery + res.settings.recovery_grace + DURATIONS["gen"])

    assert sweep_once(queue, res).redriven == ["j1"]
    assert_no_token(worker)
    assert worker.run_next(QUEUE_JOBS) == TASK_POLL
    assert worker.run_next(QUEUE_FETCH) == TASK_FETCH

    assert owed_url(res, "j1.outcome") == WEBHOOK_URL


# --------------------------------------------------------------------------------------------
# a cancel during the download
# --------------------------------------------------------------------------------------------


@pytest.fixture
def slow_cdn(sim: GenSimulator) -> Iterator[None]:
    # 1 KiB every 20 ms: the download takes about a second.
    sim.add_fault(Fault(endpoint="cdn", trickle=0.02))
    yield


def cancel_once_downloading(
    sim: GenSimulator, queue: CeleryQueue, res: Resources, outcome: list[dict[str, Any] | None]
) -> threading.Thread:
    """Cancel the job as soon as GEN's CDN is sending the output (it takes a second)."""

    def cancel() -> None:
        deadline = time.monotonic() + 10
        while not [r for r in sim.stats()["requests"] if r["endpoint"] == "cdn"]:
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.01)
        outcome.append(cancel_job(queue, res, "j1", reason="changed the take"))

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


def test_a_cancel_during_the_download_publishes_nothing_and_sends_no_output_event(
    worker: InlineWorker,
    res: Resources,
    queue: CeleryQueue,
    sim: GenSimulator,
    clock: FakeClock,
    slow_cdn: None,
) -> None:
    callback = {**TASK_CALLBACK, "events": ["output_fetched"]}
    queue.app.send_task(TASK_RUN, kwargs={"request": request(callback=callback)}, task_id=TASK_ID)
    worker.run_next(QUEUE_JOBS)
    worker.run_next(QUEUE_JOBS)
    clock.advance(DURATIONS["gen"] + 1)
    worker.run_next(QUEUE_JOBS)
    cancelled: list[dict[str, Any] | None] = []
    thread = cancel_once_downloading(sim, queue, res, cancelled)

    assert worker.run_next(QUEUE_FETCH) == TASK_FETCH
    thread.join(10)

    [stored] = cancelled
    assert stored is not None and stored["status"] == "cancelled"
    record = res.jobs.get("j1")
    assert record is not None and record.outcome == stored
    assert [m["id"] for m in queued(res, CALLBACK_QUEUE)] == ["j1.outcome"], "no output_fetched event"
    assert not (res.settings.storage_dir / "j1.mp4").exists()
    assert list(res.storage.staging_dir().iterdir()) == [], "the downloaded file was dropped"
    caller = queue.app.AsyncResult(TASK_ID)
    assert caller.state == "FAILURE" and isinstance(caller.result, LipsyncJobFailed)
    assert caller.result.failure == stored
