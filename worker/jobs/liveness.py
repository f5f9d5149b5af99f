"""Liveness: which worker consumer holds each job's message, and recovery when it stops.

Redis alone hands back a message held by a dead worker only after the visibility timeout (two hours
here), and a worker that loses its broker connection drops from memory what it held (reserved
messages, countdown polls) while Redis keeps them unacknowledged for just as long. The job record's
own timers (``overdue_at``) are a backstop sized for the slowest legitimate step, so they cannot be
short. Knowing *who* holds a job's message lets recovery be fast without ever robbing a live, slow
worker:

* every worker consumer is a *holder* (node name, process id and a connection generation) with a
  heartbeat in :data:`~worker.names.HOLDERS_KEY`, written every ``LIPSYNC_HEARTBEAT_INTERVAL`` by a
  thread of its own, in Redis server time (so the fleet's clocks need not agree);
* every message a consumer takes records ``held_by`` and ``held_tag`` (the message's delivery tag)
  in its job record or outbox entry, if it is the job's current message (its drive token), so a
  stale copy never claims a job someone else holds;
* a consumer that loses its broker connection has dropped what it held: its node *releases* that
  holder (score 0) and takes a new one for the new connection;
* the sweeper finds holders that were released or whose heartbeat is older than
  ``LIPSYNC_NODE_DEAD_AFTER`` and makes every job they held overdue at once — if the message is still
  unacknowledged in the broker: an acknowledged one was done with, and one Redis put back in its
  queue will be taken again. The sweeper's usual re-drive (:mod:`worker.jobs.sweeper`) does the
  rest in the same round, and the drive token turns the original message stale for good.

A job whose message waits in a queue has no holder, so a backlog is never mistaken for a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.names import (
    ACTIVE_JOBS_KEY,
    BROKER_UNACKED_KEY,
    FREE_REDRIVE,
    HOLDERS_KEY,
    JOB_KEY_PREFIX,
    WEBHOOK_KEY_PREFIX,
    WEBHOOKS_PENDING_KEY,
)
from worker.ops.replies import as_text

log = logging.getLogger("lipsync.liveness")

#: Score of a holder its own node released (it dropped what it held on a lost connection).
RELEASED = 0.0

# Record who holds the job's current message. ARGV: holder, delivery tag, drive token ('' for a
# ``lipsync.run`` message, which carries none: it holds the job only until the chain has started).
# Returns -1 when there is no record (yet), 0 when the message is not the job's current one.
_HOLD_JOB = """
local h = redis.call('HMGET', KEYS[1], 'created_at', 'outcome', 'drive', 'flag:chain_started')
if not h[1] then return -1 end
if h[2] then return 0 end
if ARGV[3] == '' then
  if h[4] then return 0 end
elseif (h[3] or '1') ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], 'held_by', ARGV[1], 'held_tag', ARGV[2])
return 1
"""

# The same for an owed webhook (ARGV: holder, delivery tag, the message's outbox token).
_HOLD_WEBHOOK = """
if redis.call('HGET', KEYS[1], 'drive') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'held_by', ARGV[1], 'held_tag', ARGV[2])
return 1
"""

# A heartbeat, in Redis server time. A holder its node released stays released.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == '0' then return '0' end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return tostring(now)
"""

# Holders whose last beat is older than ARGV[1] seconds (released ones included), with scores.
_SILENT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. tostring(now - tonumber(ARGV[1])), 'WITHSCORES')
"""

# Forget a holder once what it held was recovered, unless it beat meanwhile (alive after all).
_FORGET = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) <= tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"""

