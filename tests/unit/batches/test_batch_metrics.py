"""The batch gauges, read by the real collector from the batch records a real batch wrote."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric

from tests.unit.batches.test_batches import batch_of, end, start
from worker.batches import progress
from worker.celery_queue import CeleryQueue
from worker.jobs.resources import Resources
from worker.ops.metrics import MetricsCollector


def gauges(res: Resources) -> dict[str, Metric]:
    return {family.name: family for family in MetricsCollector(res.redis).collect()}


def items_by_state(res: Resources) -> dict[str, float]:
    return {s.labels["state"]: s.value for s in gauges(res)["lipsync_batch_items"].samples}


def batches_in_flight(res: Resources) -> float:
    return gauges(res)["lipsync_batches_in_flight"].samples[0].value


def test_the_gauges_follow_a_batch_to_its_end(queue: CeleryQueue, res: Resources) -> None:
    assert batches_in_flight(res) == 0
    assert items_by_state(res) == {"waiting": 0, "in_flight": 0, "ended": 0}
    start(queue, res, batch_of(5, max_parallel=2))
    assert batches_in_flight(res) == 1
    assert items_by_state(res) == {"waiting": 3, "in_flight": 2, "ended": 0}
    end(queue, res, "ep-1.0")
    assert items_by_state(res) == {"waiting": 2, "in_flight": 2, "ended": 1}
    progress.cancel(queue, res, "ep-1", reason="done with it")
    assert batches_in_flight(res) == 0
    assert items_by_state(res) == {"waiting": 0, "in_flight": 0, "ended": 0}
