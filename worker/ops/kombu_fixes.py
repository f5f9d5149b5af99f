"""A workaround for kombu 5.7 crashing a worker when Redis restarts or fails over.

What happens (docs/redis-restart-crash.md has the tracebacks and a kombu-only reproduction): the
broker connection drops, and Celery's consumer closes it (``collect()`` then ``close()``). Closing a
channel that still has a BRPOP in flight fails, so the channel outlives its transport's detachment
(``Transport.client = None``) or is closed later (``Channel.connection = None``). Any operation that
then needs a new Redis client on that channel goes through ``Channel._connparams``, which
dereferences the detached connection: ``AttributeError: 'NoneType' object has no attribute
'hostname'`` (transport detached) or ``... 'client'`` (channel detached). Restoring unacknowledged
messages while closing, and acknowledging a message whose task finishes after the reconnect, both
take that route. Celery recovers only from the transport's connection errors, so an
``AttributeError`` makes the worker exit with "Unrecoverable error".

The fix, at the two places a detached channel dereferences its connection:

* ``Channel._connparams`` (every new client pool: ack, reject, requeue, restore, publish, receive)
  and the ``Channel.state`` property (publishing to an exchange) raise :class:`DetachedChannelError`,
  a ``redis.exceptions.ConnectionError``. That is one of the transport's ``connection_errors``, so
  Celery handles it as what it is, a lost connection: it reconnects, and a failed ack or reject is
  logged (``Message.ack_log_error``) instead of ending the worker.
* ``QoS.restore_unacked`` skips the restore when the connection is already detached, so closing
  the channel completes. Nothing is lost by skipping it: the messages stay in Redis's ``unacked``
  hash (Redis would redeliver them after the visibility timeout), the worker released that
  connection's holder when it lost it, and the first sweep after Redis is back re-drives their jobs
  (:mod:`worker.jobs.liveness`).

Both are no-ops on an attached channel, so nothing changes while the connection is healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("lipsync.kombu")

#: Set on every replacement installed here, so :func:`install` can run any number of times.
_PATCHED = "_lipsync_detached_channel_guard"


class DetachedChannelError(RedisConnectionError):
    """A kombu Redis channel was used after its connection was closed.

    A ``redis.exceptions.ConnectionError``, hence one of the Redis transport's
    ``connection_errors``: Celery reconnects on it and logs a failed ack instead of exiting.
    """


def _detached(channel: Any) -> bool:
    """Whether the channel lost its transport (closed) or the transport lost its kombu Connection
    (``Connection.collect()``/``close()`` ran): either way it can no longer make a Redis client."""
    transport = getattr(channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def _refuse(what: str) -> DetachedChannelError:
    return DetachedChannelError(f"cannot {what}: the kombu channel's connection is closed")


def install() -> None:
    """Install the guards (idempotent: called from every ``create_app``)."""
    # Typed as Any: the stubs do not declare the private methods replaced here.
    channel_cls: Any = kombu_redis.Channel
    qos_cls: Any = kombu_redis.QoS

    original_connparams: Callable[..., Any] = channel_cls._connparams
    if not getattr(original_connparams, _PATCHED, False):

        def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _detached(self):
                raise _refuse("open a Redis connection")
            return original_connparams(self, *args, **kwargs)

        setattr(_connparams, _PATCHED, True)
        channel_cls._connparams = _connparams

    original_state: property = channel_cls.state  # the property object, read on the class
    if not getattr(original_state.fget, _PATCHED, False):
        state_getter = original_state.fget
        assert state_getter is not None

        # Publishing to an exchange looks the exchange up in the transport's state before it asks
        # for a client; on a closed channel that is ``None.state``.
        def state(self: Any) -> Any:
            if getattr(self, "connection", None) is None:
                raise _refuse("look up exchanges")
            return state_getter(self)

        setattr(state, _PATCHED, True)
        channel_cls.state = property(state, doc=original_state.__doc__)

    original_restore: Callable[..., Any] = qos_cls.restore_unacked
    if not getattr(original_restore, _PATCHED, False):

        def restore_unacked(self: Any, client: Any = None) -> Any:
            if client is None and _detached(self.channel):
                log.warning(
                    "broker connection already closed: leaving %d unacknowledged message(s) in Redis "
                    "for redelivery",
                    len(getattr(self, "_delivered", ()) or ()),
                )
                return None
            return original_restore(self, client)

        setattr(restore_unacked, _PATCHED, True)
        qos_cls.restore_unacked = restore_unacked
