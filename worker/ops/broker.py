"""Reading what waits in the broker, in kombu's Redis format, without consuming anything.

A queue is a Redis list (``<queue>``, and ``<queue>\\x06\\x16<n>`` for priority n) of JSON messages,
task name and id in ``headers``, arguments in a base64 ``body``; a message a worker has taken but not
acknowledged sits in the ``unacked`` hash as ``[message, exchange, routing_key]``. Used to find
misrouted messages (:mod:`worker.ops.misrouted`) and messages that are nowhere any more
(:mod:`worker.jobs.audit`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.names import (
    BROKER_UNACKED_INDEX_KEY,
    BROKER_UNACKED_KEY,
    TASK_DELIVER_WEBHOOK,
    TASK_FETCH,
    TASK_POLL,
    TASK_RUN,
    TASK_SUBMIT,
)
from worker.ops.replies import as_text

#: kombu's Redis transport keeps a message with priority n in a list named ``<queue>\x06\x16<n>``
#: (``Channel.sep``, ``PRIORITY_STEPS``; priority 0 is the plain list).
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, all priorities."""
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def messages_in(
    broker: redis.Redis, queue: str, limit: int | None = None
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(raw entry, parsed message) of the plain list ``queue``: the ``limit`` entries nearest to being
    taken (all when None), the next one last."""
    start = 0 if limit is None else -limit
    for raw in broker.lrange(queue, start, -1):
        message = _parse(raw)
        if message is not None:
            yield raw, message


def unacked_messages(broker: redis.Redis) -> Iterator[tuple[str, dict[str, Any]]]:
    """(delivery tag, message) of every message taken by a worker and not yet acknowledged (running,
    reserved, or waiting on a countdown)."""
    for tag, raw in broker.hscan_iter(BROKER_UNACKED_KEY, count=500):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, list) and entry and isinstance(entry[0], dict):
            message = entry[0]
            if isinstance(message.get("headers"), dict):
                yield as_text(tag), message


def _parse(raw: Any) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, dict) and isinstance(message.get("headers"), dict):
        return message
    return None


def is_lipsync(message: dict[str, Any]) -> bool:
    task = message["headers"].get("task")
    return isinstance(task, str) and task.startswith("lipsync.")


@dataclass(frozen=True)
class Drives:
    """What a lipsync message drives: a job (by job id) or an owed webhook (by message id)."""

    job_id: str | None = None
    webhook_id: str | None = None
    #: The message's drive token (a job step's, or a webhook's outbox token); None for lipsync.run.
    drive: int | None = None
    #: lipsync.run's request, from which a worker that takes it opens the job's record.
    run_request: dict[str, Any] | None = None


_JOB_STEPS = frozenset({TASK_SUBMIT, TASK_POLL, TASK_FETCH})


def drives_args(task: str, args: Sequence[Any], kwargs: Mapping[str, Any], task_id: str) -> Drives:
    """What a lipsync task's arguments drive (best effort: anything unreadable drives nothing).
    The one reading of our tasks' signatures, for messages in the broker and for a worker's
    consumer alike."""
    if task in _JOB_STEPS:
        job = _argument(args, kwargs, 0, "job")
        if isinstance(job, dict) and isinstance(job.get("request"), dict):
            job_id, drive = job["request"].get("job_id"), job.get("drive", 1)
            if isinstance(job_id, str) and isinstance(drive, int):
                return Drives(job_id=job_id, drive=drive)
    elif task == TASK_RUN:
        request = _argument(args, kwargs, 0, "request")
        if isinstance(request, dict):
            # Without a job id, the task id is the job id (worker.jobs.steps.create).
            job_id = request.get("job_id") or task_id
            if isinstance(job_id, str):
                return Drives(job_id=job_id, run_request=request)
    elif task == TASK_DELIVER_WEBHOOK:
        msg_id, drive = _argument(args, kwargs, 0, "msg_id"), _argument(args, kwargs, 1, "drive")
        if isinstance(msg_id, str):
            return Drives(webhook_id=msg_id, drive=drive if isinstance(drive, int) else None)
    return Drives()  # lipsync.await_job waits on a job someone else drives


def drives(message: dict[str, Any]) -> Drives:
    """What a lipsync message in the broker drives, read from its (base64 JSON) body."""
    try:
        body = json.loads(base64.b64decode(message.get("body", "")))
        args, kwargs = list(body[0]), dict(body[1])
    except (ValueError, TypeError, IndexError, KeyError):
        return Drives()
    headers = message["headers"]
    return drives_args(str(headers.get("task")), args, kwargs, str(headers.get("id")))


def _argument(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


@dataclass
class InBroker:
    """The jobs and webhooks some lipsync message still drives: waiting in a queue, or taken by a
    worker (unacknowledged: delivery tag and when kombu recorded it, in its host's clock)."""

    queued_jobs: set[str] = field(default_factory=set)
    queued_webhooks: set[str] = field(default_factory=set)
    taken_jobs: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    taken_webhooks: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


def in_broker(broker: redis.Redis, queues: Iterable[str]) -> InBroker:
    """Read every lipsync message in ``queues`` (all priorities) and in the unacknowledged hash."""
    found = InBroker()
    for queue in queues:
        for name in queue_lists(queue):
            for _raw, message in messages_in(broker, name):
                if is_lipsync(message):
                    what = drives(message)
                    if what.job_id:
                        found.queued_jobs.add(what.job_id)
                    if what.webhook_id:
                        found.queued_webhooks.add(what.webhook_id)
    index: Any = broker.zrange(BROKER_UNACKED_INDEX_KEY, 0, -1, withscores=True)
    since = {as_text(pair[0]): float(pair[1]) for pair in index}
    for tag, message in unacked_messages(broker):
        if is_lipsync(message):
            what = drives(message)
            entry = (tag, since.get(tag, 0.0))
            if what.job_id:
                found.taken_jobs.setdefault(what.job_id, []).append(entry)
            if what.webhook_id:
                found.taken_webhooks.setdefault(what.webhook_id, []).append(entry)
    return found
