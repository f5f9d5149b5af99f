"""Writes that need not reach Redis at once, gathered during a worker task into round trips it
makes anyway.

A metric observation (:mod:`worker.ops.metrics`) must reach Redis, but nothing waits for it: one
MULTI/EXEC round trip each was five of a job's thirty-odd round trips, and a round trip's
syscalls are most of a step's own CPU. So, while a worker task runs (:func:`collecting`, opened and
closed by the task signals, :mod:`worker.app`), such writes are kept in the process and go out:

* inside the next MULTI/EXEC the task sends to the same Redis anyway (:func:`execute_with`, used by
  the job record's writes): no round trip of their own;
* else in one MULTI/EXEC when the task ends (:func:`flush`).

Outside a task (the CLI, the event receiver, the sweeper's thread) a write goes out at once.

A deferred write never fails what it rides along with: an error reply to one of its commands is
logged at DEBUG and dropped, and the ride's own replies are checked as ``execute()`` would. Writes
still pending when the process dies are lost, as an observation was before when Redis blinked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import redis

__all__ = ["Write", "collecting", "execute_with", "flush", "write"]

log = logging.getLogger("lipsync.deferred")

#: Adds a write's commands to a MULTI/EXEC pipeline.
Write = Callable[[Any], None]


@dataclass
class _Pending:
    #: (client, what it is for the log, its commands), in the order they were written.
    writes: list[tuple[redis.Redis, str, Write]] = field(default_factory=list)

    def take(self, client: redis.Redis) -> list[tuple[str, Write]]:
        """The writes for ``client``, removed from the pending ones."""
        mine = [(what, fill) for c, what, fill in self.writes if c is client]
        if mine:
            self.writes = [item for item in self.writes if item[0] is not client]
        return mine


#: The writes of the task running in this thread (None: not in a task, write at once). A context
#: variable: the node's heartbeat and sweeper threads never see a pool task's pending writes.
_pending: ContextVar[_Pending | None] = ContextVar("lipsync_deferred_writes", default=None)


def write(client: redis.Redis, what: str, fill: Write) -> None:
    """Write ``fill``'s commands to ``client``: later in this task (see the module docstring), or at
    once in a MULTI/EXEC outside one. Never raises a Redis error."""
    pending = _pending.get()
    if pending is not None:
        pending.writes.append((client, what, fill))
        return
    _execute_alone(client, [(what, fill)])


def collecting() -> None:
    """Start gathering this thread's writes (a task begins). Writes left from an earlier task that
    did not end cleanly are written first."""
    flush()
    _pending.set(_Pending())


def flush() -> None:
    """Write what is pending, one MULTI/EXEC per client, and write at once from now on (a task
    ended)."""
    pending = _pending.get()
    _pending.set(None)
    if pending is None:
        return
    clients: dict[int, redis.Redis] = {id(c): c for c, _, _ in pending.writes}
    for client in clients.values():
        _execute_alone(client, pending.take(client))


def execute_with(client: redis.Redis, pipe: Any) -> list[Any]:
    """Execute ``pipe``, a MULTI/EXEC pipeline of ``client``, with the writes pending for
    ``client`` at its end: one round trip for both. Returns the replies to ``pipe``'s own commands
    and raises as ``pipe.execute()`` does for them; a pending write's error is only logged."""
    pending = _pending.get()
    rides = pending.take(client) if pending is not None else []
    if not rides:
        return list(pipe.execute())
    own = len(pipe)
    for _, fill in rides:
        fill(pipe)
    replies = list(pipe.execute(raise_on_error=False))
    for reply in replies[:own]:
        if isinstance(reply, Exception):
            raise reply
    failed = [reply for reply in replies[own:] if isinstance(reply, Exception)]
    if failed:
        _dropped(rides, failed[0])
    return replies[:own]


def _execute_alone(client: redis.Redis, writes: list[tuple[str, Write]]) -> None:
    # MULTI/EXEC: a scrape never sees half of a write (a histogram bucket without its sum).
    if not writes:
        return
    try:
        pipe = client.pipeline(transaction=True)
        for _, fill in writes:
            fill(pipe)
        failed = [reply for reply in pipe.execute(raise_on_error=False) if isinstance(reply, Exception)]
    except redis.RedisError as exc:
        failed = [exc]
    if failed:
        _dropped(writes, failed[0])


def _dropped(writes: list[tuple[str, Write]], error: Exception) -> None:
    # Which command of a MULTI failed is not worth tracing back: the writes are only observations.
    for what, _ in writes:
        log.debug("%s not recorded: %s", what, error)
