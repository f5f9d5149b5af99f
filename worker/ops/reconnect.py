"""How soon a worker's consumer reconnects to the broker after losing it.

Celery's consumer reconnects through kombu's ``Connection.ensure_connection`` with kombu's default
backoff: 2 s after the loss, then 4, 6, 8 … up to 30 s between attempts (retries at 2, 6, 12, 20,
30, 42 … s), and Celery offers no setting for it. So a worker that lost Redis for 21 s comes back
9 s after Redis did, and one that lost it for a minute up to 30 s after: capacity lost to nothing
but a timer, while every job in the queues waits.

:class:`Consumer` (the app's ``worker_consumer``) waits 1, 2, 3 … s between attempts instead, up to
``LIPSYNC_BROKER_RECONNECT_MAX`` (5 s): a worker is back within that long of Redis, and a long
outage costs one connection attempt per worker process every 5 s. It retries for as long as Redis
is away (``broker_connection_max_retries = None`` in :func:`worker.app.celery_config`): at that
cadence Celery's 100 attempts would end a worker after eight minutes of outage.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from worker.settings import Settings, settings_of


def backoff(settings: Settings) -> dict[str, float]:
    """kombu ``ensure_connection`` intervals: the first wait, its growth per attempt, its cap."""
    cap = settings.broker_reconnect_max
    return {"interval_start": 1.0, "interval_step": 1.0, "interval_max": cap}


class Consumer(CeleryConsumer):
    """Celery's consumer, reconnecting to the broker on :func:`backoff` instead of kombu's default."""

    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) without intervals.
        conn.ensure_connection = partial(conn.ensure_connection, **backoff(settings_of(self.app)))
        return super().ensure_connected(conn)
