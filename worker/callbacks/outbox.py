"""Webhooks we owe receivers, kept in Redis until they are delivered or dead-lettered.

A ``lipsync.deliver_webhook`` message is as fragile as any Celery message: a worker SIGKILLed while
it holds one (running it, or waiting on a retry countdown) leaves it unacknowledged, and Redis hands
it back only after the visibility timeout (LIPSYNC_VISIBILITY_TIMEOUT, two hours). So the webhook itself
lives in an outbox entry, written before its message is sent:

* the entry (one hash per message id) holds the URL, the payload, the attempts made and a ``drive``
  token; the message carries only the id and the token, so URLs (which may hold a receiver's token)
  and payloads stay out of task messages and Flower;
* tokens come from one fleet-wide counter, so a token is never handed out twice, even to an entry
  created again after it was delivered (a dead-letter replay) — an old message cannot come back
  to life;
* ``due_at`` (also the score in :data:`WEBHOOKS_PENDING_KEY`) is when the entry should next show a sign of
  life: the end of the current attempt (which has a hard time limit), or of the countdown to the
  next one, or (for a message waiting in a queue) ``LIPSYNC_QUEUED_RECOVERY``;
* the entry is removed when the receiver answers 2xx, or when the webhook is dead-lettered (in one
  step with the dead letter, and only by the current token);
* the sweeper re-sends entries past ``due_at`` with a bumped token, so an older copy of the message
  that resurfaces later finds itself stale and does nothing.

Delivery stays at-least-once: a worker killed after the POST but before it removed the entry sends
the webhook again, with the same ``webhook-id``, which receivers dedupe on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

import redis

from worker.names import DEAD_LETTERS_KEY, WEBHOOK_DRIVE_KEY, WEBHOOK_KEY_PREFIX, WEBHOOKS_PENDING_KEY
from worker.ops.replies import as_text

# Start an attempt if the message's token is the entry's: count it, push due_at to the attempt's end.
_CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'drive', 'url', 'payload')
if not h[1] or h[1] ~= ARGV[1] then return false end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'due_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {h[2], h[3], attempts}
"""

# Move due_at, if the message's token is still the entry's.
_RESCHEDULE = """
if redis.call('HGET', KEYS[1], 'drive') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'due_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Become the entry's only sender if it is (still) overdue: a new token, a new due_at.
# Returns the token, 0 if not overdue (someone moved it meanwhile), -1 if the entry expired.
_TAKE_OVER = """
local due = redis.call('HGET', KEYS[1], 'due_at')
if not due then
  redis.call('ZREM', KEYS[2], ARGV[3])
  return -1
end
if tonumber(due) > tonumber(ARGV[1]) then return 0 end
local drive = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'drive', drive, 'due_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return drive
"""

# Dead-letter the webhook, if the attempt's token is still the entry's (a newer message owns it
# otherwise, and will deliver or dead-letter it itself).
_GIVE_UP = """
if redis.call('HGET', KEYS[1], 'drive') ~= ARGV[1] then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

#: :meth:`Outbox.take_over` found the entry gone: it expired while still owed.
EXPIRED = -1


@dataclass(frozen=True)
class Attempt:
    """A delivery attempt the outbox agreed to: the webhook, and which attempt this is (from 1)."""

    msg_id: str
    drive: int
    url: str
    payload: dict[str, Any]
    number: int


