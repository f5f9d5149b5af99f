"""Misrouted lipsync messages, against a real Redis: messages sent by a plain Celery app (no routes,
no ``queue=``), exactly as a producer that does not use our config sends them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import REPO
from tests.unit.conftest import queued
from worker.celery_queue import CeleryQueue
from worker.jobs.resources import Resources
from worker.jobs.sweeper import sweep_round
from worker.names import QUEUE_CALLBACKS, QUEUE_JOBS, TASK_DELIVER_WEBHOOK, TASK_RUN
from worker.ops.metrics import MetricsCollector
from worker.ops.misrouted import count_misrouted, find_message, move_misrouted

REQUEST = {"job_id": "lost-1", "sheet_id": 1, "cell_id": 2, "video_resource_id": 3, "audio_resource_id": 4}


@pytest.fixture
def plain_app(redis_url: str) -> Iterator[Celery]:
    """A producer's Celery app that knows nothing of our queues."""
    app = Celery("producer", broker=redis_url)
    yield app
    app.close()


def send_plain(app: Celery) -> str:
    return str(app.send_task(TASK_RUN, kwargs={"request": REQUEST}).id)


def test_a_lipsync_message_in_the_default_queue_is_moved_to_its_own(
    res: Resources, plain_app: Celery
) -> None:
    task_id = send_plain(plain_app)
    plain_app.send_task("billing.invoice", args=[1])  # someone else's task shares the queue
    assert res.broker_redis is not None
    assert count_misrouted(res.broker_redis, ["celery"]) == {"celery": 1}
    assert move_misrouted(res.broker_redis, ["celery"]) == {"celery": 1}
    [moved] = queued(res, QUEUE_JOBS)
    assert moved["task"] == TASK_RUN and moved["id"] == task_id and moved["kwargs"] == {"request": REQUEST}
    raw = json.loads(res.redis.lrange(QUEUE_JOBS, 0, -1)[0])
    # A retry of the task is published to the routing key it was delivered with: ours now.
    assert raw["properties"]["delivery_info"]["routing_key"] == QUEUE_JOBS
    [left] = res.redis.lrange("celery", 0, -1)
    assert json.loads(left)["headers"]["task"] == "billing.invoice"
    assert count_misrouted(res.broker_redis, ["celery"]) == {"celery": 0}


def test_each_task_goes_to_the_queue_it_belongs_to(res: Resources, plain_app: Celery) -> None:
    plain_app.send_task(TASK_DELIVER_WEBHOOK, kwargs={"msg_id": "m", "drive": 1})
    assert res.broker_redis is not None
    move_misrouted(res.broker_redis, ["celery"])
    assert [m["task"] for m in queued(res, QUEUE_CALLBACKS)] == [TASK_DELIVER_WEBHOOK]


def test_where_a_job_waits_is_found_by_its_job_id(res: Resources, plain_app: Celery) -> None:
    send_plain(plain_app)
    assert res.broker_redis is not None
    found = find_message(res.broker_redis, "lost-1", ["celery"])
    assert found is not None and (found.queue, found.position, found.task) == ("celery", 0, TASK_RUN)
    assert find_message(res.broker_redis, "someone-else", ["celery"]) is None


def test_a_sweep_moves_counts_and_warns_naming_the_queue_and_the_fix(
    res: Resources, plain_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    send_plain(plain_app)
    assert res.broker_redis is not None
    before = _scrape(res)
    assert before["lipsync_misrouted_waiting"] == {"celery": 1.0}
    with caplog.at_level(logging.WARNING, logger="lipsync.misrouted"):
        sweep_round(CeleryQueue(plain_app), res, trust_silence=True)
    [line] = [r.getMessage() for r in caplog.records if r.name == "lipsync.misrouted"]
    assert "'celery'" in line and "queue='lipsync'" in line
    after = _scrape(res)
    assert after["lipsync_misrouted_messages_total"] == {"celery": 1.0}
    assert after["lipsync_misrouted_waiting"] == {"celery": 0.0}


def test_status_says_where_a_misrouted_job_waits_and_how_to_fix_it(
    redis_url: str, plain_app: Celery, tmp_path: Path
) -> None:
    send_plain(plain_app)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "lost-1"],
        cwd=REPO,
        env={**clean, "LIPSYNC_BROKER_URL": redis_url, "LIPSYNC_STORAGE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    waiting = json.loads(done.stdout)["waiting"]
    assert waiting["queue"] == "celery" and waiting["task"] == TASK_RUN
    assert "not consumed by lipsync workers" in waiting["problem"] and "queue='lipsync'" in waiting["problem"]


def _scrape(res: Resources) -> dict[str, dict[str, float]]:
    collector = MetricsCollector(res.redis, misroute_queues=["celery"])
    found: dict[str, dict[str, float]] = {}
    for family in collector.collect():
        for sample in family.samples:
            if sample.name.startswith("lipsync_misrouted"):
                found.setdefault(sample.name, {})[sample.labels.get("queue", "")] = sample.value
    return found
