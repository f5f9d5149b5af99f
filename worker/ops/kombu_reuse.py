"""One Redis client per kombu channel and connection pool, instead of a new one per operation.

kombu 5.7's Redis channel builds a fresh ``redis.Redis`` for every operation it runs outside its
BRPOP loop (``Channel.conn_or_acquire`` → ``_create_client``): each acknowledgement, each message
it takes, each publish, each task event. With redis-py 8 building a client costs about 85 µs
(its response-callback table is rebuilt each time), and a worker's main process runs four to six
such operations per task: a tenth of its CPU went into clients used for one command and dropped.

A ``redis.Redis`` over a shared connection pool holds no connection of its own and is safe to use
from several threads (each command takes a connection from the pool and gives it back), so the
channel keeps the one it made and hands it out again, for as long as the channel's pool is the
same object. When kombu replaces the pool (``_disconnect_pools`` after a lost connection, then a
new ``_get_pool``), the next operation builds a client on the new pool. The asynchronous client of
the BRPOP loop is kombu's own and untouched.

Installed by :func:`worker.app.create_app`; idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis

_PATCHED = "_lipsync_reuses_clients"
_CLIENT = "_lipsync_client"


def install() -> None:
    channel_cls: Any = kombu_redis.Channel
    original: Callable[..., Any] = channel_cls._create_client
    if getattr(original, _PATCHED, False):
        return

    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        pool = self.pool  # kombu's own property: a new pool after a reconnect
        client = self.__dict__.get(_CLIENT)
        if client is None or client.connection_pool is not pool:
            client = original(self)
            self.__dict__[_CLIENT] = client
        return client

    setattr(_create_client, _PATCHED, True)
    channel_cls._create_client = _create_client
