"""A plain Celery app with no-op tasks, configured like ours: the reference for what Celery itself costs.

Same broker, result backend and every Celery setting :func:`worker.app.celery_config` sets (late
acks, prefetch 1, events, extended results, the visibility timeout...), read from the same
``LIPSYNC_*`` environment; none of ours on top: no bootsteps (node heartbeat, sweeper), no kombu
fixes, no preflight, no logging set-up, and Celery's own Redis result backend on the same Redis
(ours stores in one round trip: :mod:`worker.ops.results`). ``tests/unit/test_bench_helpers.py``
checks the settings stay those of ``celery_config``. (It cannot import ``worker.app``: that module
builds our app, and its preflight hook and kombu fixes would apply to this worker too.)

    celery -A bench.plain_celery worker -c 2      # with the same LIPSYNC_* environment as ours
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain
from celery.result import AsyncResult

from worker.names import QUEUE_JOBS
from worker.settings import Settings

NOOP = "bench.noop"

#: Settings of ``celery_config`` this app does not copy: they route our task names to our queues,
#: or name a class of ours (the consumer's reconnect backoff, which a steady run never meets).
NOT_COPIED = frozenset({"task_queues", "task_routes", "task_annotations", "worker_consumer"})
#: The one it sets otherwise: Celery's own backend class for the same URL.
BACKEND = "result_backend"


def plain_config(settings: Settings) -> dict[str, object]:
    """Every Celery setting of ``worker.app.celery_config`` except :data:`NOT_COPIED`, and
    :data:`BACKEND` without our backend class."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.effective_result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_eta_task_limit": 5000,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_publish_retry_policy": {
            "max_retries": 10,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_extended": True,
        "result_expires": settings.result_ttl,
        "task_default_queue": QUEUE_JOBS,
    }


def create_plain_app(settings: Settings | None = None) -> Celery:
    plain = Celery("plain")
    plain.conf.update(plain_config(settings or Settings()))
    plain.task(name=NOOP, acks_late=True)(noop)
    return plain


def noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: what is left is Celery's own cost of a task."""


def noop_chain(plain: Celery) -> AsyncResult[Any]:
    """A chain of three no-op tasks, like ours (submit -> poll -> fetch); its last task's result."""
    signature = plain.signature(NOOP)
    result: AsyncResult[Any] = chain(signature.clone(), signature.clone(), signature.clone()).apply_async()
    return result


def waiting_chain(plain: Celery, wait: float) -> AsyncResult[Any]:
    """Three no-op tasks whose second waits ``wait`` seconds (a countdown), like a job whose
    generation takes that long and is polled once at its end; its last task's result."""
    signature = plain.signature(NOOP)
    waiting = signature.clone().set(countdown=wait)
    result: AsyncResult[Any] = chain(signature.clone(), waiting, signature.clone()).apply_async()
    return result


app = create_plain_app()
