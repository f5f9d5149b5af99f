"""The audit of lost messages against real parts: job records and the broker's queues on a real
Redis, the real CeleryQueue sending the messages, the real sweeper re-driving what was lost."""

from __future__ import annotations

import json
import time

from tests.unit.conftest import queued
from tests.unit.jobs.builders import submitted
from worker.celery_queue import CeleryQueue
from worker.jobs import audit
from worker.jobs.resources import Resources
from worker.jobs.sweeper import redrive, sweep_once
from worker.names import (
    BROKER_UNACKED_INDEX_KEY,
    BROKER_UNACKED_KEY,
    QUEUE_CALLBACKS,
    QUEUE_JOBS,
    TASK_DELIVER_WEBHOOK,
    TASK_POLL,
)
from worker.ops.broker import queue_lists


def look(res: Resources) -> audit.Audit:
    assert res.broker_redis is not None
    return audit.audit(res.redis, res.broker_redis, now=res.clock(), dead_after=res.settings.node_dead_after)


def take(res: Resources, queue: str, *, ago: float = 0.0) -> str:
    """What kombu does when a worker takes a message: off the queue, into the unacknowledged hash and
    its index (scored by when). Returns the delivery tag."""
    raw = next((r for name in queue_lists(queue) if (r := res.redis.rpop(name)) is not None), None)
    assert isinstance(raw, bytes)
    message = json.loads(raw)
    tag = message["properties"]["delivery_tag"]
    res.redis.hset(BROKER_UNACKED_KEY, tag, json.dumps([message, "", queue]))
    res.redis.zadd(BROKER_UNACKED_INDEX_KEY, {tag: time.time() - ago})
    return str(tag)


def test_a_job_whose_message_waits_in_a_queue_is_not_suspected(res: Resources, queue: CeleryQueue) -> None:
    job = submitted(res)
    redrive(queue, job)
    assert look(res).suspects == 0 and look(res).suspects == 0


def test_a_job_whose_message_a_worker_holds_is_not_suspected(res: Resources, queue: CeleryQueue) -> None:
    job = submitted(res)
    redrive(queue, job)
    tag = take(res, QUEUE_JOBS, ago=3600)  # a countdown poll held for an hour
    assert res.holders.hold_job(job.job_id, "w1", tag, drive=job.drive) == 1
    assert not queued(res, QUEUE_JOBS)
    assert look(res).suspects == 0


def test_a_message_just_taken_is_not_suspected_before_its_holding_is_written(
    res: Resources, queue: CeleryQueue
) -> None:
    job = submitted(res)
    redrive(queue, job)
    take(res, QUEUE_JOBS, ago=1.0)
    assert look(res).suspects == 0


def test_a_message_taken_by_a_worker_that_died_before_recording_it_is_lost(
    res: Resources, queue: CeleryQueue
) -> None:
    # Taken (unacknowledged) but held by nobody for longer than a holding takes to be written: its
    # worker died in between. Redis would hand it back only after the visibility timeout (hours).
    job = submitted(res)
    redrive(queue, job)
    take(res, QUEUE_JOBS, ago=res.settings.node_dead_after + 1)
    assert look(res).suspects == 1
    assert look(res).lost_jobs == [job.job_id]


def test_a_job_with_no_message_anywhere_is_redriven_at_the_second_look_without_counting(
    res: Resources, queue: CeleryQueue
) -> None:
    job = submitted(res)  # its first poll was never sent: lost with a broker restart
    first = look(res)
    assert first.suspects == 1 and not first.lost_jobs
    assert sweep_once(queue, res).redriven == []  # a suspect is not yet lost
    second = look(res)
    assert second.lost_jobs == [job.job_id]
    assert sweep_once(queue, res).redriven == [job.job_id]
    [message] = [m for m in queued(res, QUEUE_JOBS) if m["task"] == TASK_POLL]
    assert message["args"][0]["request"]["job_id"] == job.job_id
    record = res.jobs.get(job.job_id)
    assert record is not None and record.redrives == 0  # a broker's loss is not the job's doing
    assert look(res).suspects == 0  # it has a message again


def test_a_job_that_moved_between_two_looks_is_not_lost(res: Resources) -> None:
    job = submitted(res)
    assert look(res).suspects == 1
    res.clock.advance(1)  # type: ignore[attr-defined]
    res.jobs.update(job.job_id, polls=1)  # a step ran in between: its message was only in flight
    assert look(res).lost_jobs == []


def test_a_lost_webhook_is_sent_again(res: Resources, queue: CeleryQueue) -> None:
    res.outbox.put("j9.outcome", "http://127.0.0.1:9/hook", {"x": 1}, due_at=res.clock() + 3600)
    assert look(res).suspects == 1
    assert look(res).lost_webhooks == ["j9.outcome"]
    assert sweep_once(queue, res).resent_webhooks == ["j9.outcome"]
    assert [m["task"] for m in queued(res, QUEUE_CALLBACKS)] == [TASK_DELIVER_WEBHOOK]


def test_audits_run_every_sweep_after_trouble_and_on_an_interval_otherwise(res: Resources) -> None:
    now = res.clock()
    assert audit.due(res.redis, now, interval=300)  # never ran
    look(res)
    assert not audit.due(res.redis, now + 10, interval=300)
    assert audit.due(res.redis, now + 301, interval=300)
    audit.trouble_seen(res.redis, now + 10)
    assert audit.due(res.redis, now + 20, interval=300)
    assert not audit.due(res.redis, now + 10 + audit.AFTER_TROUBLE + 1, interval=300)
