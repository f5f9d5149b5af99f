"""Running the real tasks without a worker process: take a message off the real broker (Redis) and
run it in this process through Celery's own tracer, as a worker's pool would. Results are stored,
chains continue, retries are sent again, all for real; only the worker's process is missing, so
a test can stop between any two messages and read what is in the broker and the result store.

Countdowns are not waited for (the fake clock says what time it is).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any, cast

import pytest
from celery import Celery
from celery.app.trace import build_tracer

# The tasks register themselves on every app finalized after their import (shared tasks).
import tasks.callbacks
import tasks.lipsync  # noqa: F401
from worker.jobs.resources import Resources
from worker.names import ALL_QUEUES
from worker.ops.broker import queue_lists


class InlineWorker:
    def __init__(self, app: Celery, res: Resources) -> None:
        self.app = app
        self.res = res

    def take(self, queue: str) -> dict[str, Any] | None:
        """The message of ``queue`` a worker takes next, removed from it: the oldest of the highest
        priority (kombu pushes left, a worker pops right, priority 0 first)."""
        for name in queue_lists(queue):
            raw = self.res.redis.rpop(name)
            if raw is not None:
                return cast("dict[str, Any]", json.loads(raw))  # type: ignore[arg-type]
        return None

    def run_next(self, queue: str) -> str:
        """Run the oldest message of ``queue``; returns the name of the task it ran."""
        message = self.take(queue)
        assert message is not None, f"no message in {queue}"
        headers = message["headers"]
        properties = message["properties"]
        args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        task = self.app.tasks[headers["task"]]
        request = {
            **headers,
            **embed,
            # As Celery's worker builds it: the message's priority goes into its retries.
            "delivery_info": {
                **properties.get("delivery_info", {}),
                "priority": properties.get("priority"),
                "redelivered": False,
            },
            "reply_to": properties.get("reply_to"),
            "correlation_id": properties.get("correlation_id"),
            "hostname": "inline@unit",
            "is_eager": False,
        }
        tracer = build_tracer(task.name, task, app=self.app, hostname="inline@unit", eager=False)
        tracer(headers["id"], args, kwargs, request)
        return str(headers["task"])

    def broker_and_results(self, *queues: str) -> Iterator[tuple[str, bytes]]:
        """Every message waiting in our queues and ``queues`` (and in kombu's unacked hash), and
        every stored Celery result: (key, raw bytes)."""
        r = self.res.redis
        lists = [name for queue in (*ALL_QUEUES, *queues) for name in queue_lists(queue)]
        for name in (*lists, "unacked"):
            key_type = r.type(name)
            if key_type == b"list":
                for raw in cast("list[bytes]", r.lrange(name, 0, -1)):
                    yield name, raw
            elif key_type == b"hash":
                for raw in cast("list[bytes]", r.hvals(name)):
                    yield name, raw
        for key in r.scan_iter("celery-task-meta-*"):
            value = r.get(key)
            if value is not None:
                yield key.decode(), bytes(value)  # type: ignore[arg-type]


def use_resources(monkeypatch: pytest.MonkeyPatch, res: Resources) -> None:
    """Make ``res`` what the tasks of this process use (:func:`worker.jobs.resources.resources`)."""
    monkeypatch.setattr("worker.jobs.resources._resources", (os.getpid(), res))
