"""The Celery app, configured from :class:`worker.settings.Settings` for this workload.

The workload: a few short HTTP calls per job spread over minutes of waiting (polls are re-queued
with a countdown, never slept), plus one download per job that may be large. Each choice below says
why it differs from Celery's default.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from celery import Celery, bootsteps, signals
from kombu import Queue

from worker.callbacks.webhooks import attempt_time_limits
from worker.cards.recovery import settle_overdue
from worker.celery_queue import CeleryQueue
from worker.errors import ConfigurationError
from worker.jobs.resources import resources
from worker.jobs.sweeper import SweeperThread
from worker.names import ALL_QUEUES, QUEUE_JOBS, ROUTES, TASK_DELIVER_WEBHOOK
from worker.node import ConnectionStep, Node, NodeStep
from worker.ops import deferred, einfo_fixes, kombu_fixes, kombu_reuse, logs
from worker.ops.results import backend_setting
from worker.preflight import preflight, refuse_to_start
from worker.settings import Settings, get_settings, settings_of

#: The modules that define the tasks (named explicitly: no auto-discovery).
TASK_MODULES = ["tasks.lipsync", "tasks.callbacks", "tasks.cards", "tasks.batches"]


def celery_config(settings: Settings) -> dict[str, object]:
    vt = settings.visibility_timeout
    webhook_soft_limit, webhook_hard_limit = attempt_time_limits(settings.webhook_timeout)
    transport = {
        # Redis redelivers an unacknowledged message after this long. Poll countdowns are capped
        # at 15 min (worker.retry.MAX_COUNTDOWN) and downloads at LIPSYNC_DOWNLOAD_TIMEOUT, both
        # far below it, so nothing is redelivered while still legitimately held (kombu#337).
        "visibility_timeout": vt,
    }
    return {
        "broker_url": settings.broker_url,
        # Celery's Redis backend with a store of one round trip instead of two (worker.ops.results).
        "result_backend": backend_setting(settings.effective_result_backend),
        # JSON only, in both directions: producers in any language, and no pickle on the wire.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Every step is idempotent (job record + Idempotency-Key, GETs, atomic rename, stable
        # callback ids), so a message is acknowledged only after its step ran: a worker that dies
        # mid-step leaves the message to be redelivered instead of losing the job.
        "task_acks_late": True,
        # ... and when a pool child is killed, requeue rather than ack (Celery's default acks).
        "task_reject_on_worker_lost": True,
        # One message per process at a time: a download must not sit behind another in a prefetch
        # buffer while other workers idle.
        "worker_prefetch_multiplier": 1,
        # Countdown (ETA) messages bypass the prefetch limit and live in worker memory; bound them.
        "worker_eta_task_limit": 5000,
        # The visibility timeout must be set in all three places or the shortest silently wins
        # (celery#7651, celery#9339).
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": vt,
        # With late acks, a lost broker connection would otherwise leave a step running while its
        # message is redelivered elsewhere: the same step twice, in parallel (celery#4671).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        # Reconnect within 5 s of the broker coming back, not kombu's 30 s (worker.ops.reconnect),
        # for as long as it takes: a worker waiting for Redis is not broken.
        "worker_consumer": "worker.ops.reconnect:Consumer",
        "broker_connection_max_retries": None,
        # A Redis restart or failover takes seconds (docs/redis-restart-crash.md). Publishing
        # (retries, chain steps, callbacks) keeps retrying for ~15 s instead of Celery's ~0.6 s,
        # after which Task.retry drops the step's message and the job waits for the sweeper.
        "task_publish_retry_policy": {
            "max_retries": 10,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        # Result reads retry too (by default only the SET of a store does; the read before it fails
        # at once): a step cancelled at a reconnect is then marked RETRY, not REVOKED, so a caller
        # waiting on the job sees no false "terminated". Bounded (10 retries, 15 s at most).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        # Flower and operators: events for every task, including "sent" before a worker has it,
        # STARTED states, and names/args/queues stored with results.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_extended": True,
        # Celery keeps results a day by default; pipelines may come back for them later.
        "result_expires": settings.result_ttl,
        # One queue per kind of work (worker.names), so operators can give downloads their own workers.
        "task_default_queue": QUEUE_JOBS,
        "task_queues": tuple(Queue(name) for name in ALL_QUEUES),
        "task_routes": {task: {"queue": queue} for task, queue in ROUTES.items()},
        # A webhook attempt is cut off after LIPSYNC_WEBHOOK_TIMEOUT (+1 s) in total, not per read
        # (prefork pool; see worker.callbacks.webhooks.attempt_time_limits).
        "task_annotations": {
            TASK_DELIVER_WEBHOOK: {"soft_time_limit": webhook_soft_limit, "time_limit": webhook_hard_limit}
        },
    }


class SweeperStep(bootsteps.StartStopStep):
    """Celery worker bootstep: every worker runs a sweeper thread (worker.jobs.sweeper) next to its
    consumer; one per round across the fleet wins a Redis lease, re-drives stalled jobs and settles
    the Lipsync cards' changes whose settle was lost (worker.cards.recovery)."""

    requires = ("celery.worker.components:Pool", NodeStep)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.thread: SweeperThread | None = None

    def start(self, worker: Any) -> None:
        holder = f"{getattr(worker, 'hostname', None) or socket.gethostname()}"
        node: Node = worker.lipsync_node
        self.thread = SweeperThread(
            CeleryQueue(worker.app), holder, trust_silence=node.trusts_silence, extra_work=(settle_overdue,)
        )
        self.thread.start()

    def stop(self, worker: Any) -> None:
        if self.thread is not None:
            self.thread.stopping.set()


def _preflight(sender: Any = None, **_: Any) -> None:
    """Celery's ``worker_init``: refuse to start a worker GEN would not serve (worker.preflight)."""
    settings = settings_of(getattr(sender, "app", None))

    def say(line: str) -> None:
        print(f"lipsync-worker: {line}", file=sys.stderr, flush=True)

    try:
        preflight(settings, resources().redis, say=say)
    except ConfigurationError as exc:
        refuse_to_start(str(exc))


def _defer_writes(**_: Any) -> None:
    """Celery's ``task_prerun``: the task's metrics ride along its own round trips (worker.ops.deferred)."""
    deferred.collecting()


def _flush_writes(**_: Any) -> None:
    """Celery's ``task_postrun`` (also after a retry or a failure): write what is still pending."""
    deferred.flush()


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    kombu_fixes.install()
    einfo_fixes.install()
    kombu_reuse.install()
    logs.install(json_logs=settings.log_json)
    celery = Celery("lipsync", include=TASK_MODULES)
    celery.conf.update(celery_config(settings))
    # Producers using worker.enqueue with this app find the job-record Redis through it.
    celery.lipsync_settings = settings  # type: ignore[attr-defined]
    signals.worker_init.connect(_preflight, weak=False, dispatch_uid="lipsync-preflight")
    signals.task_prerun.connect(_defer_writes, weak=False, dispatch_uid="lipsync-defer-writes")
    signals.task_postrun.connect(_flush_writes, weak=False, dispatch_uid="lipsync-flush-writes")
    celery.steps["worker"].add(NodeStep)
    celery.steps["worker"].add(SweeperStep)
    celery.steps["consumer"].add(ConnectionStep)
    return celery


app = create_app()
