"""Enqueue a lipsync job by writing Celery's wire format to Redis by hand, then wait for its result.

This is the recipe for a service in any language that has a Redis client but no Celery client: it
uses only the ``redis`` package (no celery import), and every field below is what Celery 5 itself
sends for ``send_task("lipsync.run", kwargs={"request": ...}, queue="lipsync")`` (message protocol
v2, JSON serializer, Redis transport).

    python examples/raw_redis_enqueue.py --broker redis://redis:6379/0 \
        --backend redis://redis:6379/1 examples/request.json

Prints the result JSON and exits 0; prints the failure JSON and exits 1 if the job failed; exits 3
if no result arrived within --timeout seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import time
import uuid
from typing import Any

import redis

TASK = "lipsync.run"
QUEUE = "lipsync"
# Celery's Redis result backend stores each task's state here, as JSON, under the task id.
RESULT_KEY = "celery-task-meta-{}"
READY_STATES = {"SUCCESS", "FAILURE", "REVOKED"}


def build_message(task_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """The Redis list item kombu reads: an envelope whose ``body`` is the base64 task payload."""
    kwargs = {"request": request}
    # Protocol v2 body: [args, kwargs, embed]. The task takes only the keyword ``request``; the
    # embed is where Celery carries link/link_error and canvas state (none here).
    body = [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-type": "application/json",  # the worker accepts JSON only
        "content-encoding": "utf-8",
        # Protocol v2 keeps the task's identity in the headers, so a worker routes the message
        # without decoding the body.
        "headers": {
            "lang": "py",  # informational: the sender's language
            "task": TASK,
            "id": task_id,
            "root_id": task_id,  # first task of its workflow: its own root
            "parent_id": None,
            "group": None,
            "argsrepr": "()",  # argsrepr/kwargsrepr are for logs and Flower only
            "kwargsrepr": repr(kwargs),
            "origin": f"{os.getpid()}@{socket.gethostname()}",  # who sent it (logs/events)
            "retries": 0,
            "eta": None,  # ISO 8601 to delay the start; None = now
            "expires": None,  # ISO 8601 after which the worker discards it unrun
            "timelimit": [None, None],  # [hard, soft] seconds; None = the worker's settings
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",  # only the rpc:// result backend replies there; ours is Redis
            "delivery_mode": 2,  # persistent
            # kombu's Redis transport has no exchanges: the routing key names the list.
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,  # 0 = the plain list; kombu keeps other priorities in suffixed lists
            "body_encoding": "base64",
            # kombu acknowledges (and after a crash restores) the message by this tag.
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def wait_for_result(backend: redis.Redis, task_id: str, timeout: float) -> dict[str, Any] | None:
    """Poll the result key until the task is done. (Celery also PUBLISHes it on a channel of the
    same name; polling is simpler and cannot miss a result stored before we looked.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = backend.get(RESULT_KEY.format(task_id))
        if raw is not None:
            meta: dict[str, Any] = json.loads(raw)
            # Before that: STARTED, then this worker's own SUBMITTED / POLLING / FETCHING.
            if meta["status"] in READY_STATES:
                return meta
        time.sleep(0.5)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="broker Redis URL (the worker's LIPSYNC_BROKER_URL)")
    parser.add_argument("--backend", required=True, help="result Redis URL (LIPSYNC_RESULT_BACKEND)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the result")
    parser.add_argument("request", help="path of the request JSON file")
    args = parser.parse_args()

    with open(args.request, encoding="utf-8") as f:
        request = json.load(f)
    if not isinstance(request, dict):
        parser.error("the request must be a JSON object")
    # As the Python helper does: the job id doubles as the task id, so the result key and
    # `lipsync-worker status JOB_ID` find the job. The worker validates the request itself.
    request.setdefault("job_id", uuid.uuid4().hex)
    task_id = str(request["job_id"])

    broker = redis.Redis.from_url(args.broker)
    backend = redis.Redis.from_url(args.backend)
    # The worker takes messages from the right end (BRPOP): LPUSH makes the list a FIFO queue.
    broker.lpush(QUEUE, json.dumps(build_message(task_id, request)))
    print(f"enqueued {TASK} {task_id} on {QUEUE}", file=sys.stderr)

    meta = wait_for_result(backend, task_id, args.timeout)
    if meta is None:
        print(f"no result after {args.timeout:g} s (job {task_id} may still run)", file=sys.stderr)
        return 3
    if meta["status"] == "SUCCESS":
        print(json.dumps(meta["result"]))
        return 0
    # A failed job is stored as {"exc_type": "LipsyncJobFailed", "exc_message": [failure], ...}.
    error = meta["result"] or {}
    exc_message = error.get("exc_message") or []
    failure = exc_message[0] if exc_message and isinstance(exc_message[0], dict) else error
    print(json.dumps(failure))
    return 1


if __name__ == "__main__":
    sys.exit(main())
