"""Lipsync messages sent to the wrong queue: found, moved where they belong, and reported.

A producer that sends ``lipsync.run`` with a plain Celery app (no ``queue="lipsync"``, no routes)
puts it in Celery's default queue, ``celery``. Lipsync workers do not consume that queue — other
applications' tasks may share it, and a worker of theirs that took our message would drop it as an
unregistered task — so the job would wait there, ``PENDING``, with nothing saying why.

Every sweep round moves each lipsync message found in those queues (``LIPSYNC_MISROUTE_QUEUES``,
default ``celery``) to the queue its task belongs to (:func:`worker.names.queue_of`), counts it
(``lipsync_misrouted_messages_total``) and logs a warning naming the queue and how to fix the
producer. ``lipsync-worker status`` says where a job's message is waiting (:func:`find_message`).

Messages are read in kombu's Redis format: one JSON document per list entry, the task name and id
in ``headers``; a move is atomic (it happens only if the message is still there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from worker.names import ALL_QUEUES, queue_of
from worker.ops.broker import drives, is_lipsync, messages_in, queue_lists

log = logging.getLogger("lipsync.misrouted")

#: How far into a queue a scan reads (a shared default queue may be long; ours are read for status).
SCAN_LIMIT = 1000

# Move one message if it is still in the wrong queue: to the front of the right one (it has waited).
_MOVE = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 1 then redis.call('RPUSH', KEYS[2], ARGV[2]) end
return removed
"""

FIX_HINT = (
    "send it with queue='lipsync' (or use worker.enqueue.enqueue, or route 'lipsync.*' to the queues in "
    "worker.names.ROUTES in the producer's Celery config)"
)


@dataclass(frozen=True)
class Waiting:
    """A message found in a queue."""

    queue: str
    #: 0 = the next to be taken.
    position: int
    task: str
    task_id: str


def count_misrouted(broker: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Lipsync messages waiting in each of ``queues`` now."""
    return {
        queue: sum(1 for _, m in messages_in(broker, queue, SCAN_LIMIT) if is_lipsync(m)) for queue in queues
    }


def move_misrouted(broker: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Move every lipsync message in ``queues`` to its own queue. Returns how many per queue."""
    moved: dict[str, int] = {}
    move = broker.register_script(_MOVE)
    for queue in queues:
        for raw, message in list(messages_in(broker, queue, SCAN_LIMIT)):
            if not is_lipsync(message):
                continue
            task = str(message["headers"]["task"])
            target = queue_of(task)
            # Celery re-publishes a retry to the routing key it was delivered with: make it ours.
            info = message.setdefault("properties", {}).setdefault("delivery_info", {})
            info["routing_key"] = target
            if move(keys=[queue, target], args=[raw, json.dumps(message)]):
                moved[queue] = moved.get(queue, 0) + 1
                log.warning(
                    "%s %s was sent to queue %r, which lipsync workers do not consume; moved it to %r. "
                    "Fix the producer: %s",
                    task,
                    message["headers"].get("id"),
                    queue,
                    target,
                    FIX_HINT,
                )
    return moved


def find_message(broker: redis.Redis, job_id: str, queues: Iterable[str]) -> Waiting | None:
    """Where a job's message waits, if in the first :data:`SCAN_LIMIT` entries of each priority of
    our queues or of ``queues``: by task id (the helper uses the job id) or by the job id in the
    body. The position counts every message taken before it (higher priorities first)."""
    for queue in (*ALL_QUEUES, *queues):
        ahead = 0
        for name in queue_lists(queue):
            entries = list(messages_in(broker, name, SCAN_LIMIT))
            for index, (_raw, message) in enumerate(reversed(entries)):
                if is_lipsync(message) and job_id in (message["headers"].get("id"), drives(message).job_id):
                    headers = message["headers"]
                    return Waiting(queue, ahead + index, str(headers.get("task")), str(headers.get("id")))
            ahead += int(broker.llen(name))
    return None
