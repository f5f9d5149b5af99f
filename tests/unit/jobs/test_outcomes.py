"""Ending a job once and telling the caller (outcomes), and refusing requests (failures), against a
real Redis and the real CeleryQueue (its messages read back with :func:`queued`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from tests.unit.conftest import FakeClock, queued
from tests.unit.jobs.builders import CALLBACK_QUEUE, TASK_CALLBACK, TASK_ID, created, failure, request, result
from worker.callbacks.models import StageEvent
from worker.celery_queue import CeleryQueue
from worker.errors import ConfigurationError, RequestInvalid
from worker.gen.errors import GenNotFound
from worker.jobs import steps
from worker.jobs.errors import GenerationStopped, JobTimeout
from worker.jobs.failures import failure_for, reject
from worker.jobs.models import Job, LipsyncRequest
from worker.jobs.outcomes import emit_event, finish
from worker.jobs.resources import Resources
from worker.jobs.sweeper import sweep_once
from worker.names import ACTIVE_JOBS_KEY, QUEUE_CALLBACKS, QUEUE_JOBS, TASK_DELIVER_WEBHOOK
from worker.ops.metrics import CALLBACKS_KEY, JOB_DURATION_KEY, JOBS_FINISHED_KEY

WEBHOOK_URL = "https://example.com/hook"


def counters(res: Resources, key: str) -> dict[tuple[str, ...], float]:
    """A metrics hash as {labels: value}."""
    raw: dict[bytes, bytes] = res.redis.hgetall(key)  # type: ignore[assignment]
    return {tuple(json.loads(field)): float(value) for field, value in raw.items()}


# --------------------------------------------------------------------------------------------
# finish
# --------------------------------------------------------------------------------------------


def test_finish_records_the_first_outcome_only_and_sends_once(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, callback=TASK_CALLBACK)
    first = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=failure())
    assert first == failure().model_dump(mode="json")
    second = finish(
        queue, res, job_id="j1", callback=job.request.callback, outcome=failure("cancelled", "cancelled")
    )
    assert second == first, "the first writer decides"

    record = res.jobs.get("j1")
    assert record is not None
    assert record.outcome == first and record.state == "failed"
    assert len(queued(res, CALLBACK_QUEUE)) == 1, "nothing new for the later writer"
    assert counters(res, JOBS_FINISHED_KEY) == {("gen", "failed"): 1}
    assert counters(res, CALLBACKS_KEY) == {("task", "sent"): 1}


def test_finish_counts_the_job_duration_once(res: Resources, queue: CeleryQueue) -> None:
    created(res)
    finish(queue, res, job_id="j1", callback=None, outcome=result())
    finish(queue, res, job_id="j1", callback=None, outcome=result())
    assert counters(res, JOBS_FINISHED_KEY) == {("gen", "completed"): 1}
    # One observation of the result's total_seconds (42.5 s: the 60 s bucket).
    assert counters(res, JOB_DURATION_KEY) == {("gen", "60.0"): 1, ("gen", "sum"): 42.5}


def test_the_task_callback_is_the_payload_under_the_outcome_id(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, callback=TASK_CALLBACK)
    stored = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=result())
    assert stored == result().model_dump(mode="json")
    [message] = queued(res, CALLBACK_QUEUE)
    assert message["task"] == "pipeline.on_lipsync"
    assert message["id"] == "j1.outcome"
    assert message["args"] == [stored] and message["kwargs"] == {}
    assert queued(res, QUEUE_JOBS) == [] and queued(res, QUEUE_CALLBACKS) == []


def test_a_task_callback_without_a_queue_goes_to_the_default_queue(
    res: Resources, queue: CeleryQueue
) -> None:
    job = created(res, callback={"task": "pipeline.on_lipsync"})
    finish(queue, res, job_id="j1", callback=job.request.callback, outcome=failure())
    [message] = queued(res, QUEUE_JOBS)
    assert (message["task"], message["id"]) == ("pipeline.on_lipsync", "j1.outcome")


def test_a_webhook_callback_is_owed_in_the_outbox_and_its_delivery_queued(
    res: Resources, queue: CeleryQueue
) -> None:
    job = created(res, callback={"webhook_url": WEBHOOK_URL})
    stored = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=result())
    pending = res.outbox.pending("j1.outcome")
    assert pending is not None and pending["attempts"] == 0
    [message] = queued(res, QUEUE_CALLBACKS)
    assert message["task"] == TASK_DELIVER_WEBHOOK
    drive = message["kwargs"]["drive"]
    assert message["kwargs"] == {"msg_id": "j1.outcome", "drive": drive}
    assert message["args"] == []
    assert message["id"] == f"j1.outcome.webhook.{drive}"
    attempt = res.outbox.claim("j1.outcome", drive, due_at=0.0)
    assert attempt is not None
    assert (attempt.url, attempt.payload, attempt.number) == (WEBHOOK_URL, stored, 1)
    assert counters(res, CALLBACKS_KEY) == {}, "a webhook counts when delivered, not when owed"


def test_both_targets_get_the_same_payload(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, callback={**TASK_CALLBACK, "webhook_url": WEBHOOK_URL})
    stored = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=failure())
    [task] = queued(res, CALLBACK_QUEUE)
    [deliver] = queued(res, QUEUE_CALLBACKS)
    attempt = res.outbox.claim("j1.outcome", deliver["kwargs"]["drive"], due_at=0.0)
    assert attempt is not None and task["args"] == [stored] == [attempt.payload]


def test_finish_marks_callbacks_dispatched_and_leaves_the_active_set(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    job = created(res, callback=TASK_CALLBACK)
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is not None
    finish(queue, res, job_id="j1", callback=job.request.callback, outcome=failure())
    record = res.jobs.get("j1")
    assert record is not None and record.callbacks_dispatched
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") is None
    assert res.jobs.overdue(clock() + 10**9) == []


def test_a_later_writer_dispatches_when_the_first_dispatch_is_unconfirmed(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    job = created(res, callback=TASK_CALLBACK)
    recorded = failure("timeout", "timeout").model_dump(mode="json")
    # A worker recorded the outcome, then died before dispatching it.
    res.jobs.end("j1", recorded, state="timeout", overdue_at=clock() + 60)
    stored = finish(queue, res, job_id="j1", callback=job.request.callback, outcome=result())
    assert stored == recorded
    [message] = queued(res, CALLBACK_QUEUE)
    assert message["id"] == "j1.outcome" and message["args"] == [recorded]
    record = res.jobs.get("j1")
    assert record is not None and record.callbacks_dispatched
    assert counters(res, JOBS_FINISHED_KEY) == {}, "only the writer that decided counts the job"


def test_a_refused_dispatch_leaves_the_outcome_for_the_sweeper_after_the_grace(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    job = created(res, callback=TASK_CALLBACK)
    # The broker refuses the callback: its queue's key holds a string, so Redis answers WRONGTYPE.
    res.redis.set(CALLBACK_QUEUE, "not a list")
    with pytest.raises(OperationalError):
        finish(queue, res, job_id="j1", callback=job.request.callback, outcome=failure())
    record = res.jobs.get("j1")
    assert record is not None and record.outcome == failure().model_dump(mode="json")
    assert not record.callbacks_dispatched
    due = clock() + res.settings.recovery_grace
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "j1") == due
    assert counters(res, JOBS_FINISHED_KEY) == {("gen", "failed"): 1}

    res.redis.delete(CALLBACK_QUEUE)
    assert not sweep_once(queue, res, now=due - 1)
    assert sweep_once(queue, res, now=due).redispatched == ["j1"]
    [message] = queued(res, CALLBACK_QUEUE)
    assert message["id"] == "j1.outcome" and message["args"] == [record.outcome]
    assert counters(res, JOBS_FINISHED_KEY) == {("gen", "failed"): 1}, "still counted once"
    record = res.jobs.get("j1")
    assert record is not None and record.callbacks_dispatched


# --------------------------------------------------------------------------------------------
# stage events
# --------------------------------------------------------------------------------------------


def test_emit_event_sends_each_subscribed_event_once(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    job = created(res, callback={**TASK_CALLBACK, "events": ["submitted"]}, metadata={"shot": 7})
    job = job.model_copy(update={"generation_id": "9001"})
    emit_event(queue, res, job, StageEvent.SUBMITTED, {"gen_status": "pending"})
    emit_event(queue, res, job, StageEvent.SUBMITTED, {"gen_status": "pending"})
    [message] = queued(res, CALLBACK_QUEUE)
    assert message["task"] == "pipeline.on_lipsync"
    assert message["id"] == "j1.event.submitted"
    [payload] = message["args"]
    assert payload["type"] == "lipsync.event" and payload["event"] == "submitted"
    assert payload["job_id"] == "j1" and payload["generation_id"] == "9001"
    assert payload["at"] == clock() and payload["data"] == {"gen_status": "pending"}
    assert payload["metadata"] == {"shot": 7}


def test_emit_event_sends_nothing_for_unsubscribed_events(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, callback={**TASK_CALLBACK, "webhook_url": WEBHOOK_URL, "events": ["submitted"]})
    emit_event(queue, res, job, StageEvent.GENERATION_COMPLETED, {})
    emit_event(queue, res, job, StageEvent.OUTPUT_FETCHED, {})
    assert queued(res, CALLBACK_QUEUE) == [] and queued(res, QUEUE_CALLBACKS) == []
    assert res.outbox.pending_count() == 0
    # Not marked either: a later subscription (same job id) is not blocked by an earlier skip.
    assert res.jobs.mark_once("j1", "event:generation_completed")


def test_emit_event_without_a_callback_sends_nothing(res: Resources, queue: CeleryQueue) -> None:
    job = created(res)
    emit_event(queue, res, job, StageEvent.SUBMITTED, {})
    assert queued(res, QUEUE_JOBS) == [] and queued(res, QUEUE_CALLBACKS) == []


def test_a_webhook_event_is_owed_under_its_own_id(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, callback={"webhook_url": WEBHOOK_URL, "events": ["output_fetched"]})
    emit_event(queue, res, job, StageEvent.OUTPUT_FETCHED, {"uri": "file:///x.mp4"})
    emit_event(queue, res, job, StageEvent.OUTPUT_FETCHED, {"uri": "file:///x.mp4"})
    [message] = queued(res, QUEUE_CALLBACKS)
    assert message["kwargs"]["msg_id"] == "j1.event.output_fetched"
    assert res.outbox.pending("j1.event.output_fetched") is not None


# --------------------------------------------------------------------------------------------
# failures: failure_for and reject
# --------------------------------------------------------------------------------------------


def invalid(raw: Any) -> RequestInvalid:
    """The RequestInvalid the real validation raises for ``raw``."""
    with pytest.raises(RequestInvalid) as caught:
        LipsyncRequest.parse(raw)
    return caught.value


def test_reject_records_a_validation_failure_under_the_request_job_id(
    res: Resources, queue: CeleryQueue
) -> None:
    raw = request("bad-1", sheet_id=None, callback=TASK_CALLBACK, metadata={"shot": 7})
    stored = reject(queue, res, raw, invalid(raw), task_id="t-run-1")
    assert stored["status"] == "rejected" and stored["error_code"] == "validation_error"
    assert stored["job_id"] == "bad-1" and stored["metadata"] == {"shot": 7}
    assert stored["errors"] and stored["errors"][0]["field"] == "sheet_id"
    assert stored["timings"] is None and stored["model"] is None and stored["generation_id"] is None

    record = res.jobs.get("bad-1")
    assert record is not None
    assert record.outcome == stored and record.task_id == "t-run-1" and record.state == "rejected"
    assert record.callbacks_dispatched
    assert res.redis.zscore(ACTIVE_JOBS_KEY, "bad-1") is None

    [message] = queued(res, CALLBACK_QUEUE)
    assert message["id"] == "bad-1.outcome" and message["args"] == [stored]
    assert message["task"] == "pipeline.on_lipsync"


def test_reject_uses_the_task_id_when_the_job_id_is_unreadable(res: Resources, queue: CeleryQueue) -> None:
    raw = request("not a valid id!", sheet_id=None, callback=TASK_CALLBACK)
    stored = reject(queue, res, raw, invalid(raw), task_id="t-run-2")
    assert stored["job_id"] == "t-run-2"
    assert res.jobs.get("not a valid id!") is None
    record = res.jobs.get("t-run-2")
    assert record is not None and record.outcome == stored
    [message] = queued(res, CALLBACK_QUEUE)
    assert message["id"] == "t-run-2.outcome"


def test_reject_without_a_readable_callback_sends_nothing(res: Resources, queue: CeleryQueue) -> None:
    raw = request("bad-3", callback={"queue": "media"})  # a queue without a task is not a callback
    stored = reject(queue, res, raw, invalid(raw), task_id="t-run-3")
    assert stored["status"] == "rejected"
    record = res.jobs.get("bad-3")
    assert record is not None and record.outcome == stored
    for name in (CALLBACK_QUEUE, QUEUE_JOBS, QUEUE_CALLBACKS):
        assert queued(res, name) == []


def test_reject_of_a_non_object_request_is_findable_by_task_id(res: Resources, queue: CeleryQueue) -> None:
    stored = reject(queue, res, ["not", "an", "object"], invalid(["x"]), task_id="t-run-4")
    assert stored["job_id"] == "t-run-4" and stored["error_code"] == "validation_error"
    assert stored["errors"] == [{"field": "request", "message": "must be a JSON object"}]
    assert res.jobs.get("t-run-4") is not None


def test_reject_leaves_another_valid_job_with_that_id_alone(res: Resources, queue: CeleryQueue) -> None:
    job = created(res, "j1", callback=TASK_CALLBACK)
    raw = request("j1", cell_id=True, callback=TASK_CALLBACK)
    stored = reject(queue, res, raw, invalid(raw), task_id="someone-else")
    assert stored["status"] == "rejected" and stored["job_id"] == "j1"
    record = res.jobs.get("j1")
    assert record is not None
    assert record.outcome is None and record.task_id == job.task_id
    assert queued(res, CALLBACK_QUEUE) == []


def test_reject_twice_for_the_same_task_records_and_sends_once(res: Resources, queue: CeleryQueue) -> None:
    raw = request("bad-5", colour="red", callback=TASK_CALLBACK)
    first = reject(queue, res, raw, invalid(raw), task_id="t-run-5")
    again = reject(queue, res, raw, invalid(raw), task_id="t-run-5")
    assert again == first
    assert len(queued(res, CALLBACK_QUEUE)) == 1
    assert counters(res, JOBS_FINISHED_KEY) == {("unknown", "rejected"): 1}


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (JobTimeout("too slow", generation_id="9002"), "timeout", "timeout"),
        (GenerationStopped("stopped on GEN"), "stopped", "generation_stopped"),
        (ConfigurationError("LIPSYNC_GEN_API_KEY is not set"), "failed", "configuration_error"),
        (RuntimeError("boom"), "failed", "internal_error"),
    ],
)
def test_failure_for_maps_what_ended_the_job(
    res: Resources, clock: FakeClock, exc: BaseException, status: str, code: str
) -> None:
    job = created(res).model_copy(update={"generation_id": "9001"})
    clock.advance(30)
    out = failure_for(exc, job=job, job_id="j1", metadata={"k": 1}, now=clock())
    assert (out.status, out.error_code) == (status, code)
    assert out.model == "gen" and out.metadata == {"k": 1}
    assert out.timings is not None and out.timings.total_seconds == 30
    expected_generation = getattr(exc, "generation_id", None) or "9001"
    assert out.generation_id == expected_generation


def test_failure_for_a_gen_refusal_before_submit_is_a_rejection(res: Resources, clock: FakeClock) -> None:
    job = created(res)
    exc = GenNotFound("no such cell", status_code=404, error_code="not_found", endpoint="generate")
    out = failure_for(exc, job=job, job_id="j1", metadata={}, now=clock())
    assert (out.status, out.error_code, out.generation_id) == ("rejected", "not_found", None)
    after = failure_for(
        exc, job=job.model_copy(update={"generation_id": "9001"}), job_id="j1", metadata={}, now=clock()
    )
    assert after.status == "failed", "once GEN accepted the job, a refusal fails it"


def test_the_callers_async_result_resolves_when_the_outcome_is_recorded(
    res: Resources, queue: CeleryQueue
) -> None:
    # The chain's last task may die (or be cancelled on a lost broker connection) right after it
    # recorded the outcome; nothing runs it again for a job that has one, so finish resolves it.
    created(res)
    finish(queue, res, job_id="j1", callback=None, outcome=result())
    caller = queue.app.AsyncResult(TASK_ID)
    assert caller.state == "SUCCESS" and caller.get(timeout=1)["job_id"] == "j1"
    steps.create(request("j2"), task_id="caller-2", res=res)
    finish(queue, res, job_id="j2", callback=None, outcome=failure(job_id="j2"))
    assert queue.app.AsyncResult("caller-2").state == "FAILURE"


def test_emit_event_takes_the_callback_from_the_record_the_step_read(
    res: Resources, queue: CeleryQueue
) -> None:
    created(res, callback={**TASK_CALLBACK, "events": ["submitted"]})
    record = res.jobs.get("j1")
    travelling = Job.model_validate(record.job if record is not None else {})
    assert travelling.request.callback is None, "jobs in messages carry no callback"

    def reads() -> int:
        stats = res.redis.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("hmget", "hget", "hgetall"))

    before = reads()
    emit_event(queue, res, travelling, StageEvent.SUBMITTED, {}, record=record)
    assert reads() == before, "the record was read again"
    [message] = queued(res, CALLBACK_QUEUE)
    assert message["id"] == "j1.event.submitted"