# Make a job overdue now if ARGV[1] still holds it and it has not ended (or ended without its
# callbacks dispatched). KEYS: record, active set.
# ARGV: holder, overdue_at (repr of a float), job id, '1' if the holder was released by a live node
# (then the re-drive is free: ARGV[5] is the record's field for that).
_JOB_OVERDUE = """
if redis.call('HGET', KEYS[1], 'held_by') ~= ARGV[1] then return 0 end
-- Ended and told: nothing to re-drive. Ended but not told (its step died between recording the
-- outcome and dispatching it): overdue too, so the sweeper re-dispatches now.
local told = redis.call('HMGET', KEYS[1], 'outcome', 'callbacks_dispatched')
if told[1] and told[2] == '1' then return 0 end
redis.call('HSET', KEYS[1], 'overdue_at', ARGV[2], 'held_by', '', 'held_tag', '')
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], ARGV[5], '1') end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# The same for an owed webhook (KEYS: entry, pending set; ARGV: holder, due_at, message id).
_WEBHOOK_OVERDUE = """
if redis.call('HGET', KEYS[1], 'held_by') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'due_at', ARGV[2], 'held_by', '', 'held_tag', '')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class Holders:
    """The fleet's holders and what they hold, over the state Redis (``LIPSYNC_REDIS_URL``)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._hold_job = client.register_script(_HOLD_JOB)
        self._hold_webhook = client.register_script(_HOLD_WEBHOOK)
        self._beat = client.register_script(_BEAT)
        self._silent = client.register_script(_SILENT)
        self._forget = client.register_script(_FORGET)
        self._job_overdue = client.register_script(_JOB_OVERDUE)
        self._webhook_overdue = client.register_script(_WEBHOOK_OVERDUE)

    # -- a node's side ---------------------------------------------------------------------------

    def beat(self, holder: str) -> bool:
        """Write ``holder``'s heartbeat. False if its node released it (it must not come back)."""
        return float(self._beat(keys=[HOLDERS_KEY], args=[holder])) != RELEASED

    def release(self, holder: str) -> None:
        """``holder`` dropped everything it held (its broker connection was lost): recover it now."""
        self.redis.zadd(HOLDERS_KEY, {holder: RELEASED})

    def hold_job(self, job_id: str, holder: str, tag: str, *, drive: int | None) -> int:
        """Record that ``holder`` took job ``job_id``'s message ``tag`` (``drive`` None: a run
        message). Returns 1 if recorded, 0 if the message is not the job's current one, -1 if the
        job has no record."""
        args = [holder, tag, "" if drive is None else str(drive)]
        return int(self._hold_job(keys=[JOB_KEY_PREFIX + job_id], args=args))

    def hold_webhook(self, msg_id: str, holder: str, tag: str, *, drive: int) -> bool:
        """Record that ``holder`` took the message with outbox token ``drive`` of webhook ``msg_id``."""
        args = [holder, tag, str(drive)]
        return bool(self._hold_webhook(keys=[WEBHOOK_KEY_PREFIX + msg_id], args=args))

    # -- the sweeper's side ----------------------------------------------------------------------

    def silent(self, older_than: float) -> dict[str, float]:
        """Holders whose last heartbeat is older than ``older_than`` seconds, released ones included
        (score 0), each with its last heartbeat."""
        raw: list[Any] = self._silent(keys=[HOLDERS_KEY], args=[repr(older_than)])
        pairs = zip(raw[0::2], raw[1::2], strict=True)
        return {as_text(holder): float(score) for holder, score in pairs}

    def forget(self, holder: str, last_beat: float) -> None:
        self._forget(keys=[HOLDERS_KEY], args=[holder, repr(last_beat)])

    def held_jobs(self, holders: Iterable[str]) -> Iterator[tuple[str, str, str]]:
        """(job id, holder, delivery tag) of every unfinished job one of ``holders`` holds."""
        yield from self._held(ACTIVE_JOBS_KEY, JOB_KEY_PREFIX, set(holders))

    def held_webhooks(self, holders: Iterable[str]) -> Iterator[tuple[str, str, str]]:
        """(message id, holder, delivery tag) of every owed webhook one of ``holders`` holds."""
        yield from self._held(WEBHOOKS_PENDING_KEY, WEBHOOK_KEY_PREFIX, set(holders))

    def _held(self, index: str, prefix: str, holders: set[str]) -> Iterator[tuple[str, str, str]]:
        # ZSCAN returns every member present for the whole scan, however the set changes meanwhile;
        # the reads are pipelined in pages. Only called when some holder stopped: rare.
        page: list[str] = []
        for member, _score in self.redis.zscan_iter(index, count=500):
            page.append(as_text(member))
            if len(page) == 500:
                yield from self._read_page(prefix, page, holders)
                page = []
        yield from self._read_page(prefix, page, holders)

    def _read_page(self, prefix: str, ids: list[str], holders: set[str]) -> Iterator[tuple[str, str, str]]:
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for item in ids:
            pipe.hmget(prefix + item, ["held_by", "held_tag"])
        for item, (held_by, tag) in zip(ids, pipe.execute(), strict=True):
            if held_by and tag and as_text(held_by) in holders:
                yield item, as_text(held_by), as_text(tag)

    def job_overdue(self, job_id: str, holder: str, *, at: float, released: bool) -> bool:
        """Make the job overdue at ``at`` if ``holder`` still holds it and it has not ended."""
        keys = [JOB_KEY_PREFIX + job_id, ACTIVE_JOBS_KEY]
        args = [holder, repr(at), job_id, "1" if released else "", FREE_REDRIVE]
        return bool(self._job_overdue(keys=keys, args=args))

    def webhook_overdue(self, msg_id: str, holder: str, *, at: float) -> bool:
        keys = [WEBHOOK_KEY_PREFIX + msg_id, WEBHOOKS_PENDING_KEY]
        return bool(self._webhook_overdue(keys=keys, args=[holder, repr(at), msg_id]))


