"""A stand-in for a downstream pipeline service: its own Celery app, its own queue, no import of
our tasks. It records every callback it receives (the task, its id and queue, and its payload) in a
Redis list, so tests can read them.

Run as ``celery -A tests.pipeline_consumer worker -Q media``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

app = Celery("pipeline", broker=os.environ["PIPELINE_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="media")

RECEIVED_KEY = "pipeline:received"


@app.task(name="pipeline.on_lipsync", bind=True)
def on_lipsync(self: Any, payload: dict[str, Any]) -> None:
    _record(self, payload)


@app.task(name="pipeline.on_lipsync_error", bind=True)
def on_lipsync_error(self: Any, failed_task_id: str) -> None:
    """A ``link_error`` whose task the producing side does not know: Celery sends it the failed
    task's id as its only argument."""
    _record(self, failed_task_id)


def _record(task: Any, payload: object) -> None:
    client = redis.Redis.from_url(os.environ["PIPELINE_BROKER_URL"])
    entry = {
        "task": task.name,
        "task_id": task.request.id,
        "queue": task.request.delivery_info.get("routing_key"),
        "payload": payload,
    }
    client.rpush(RECEIVED_KEY, json.dumps(entry))
    client.close()