class Outbox:
    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        #: Seconds an entry outlives its last write; longer than any wait between two attempts.
        self.ttl = ttl
        self._claim = client.register_script(_CLAIM)
        self._reschedule = client.register_script(_RESCHEDULE)
        self._take_over = client.register_script(_TAKE_OVER)
        self._give_up = client.register_script(_GIVE_UP)

    @staticmethod
    def key(msg_id: str) -> str:
        return WEBHOOK_KEY_PREFIX + msg_id

    def put(self, msg_id: str, url: str, payload: dict[str, Any], *, due_at: float) -> int:
        """Owe ``payload`` to ``url`` (again, if it was owed already: attempts start over).

        Returns the token the message to send must carry; any earlier message becomes stale.
        """
        key = self.key(msg_id)
        drive = int(self.redis.incr(WEBHOOK_DRIVE_KEY))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "drive": drive,
                "url": url,
                "payload": json.dumps(payload, separators=(",", ":")),
                "attempts": 0,
                "due_at": repr(due_at),
                "created_at": repr(time.time()),
            },
        )
        pipe.zadd(WEBHOOKS_PENDING_KEY, {msg_id: due_at})
        pipe.expire(key, self.ttl)
        pipe.execute()
        return drive

    def claim(self, msg_id: str, drive: int, *, due_at: float) -> Attempt | None:
        """Start an attempt; None if the webhook was delivered or dead-lettered, or the message is stale."""
        found = self._claim(
            keys=[self.key(msg_id), WEBHOOKS_PENDING_KEY], args=[drive, repr(due_at), msg_id, self.ttl]
        )
        if not found:
            return None
        url, payload, number = cast("list[Any]", found)
        return Attempt(
            msg_id=msg_id, drive=drive, url=as_text(url), payload=json.loads(payload), number=int(number)
        )

    def reschedule(self, msg_id: str, drive: int, *, due_at: float) -> bool:
        """Expect the next sign of life at ``due_at`` (the next attempt, after a countdown)."""
        moved = self._reschedule(
            keys=[self.key(msg_id), WEBHOOKS_PENDING_KEY], args=[drive, repr(due_at), msg_id, self.ttl]
        )
        return bool(moved)

    def delivered(self, msg_id: str) -> None:
        """The receiver took it: nothing is owed any more."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key(msg_id))
        pipe.zrem(WEBHOOKS_PENDING_KEY, msg_id)
        pipe.execute()

    def give_up(self, attempt: Attempt, *, error: str) -> bool:
        """Move the webhook to the dead-letter list, in one step with removing it from the outbox.

        False (and nothing done) if a newer message took the webhook over meanwhile.
        """
        entry = {
            "msg_id": attempt.msg_id,
            "url": attempt.url,
            "payload": attempt.payload,
            "error": error,
            "attempts": attempt.number,
        }
        keys = [self.key(attempt.msg_id), WEBHOOKS_PENDING_KEY, DEAD_LETTERS_KEY]
        return bool(self._give_up(keys=keys, args=[attempt.drive, attempt.msg_id, json.dumps(entry)]))

    def overdue(self, now: float, limit: int = 100) -> list[str]:
        raw = self.redis.zrangebyscore(WEBHOOKS_PENDING_KEY, "-inf", now, start=0, num=limit)
        return [as_text(item) for item in cast("list[bytes]", raw)]

    def take_over(self, msg_id: str, *, now: float, due_at: float) -> int:
        """The token for a re-sent message if the webhook is overdue at ``now``; 0 if it is not
        (any more), :data:`EXPIRED` if its entry expired while owed (it is dropped from the set).

        Atomic, so two sweepers never both re-send one webhook.
        """
        keys = [self.key(msg_id), WEBHOOKS_PENDING_KEY, WEBHOOK_DRIVE_KEY]
        return int(self._take_over(keys=keys, args=[repr(now), repr(due_at), msg_id, self.ttl]))

    def pending(self, msg_id: str) -> dict[str, Any] | None:
        """What an operator may see of an owed webhook (no URL: it can hold a receiver's token)."""
        raw = cast("list[bytes | None]", self.redis.hmget(self.key(msg_id), ["attempts", "due_at"]))
        attempts, due_at = raw
        if due_at is None:
            return None
        return {"msg_id": msg_id, "attempts": int(attempts or 0), "due_at": float(due_at)}

    def pending_count(self) -> int:
        return int(self.redis.zcard(WEBHOOKS_PENDING_KEY))

    # -- dead letters --------------------------------------------------------------------------

    def dead_letters(self) -> list[dict[str, Any]]:
        raw = cast("list[bytes]", self.redis.lrange(DEAD_LETTERS_KEY, 0, -1))
        return [json.loads(item) for item in raw]

    def remove_dead_letter(self, entry: dict[str, Any]) -> bool:
        return bool(self.redis.lrem(DEAD_LETTERS_KEY, 1, json.dumps(entry)))
