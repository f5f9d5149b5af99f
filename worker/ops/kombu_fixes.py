"""A workaround for a kombu 5.7 crash when Redis restarts under a running worker.

What happens (reproduced by tests/integration/test_faults.py::test_redis_restarted_mid_run): the
broker connection drops, Celery closes it, and closing the channel tries to put the worker's
unacknowledged messages back on their queues.
By then the channel's connection is already detached, so kombu dereferences ``None``
(``AttributeError: 'NoneType' object has no attribute 'hostname'`` in ``Channel._connparams``) and
the worker exits with "Unrecoverable error" instead of reconnecting.

The fix: when the connection is already detached, skip that restore. Nothing is lost by skipping
it: the messages stay in Redis's ``unacked`` hash (Redis restores them after the visibility
timeout) and our sweeper re-drives their jobs within ``LIPSYNC_RECOVERY_GRACE``. The worker then
reconnects as it does for any other connection loss. A supervisor that restarts dead workers is
still required (docs/guarantees.md).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger("lipsync.kombu")

_PATCHED = "_lipsync_detached_restore_guard"


def install() -> None:
    qos = kombu_redis.QoS
    original = qos.restore_unacked
    if getattr(original, _PATCHED, False):
        return

    def restore_unacked(self: Any, client: Any = None) -> Any:
        transport = getattr(self.channel, "connection", None)
        if client is None and getattr(transport, "client", None) is None:
            log.warning(
                "broker connection already closed: leaving %d unacknowledged message(s) in Redis "
                "for redelivery",
                len(getattr(self, "_delivered", ()) or ()),
            )
            return None
        return original(self, client)

    setattr(restore_unacked, _PATCHED, True)
    qos.restore_unacked = restore_unacked  # type: ignore[method-assign]
