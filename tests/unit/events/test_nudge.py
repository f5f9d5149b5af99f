"""Poll now (worker.jobs.nudge, JobStore.nudge) against real parts: the job record and the event index
on a real Redis, the real CeleryQueue (its messages read back as a worker would get them), the GEN
simulator on the fake clock, the real poll step."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from gensim import GenSimulator
from tests.unit.conftest import FakeClock, queued
from tests.unit.jobs.builders import TASK_ID, all_messages, created, result, submitted
from worker.celery_queue import CeleryQueue
from worker.jobs import steps
from worker.jobs.models import Job
from worker.jobs.nudge import MIN_GAIN, Named, nudge_jobs
from worker.jobs.outcomes import finish
from worker.jobs.records import EVENT_CELL_PREFIX, EVENT_GENERATION_PREFIX, EVENT_LAYER_PREFIX
from worker.jobs.resources import Resources
from worker.jobs.sweeper import sweep_once
from worker.names import FREE_REDRIVE, QUEUE_JOBS, TASK_FETCH, TASK_POLL, Stage
from worker.ops.broker import queue_lists
from worker.ops.metrics import EVENT_NUDGES_KEY


def waiting(res: Resources, job_id: str = "j1", **extra: Any) -> Job:
    """A job GEN accepted and polled once: still running, its next poll on the schedule."""
    job = submitted(res, job_id, **extra)
    again = steps.poll(job, res)
    assert isinstance(again, steps.Again) and again.countdown > MIN_GAIN + 1
    record = res.jobs.get(job_id)
    assert record is not None and record.state == Stage.POLLING and record.next_poll_at is not None
    return again.job


def generation_of(res: Resources, job_id: str = "j1") -> str:
    record = res.jobs.get(job_id)
    assert record is not None and record.generation_id is not None
    return record.generation_id


def sent_polls(res: Resources) -> list[dict[str, Any]]:
    return [m for m in queued(res, QUEUE_JOBS) if m["task"] == TASK_POLL]


def nudges_counted(res: Resources) -> dict[str, int]:
    raw = cast("dict[bytes, bytes]", res.redis.hgetall(EVENT_NUDGES_KEY))
    return {json.loads(key)[0]: int(value) for key, value in raw.items()}


# -- the index an event is traced back through ---------------------------------------------------


def test_a_submitted_job_is_indexed_by_its_generation_cell_and_layer(res: Resources) -> None:
    submitted(res)
    generation_id = generation_of(res)
    assert res.jobs.jobs_of_generations([generation_id, "424242"]) == {generation_id: "j1"}
    assert res.jobs.jobs_on_targets(["3000"], []) == {"j1"}
    assert res.jobs.jobs_on_targets([], ["4000"]) == {"j1"}
    assert res.jobs.jobs_on_targets(["3001"], ["4001"]) == set()
    # Each index key lives as long as the records it points at.
    for key in (
        EVENT_GENERATION_PREFIX + generation_id,
        EVENT_CELL_PREFIX + "3000",
        EVENT_LAYER_PREFIX + "4000",
    ):
        assert res.jobs.ttl - 2 <= res.redis.ttl(key) <= res.jobs.ttl


def test_a_late_step_of_a_forgotten_job_indexes_nothing(res: Resources) -> None:
    created(res)
    res.jobs.forget("j1")
    res.jobs.accept("j1", "9999", target={"cell_id": "3000", "layer_id": "4000"})
    assert res.jobs.jobs_of_generations(["9999"]) == {}


# -- nudging a job that waits for its next poll ------------------------------------------------------


def test_an_event_naming_the_generation_polls_the_job_now_as_a_free_redrive(
    res: Resources, queue: CeleryQueue, clock: FakeClock, sim: GenSimulator
) -> None:
    old = waiting(res)
    gets_before = sim.stats()["counts"]["get_generation"]

    report = nudge_jobs(queue, res, Named(generation_ids=(generation_of(res),)))

    assert report.results == {"j1": "sent"} and report.matched and report.sent == ["j1"]
    record = res.jobs.get("j1")
    assert record is not None
    assert (record.drive, record.redrives) == (2, 0), "a nudge is not a counted re-drive"
    assert record.next_poll_at == clock() and record.overdue_at == clock() + res.settings.queued_recovery
    [message] = sent_polls(res)
    assert message["chain"] == [TASK_FETCH] and message["last_id"] == TASK_ID
    [sent] = message["args"]
    assert sent["drive"] == 2 and sent["generation_id"] == generation_of(res)
    assert sent["request"]["callback"] is None
    # The countdown poll the job was waiting for is stale now; the nudged one runs, and asks GEN.
    with pytest.raises(steps.NothingToDo):
        steps.guard(old, res)
    nudged = Job.model_validate(sent)
    assert steps.guard(nudged, res) is not None
    assert isinstance(steps.poll(nudged, res), steps.Again)
    assert sim.stats()["counts"]["get_generation"] == gets_before + 1
    assert nudges_counted(res) == {"sent": 1}


def test_an_event_naming_only_the_cell_or_the_layer_polls_the_jobs_on_it(
    res: Resources, queue: CeleryQueue
) -> None:
    waiting(res, "on-layer")  # cell 3000, layer 4000
    waiting(res, "on-cell", layer_id=None, cell_id=3000)
    waiting(res, "elsewhere", cell_id=3001, layer_id=4001)

    by_layer = nudge_jobs(queue, res, Named(layer_ids=("4000",)))
    by_cell = nudge_jobs(queue, res, Named(cell_ids=("3000",)))

    assert by_layer.results == {"on-layer": "sent"}
    assert by_cell.results == {"on-cell": "sent", "on-layer": "poll_due"}
    assert sorted(m["args"][0]["request"]["job_id"] for m in sent_polls(res)) == ["on-cell", "on-layer"]


def test_a_known_generation_narrows_the_event_to_its_own_job(res: Resources, queue: CeleryQueue) -> None:
    waiting(res, "mine")
    waiting(res, "neighbour", layer_id=None)  # the same cell, 3000
    report = nudge_jobs(queue, res, Named(generation_ids=(generation_of(res, "mine"),), cell_ids=("3000",)))
    assert report.results == {"mine": "sent"}


def test_an_event_naming_none_of_our_jobs_does_nothing(res: Resources, queue: CeleryQueue) -> None:
    waiting(res)
    report = nudge_jobs(queue, res, Named(generation_ids=("777",), cell_ids=("3099",), layer_ids=("4099",)))
    assert report.results == {} and not report.matched
    assert sent_polls(res) == []


# -- what bounds the nudges ------------------------------------------------------------------------


def test_an_event_storm_polls_a_job_once_per_interval(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    waiting(res)
    named = Named(generation_ids=(generation_of(res),))
    assert nudge_jobs(queue, res, named).results == {"j1": "sent"}
    # Until the nudged poll has run, the job's poll is due: more events change nothing.
    for _ in range(20):
        assert nudge_jobs(queue, res, named).results == {"j1": "poll_due"}
    [message] = sent_polls(res)
    assert isinstance(steps.poll(Job.model_validate(message["args"][0]), res), steps.Again)
    # It ran and rescheduled; within the interval, still nothing.
    clock.advance(res.settings.events_nudge_interval / 2)
    assert nudge_jobs(queue, res, named).results == {"j1": "recently_nudged"}
    clock.advance(res.settings.events_nudge_interval / 2)
    assert nudge_jobs(queue, res, named).results == {"j1": "sent"}
    assert len(sent_polls(res)) == 2
    assert nudges_counted(res) == {"sent": 2, "poll_due": 20, "recently_nudged": 1}


def test_a_poll_due_within_the_gain_is_left_alone(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    waiting(res)
    record = res.jobs.get("j1")
    assert record is not None and record.next_poll_at is not None
    clock.now = record.next_poll_at - MIN_GAIN / 2
    assert nudge_jobs(queue, res, Named(generation_ids=(generation_of(res),))).results == {"j1": "poll_due"}
    assert sent_polls(res) == []


def test_nudges_never_count_toward_the_redrive_limit(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    waiting(res, model="sync_so")  # 20 s on the fake clock: still running after the loop
    named = Named(generation_ids=(generation_of(res),))
    for _ in range(res.settings.max_redrives + 2):
        clock.advance(res.settings.events_nudge_interval)
        assert nudge_jobs(queue, res, named).results == {"j1": "sent"}
        message = sent_polls(res)[-1]
        assert isinstance(steps.poll(Job.model_validate(message["args"][0]), res), steps.Again)
    record = res.jobs.get("j1")
    assert record is not None and record.redrives == 0 and record.outcome is None
    assert record.drive == res.settings.max_redrives + 3


# -- jobs that wait on nothing ---------------------------------------------------------------------


def test_jobs_that_do_not_wait_for_a_poll_are_left_alone(res: Resources, queue: CeleryQueue) -> None:
    waiting(res, "fetching")
    res.jobs.update("fetching", state=Stage.FETCHING.value)
    waiting(res, "cancelled", cell_id=3001, layer_id=4001)
    res.jobs.request_cancel("cancelled")
    submitted(res, "submitting", cell_id=3002, layer_id=4002)
    res.jobs.update("submitting", state=Stage.SUBMITTING.value)
    generations = tuple(generation_of(res, j) for j in ("fetching", "cancelled", "submitting"))

    report = nudge_jobs(queue, res, Named(generation_ids=generations))

    assert report.results == {
        "fetching": "not_polling",
        "cancelled": "cancelled",
        "submitting": "not_polling",
    }
    assert report.matched, "unfinished jobs of ours were named"
    assert sent_polls(res) == []


def test_finished_and_vanished_jobs_leave_the_cell_and_layer_index(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    waiting(res, "done")
    finish(queue, res, job_id="done", callback=None, outcome=result("done"))
    waiting(res, "gone", layer_id=None)
    res.jobs.forget("gone")

    report = nudge_jobs(queue, res, Named(cell_ids=("3000",), layer_ids=("4000",)))

    assert report.results == {"done": "finished", "gone": "unknown"} and not report.matched
    assert res.jobs.jobs_on_targets(["3000"], ["4000"]) == set()
    assert [m for m in all_messages(res) if m["task"] == TASK_POLL] == []


def test_a_refused_send_leaves_the_job_to_the_sweeper_free_of_charge(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    waiting(res)
    lists = queue_lists(QUEUE_JOBS)  # a poll goes to its priority's list
    res.redis.delete(*lists)
    for name in lists:
        res.redis.set(name, "not a list")  # the broker refuses the poll (WRONGTYPE)
    report = nudge_jobs(queue, res, Named(generation_ids=(generation_of(res),)))
    res.redis.delete(*lists)

    assert report.results == {"j1": "send_failed"}
    record = res.jobs.get("j1")
    assert record is not None and record.overdue_at == clock()
    assert res.redis.hget(res.jobs.key("j1"), FREE_REDRIVE) == b"1"
    assert sweep_once(queue, res).redriven == ["j1"]
    record = res.jobs.get("j1")
    assert record is not None and record.redrives == 0
    [message] = sent_polls(res)
    assert message["args"][0]["drive"] == record.drive == 3
