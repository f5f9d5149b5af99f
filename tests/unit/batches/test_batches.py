"""The batch core against a real Redis and a real broker (nothing consumes it: the tests read what
was sent, as a worker would get it): admission bounded by max_parallel, each item's end admitting
the next, one batch callback, joins, re-sends, the sweeper's continuation, and cancel."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.conftest import FakeClock, ResFactory, queued
from worker.batches import progress
from worker.batches.models import BatchInvalid
from worker.batches.validation import validate
from worker.celery_queue import CeleryQueue
from worker.jobs.errors import FailureStatus
from worker.jobs.models import LipsyncFailure
from worker.jobs.outcomes import finish
from worker.jobs.resources import Resources
from worker.jobs.sweeper import sweep_once
from worker.names import QUEUE_JOBS, TASK_SUBMIT

BATCH_CALLBACK = {"task": "pipeline.batch_done", "queue": "media"}


def item(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "sheet_id": 101,
        "cell_id": 3000 + n,
        "video_resource_id": 5001,
        "audio_resource_id": 6001,
        "metadata": {"n": n},
        **extra,
    }


def batch_of(n: int, **extra: Any) -> dict[str, Any]:
    return {"batch_id": "ep-1", "items": [item(i) for i in range(n)], "callback": BATCH_CALLBACK, **extra}


def runs(res: Resources) -> list[str]:
    """Job ids of the jobs whose chains were sent, oldest first (each chain's last step runs under
    its job's id)."""
    chains = [m for m in queued(res, QUEUE_JOBS) if m["task"] == TASK_SUBMIT]
    assert all(m["last_id"] == m["args"][0]["request"]["job_id"] for m in chains), chains
    return [m["last_id"] for m in chains]


def batch_callbacks(res: Resources) -> list[dict[str, Any]]:
    return queued(res, "media")


def end(queue: CeleryQueue, res: Resources, job_id: str, status: FailureStatus = "failed") -> None:
    failure = LipsyncFailure(job_id=job_id, status=status, error_code="generation_failed", message="no face")
    finish(queue, res, job_id=job_id, callback=None, outcome=failure)


def start(queue: CeleryQueue, res: Resources, raw: dict[str, Any]) -> bool:
    return progress.start(queue, res, validate(raw, res.settings))


# -- bad input ---------------------------------------------------------------------------------


def test_invalid_items_are_reported_by_index_with_their_fields(res: Resources) -> None:
    raw = batch_of(4)
    raw["items"][1].pop("cell_id")
    raw["items"][3]["model"] = "nope"
    with pytest.raises(BatchInvalid) as caught:
        validate(raw, res.settings)
    found = {(int(e["index"]), e["field"]) for e in caught.value.errors}
    assert found == {(1, "cell_id"), (3, "model")}
    assert caught.value.code == "validation_error"


def test_an_empty_batch_and_one_above_the_limit_are_refused(make_res: ResFactory) -> None:
    res = make_res(max_batch_items=3)
    with pytest.raises(BatchInvalid) as empty:
        validate({"items": []}, res.settings)
    assert empty.value.code == "empty_batch"
    with pytest.raises(BatchInvalid) as large:
        validate(batch_of(4), res.settings)
    assert large.value.code == "batch_too_large"
    assert "LIPSYNC_MAX_BATCH_ITEMS" in str(large.value)


def test_a_batch_id_too_long_for_its_items_job_ids_is_refused(res: Resources) -> None:
    with pytest.raises(BatchInvalid) as caught:
        validate({**batch_of(2), "batch_id": "b" * 101}, res.settings)
    assert [e["field"] for e in caught.value.errors] == ["batch_id"]
    assert validate({**batch_of(2), "batch_id": "b" * 100}, res.settings).items[1].job_id == "b" * 100 + ".1"


def test_two_items_with_one_job_id_are_refused(res: Resources) -> None:
    raw = {"items": [item(0, job_id="same"), item(1, job_id="same")]}
    with pytest.raises(BatchInvalid) as caught:
        validate(raw, res.settings)
    assert int(caught.value.errors[0]["index"]) == 1
    assert caught.value.errors[0]["field"] == "job_id"


def test_an_item_webhook_that_would_go_out_unsigned_is_refused(make_res: ResFactory) -> None:
    res = make_res(webhook_secret=None)
    raw = batch_of(2)
    raw["items"][1]["callback"] = {"webhook_url": "https://example.com/hook"}
    with pytest.raises(BatchInvalid) as caught:
        validate(raw, res.settings)
    assert [(int(e["index"]), e["field"]) for e in caught.value.errors] == [(1, "callback.webhook_url")]


# -- admission ---------------------------------------------------------------------------------


def test_items_start_as_jobs_at_most_max_parallel_at_a_time(queue: CeleryQueue, res: Resources) -> None:
    assert start(queue, res, batch_of(5, max_parallel=2))
    assert runs(res) == ["ep-1.0", "ep-1.1"]
    sent = queued(res, QUEUE_JOBS)[0]
    assert sent["args"][0]["request"]["callback"] is None  # the callback stays in the record
    end(queue, res, "ep-1.0")
    assert runs(res) == ["ep-1.0", "ep-1.1", "ep-1.2"]
    record = progress.store_of(res).get("ep-1")
    assert record is not None and (record.admitted, record.ended, record.in_flight) == (3, 1, 2)


def test_the_default_max_parallel_is_the_setting(queue: CeleryQueue, make_res: ResFactory) -> None:
    res = make_res(batch_max_parallel=3)
    start(queue, res, batch_of(10))
    assert len(runs(res)) == 3


def test_the_last_item_sends_one_batch_callback_with_every_outcome(
    queue: CeleryQueue, res: Resources
) -> None:
    start(queue, res, batch_of(3, max_parallel=3, metadata={"episode": 7}))
    for job_id in ("ep-1.2", "ep-1.0"):
        end(queue, res, job_id)
    assert batch_callbacks(res) == []
    end(queue, res, "ep-1.1", status="timeout")
    end(queue, res, "ep-1.1")  # a redelivered end changes nothing
    (sent,) = batch_callbacks(res)
    assert sent["task"] == "pipeline.batch_done" and sent["id"] == "ep-1.batch"
    (result,) = sent["args"]
    assert result["type"] == "lipsync.batch_result"
    assert result["counts"] == {"failed": 2, "timeout": 1}
    assert [i["job_id"] for i in result["items"]] == ["ep-1.0", "ep-1.1", "ep-1.2"]
    assert result["metadata"] == {"episode": 7}
    record = progress.store_of(res).get("ep-1")
    assert record is not None and record.dispatched


def test_a_batch_enqueued_twice_joins_the_first(queue: CeleryQueue, res: Resources) -> None:
    assert start(queue, res, batch_of(4, max_parallel=2))
    assert not start(queue, res, batch_of(4, max_parallel=2))
    assert runs(res) == ["ep-1.0", "ep-1.1"]


def test_resending_a_partly_finished_batch_reruns_nothing_finished(
    queue: CeleryQueue, res: Resources
) -> None:
    start(queue, res, batch_of(3, max_parallel=3))
    end(queue, res, "ep-1.0")
    # The batch record is gone (expired), its jobs' records are not: the same batch sent again.
    store = progress.store_of(res)
    store.forget("ep-1")
    res.redis.delete(QUEUE_JOBS)
    start(queue, res, batch_of(3, max_parallel=3))
    assert runs(res) == []  # 0 ended; 1 and 2 are running jobs, joined
    record = store.get("ep-1")
    assert record is not None and record.counts == {"failed": 1}


# -- recovery ----------------------------------------------------------------------------------


def test_the_sweeper_starts_items_whose_admission_was_lost(
    queue: CeleryQueue, res: Resources, clock: FakeClock
) -> None:
    raw = batch_of(3, max_parallel=2)
    store = progress.store_of(res)
    store.create(validate(raw, res.settings), max_parallel=20, due_at=clock() + 60)
    assert store.admit("ep-1") == range(0, 2)  # ... and the admitting worker died here
    assert runs(res) == []
    clock.advance(61)
    sweep_once(queue, res)
    assert runs(res) == ["ep-1.0", "ep-1.1"]


def test_the_sweeper_records_an_item_end_the_batch_missed(
    queue: CeleryQueue, res: Resources, clock: FakeClock
) -> None:
    start(queue, res, batch_of(2, max_parallel=2))
    store = progress.store_of(res)
    res.redis.delete("lipsync:batchitem:ep-1.1")  # its end will not find the batch: a lost hook
    end(queue, res, "ep-1.0")
    end(queue, res, "ep-1.1")
    assert batch_callbacks(res) == []
    clock.advance(res.settings.recovery_grace + 1)
    sweep_once(queue, res)
    (sent,) = batch_callbacks(res)
    assert sent["args"][0]["counts"] == {"failed": 2}
    record = store.get("ep-1")
    assert record is not None and record.dispatched


def test_the_sweeper_dispatches_a_result_recorded_but_not_sent(
    queue: CeleryQueue, res: Resources, clock: FakeClock
) -> None:
    start(queue, res, batch_of(1))
    store = progress.store_of(res)
    store.record_outcome("ep-1", {"type": "lipsync.batch_result", "batch_id": "ep-1"})  # then died
    sweep_once(queue, res)
    assert batch_callbacks(res) == []  # not before the grace
    clock.advance(res.settings.recovery_grace + 1)
    sweep_once(queue, res)
    sweep_once(queue, res)
    assert [m["id"] for m in batch_callbacks(res)] == ["ep-1.batch"]


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_ends_every_unfinished_item_and_reports_the_batch_cancelled(
    queue: CeleryQueue, res: Resources
) -> None:
    start(queue, res, batch_of(4, max_parallel=2))
    end(queue, res, "ep-1.0")
    record = progress.cancel(queue, res, "ep-1", reason="operator")
    assert record is not None and record.outcome is not None
    assert record.outcome["status"] == "cancelled"
    assert record.outcome["counts"] == {"failed": 1, "cancelled": 3}
    job = res.jobs.get("ep-1.1")
    assert job is not None and job.outcome is not None and job.outcome["status"] == "cancelled"
    assert res.jobs.get("ep-1.3") is None  # never started
    assert [m["id"] for m in batch_callbacks(res)] == ["ep-1.batch"]
    assert runs(res) == ["ep-1.0", "ep-1.1", "ep-1.2"]


def test_cancel_of_an_unknown_batch_is_none(queue: CeleryQueue, res: Resources) -> None:
    assert progress.cancel(queue, res, "nope", reason="x") is None
