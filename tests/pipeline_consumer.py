"""A stand-in for a downstream pipeline service: its own Celery app, its own queue, no import of
our tasks. It records every callback payload it receives in a Redis list, so tests can read them.

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
    client = redis.Redis.from_url(os.environ["PIPELINE_BROKER_URL"])
    entry = {
        "task_id": self.request.id,
        "queue": self.request.delivery_info.get("routing_key"),
        "payload": payload,
    }
    client.rpush(RECEIVED_KEY, json.dumps(entry))