@dataclass
class Recovery:
    """What one pass of :func:`recover_stopped_holders` found."""

    dead: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)
    #: How many of ``jobs`` were held by dead holders, and by released ones.
    jobs_of_dead: int = 0
    jobs_of_released: int = 0
    #: Silent holders this sweeper could not judge (its own link to Redis was not up long enough).
    unjudged: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dead or self.released)


def recover_stopped_holders(
    holders: Holders,
    broker: redis.Redis | None,
    *,
    now: float,
    dead_after: float,
    trust_silence: bool,
) -> Recovery:
    """Make every job and webhook held by a stopped holder overdue at ``now``.

    ``broker``: the broker's Redis, to tell a message still held (unacknowledged) from one acked or
    put back in its queue; None when the broker is not Redis (then every holding counts).
    ``trust_silence``: whether the caller's own link to Redis has been up for ``dead_after`` — after
    an outage every heartbeat looks old, and only released holders may be recovered then.
    """
    recovery = Recovery()
    stopped: dict[str, float] = {}
    for holder, last_beat in holders.silent(dead_after).items():
        if last_beat == RELEASED:
            recovery.released.append(holder)
        elif trust_silence:
            recovery.dead.append(holder)
        else:
            recovery.unjudged.append(holder)
            continue
        stopped[holder] = last_beat
    if not stopped:
        return recovery
    released = set(recovery.released)
    held_jobs = [item for item in holders.held_jobs(stopped) if _unacked(broker, item[2])]
    for job_id, holder, _tag in held_jobs:
        was_released = holder in released
        if holders.job_overdue(job_id, holder, at=now, released=was_released):
            recovery.jobs.append(job_id)
            if was_released:
                recovery.jobs_of_released += 1
            else:
                recovery.jobs_of_dead += 1
    held_webhooks = [item for item in holders.held_webhooks(stopped) if _unacked(broker, item[2])]
    for msg_id, holder, _tag in held_webhooks:
        if holders.webhook_overdue(msg_id, holder, at=now):
            recovery.webhooks.append(msg_id)
    for holder, last_beat in stopped.items():
        holders.forget(holder, last_beat)
    return recovery


def _unacked(broker: redis.Redis | None, tag: str) -> bool:
    return broker is None or bool(broker.hexists(BROKER_UNACKED_KEY, tag))
