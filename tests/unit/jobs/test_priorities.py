"""New jobs go ahead of queued polls (worker.names.PRIORITIES), on the real broker.

When a node falls behind, thousands of due polls wait in the jobs queue. A new job's ``lipsync.run``
and ``submit`` share that queue: without priorities they wait behind every poll before GEN even
starts the generation. Here the broker is taken from the way kombu's Redis channel takes it (the
worker's own consumer uses the same priority order), and the tasks run for real (inline.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.conftest import FakeClock
from tests.unit.jobs.builders import TASK_ID, request
from tests.unit.jobs.inline import InlineWorker, use_resources
from worker.celery_queue import CeleryQueue
from worker.jobs.resources import Resources
from worker.names import PRIORITIES, QUEUE_JOBS, TASK_FETCH, TASK_POLL, TASK_RUN, TASK_SUBMIT
from worker.ops.broker import queue_lists
from worker.ops.misrouted import find_message


@pytest.fixture
def worker(res: Resources, queue: CeleryQueue, monkeypatch: pytest.MonkeyPatch) -> InlineWorker:
    use_resources(monkeypatch, res)
    return InlineWorker(queue.app, res)


def taken_by_kombu(queue: CeleryQueue) -> list[str]:
    """The tasks of every message in the jobs queue, in the order kombu's Redis channel gives them."""
    names = []
    with queue.app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        while (message := channel.basic_get(QUEUE_JOBS, no_ack=True)) is not None:
            names.append(message.headers["task"])
    return names


def polls_waiting(res: Resources) -> list[dict[str, Any]]:
    """Poll messages in any list of the jobs queue, as stored (properties included)."""
    raws = [raw for name in queue_lists(QUEUE_JOBS) for raw in res.redis.lrange(name, 0, -1)]
    return [m for m in map(json.loads, raws) if m["headers"]["task"] == TASK_POLL]


def test_a_new_job_is_taken_before_polls_queued_ahead_of_it(res: Resources, queue: CeleryQueue) -> None:
    for n in range(3):  # three jobs' polls, re-driven the way the sweeper sends them
        queue.send_chain(
            (TASK_POLL, TASK_FETCH), {"request": {"job_id": f"old-{n}"}}, last_task_id=f"old-{n}"
        )
    queue.app.send_task(TASK_RUN, kwargs={"request": request(job_id="new-1")}, task_id="new-1")

    found = find_message(res.redis, "new-1", [])
    assert found is not None and (found.task, found.position) == (TASK_RUN, 0)
    behind = find_message(res.redis, "old-0", [])
    assert behind is not None and (behind.task, behind.position) == (TASK_POLL, 1)
    assert taken_by_kombu(queue) == [TASK_RUN, TASK_POLL, TASK_POLL, TASK_POLL]


def test_a_poll_keeps_its_priority_through_the_chain_and_its_retries(
    worker: InlineWorker, res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    queue.app.send_task(TASK_RUN, kwargs={"request": request()}, task_id=TASK_ID)
    assert worker.run_next(QUEUE_JOBS) == TASK_RUN
    assert worker.run_next(QUEUE_JOBS) == TASK_SUBMIT
    [first] = polls_waiting(res)
    assert first["properties"]["priority"] == PRIORITIES[TASK_POLL]
    assert worker.run_next(QUEUE_JOBS) == TASK_POLL  # GEN is still working: the poll is retried
    [retried] = polls_waiting(res)
    assert retried["headers"]["retries"] == 1
    assert retried["properties"]["priority"] == PRIORITIES[TASK_POLL]
    # New work sent now is still taken first.
    queue.app.send_task(TASK_RUN, kwargs={"request": request(job_id="j2")}, task_id="j2-task")
    assert taken_by_kombu(queue) == [TASK_RUN, TASK_POLL]
