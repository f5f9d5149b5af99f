"""Webhooks we owe receivers, kept in Redis until they are delivered or dead-lettered.

A ``lipsync.deliver_webhook`` message is as fragile as any Celery message: a worker SIGKILLed while
it holds one (running it, or waiting on a retry countdown) leaves it unacknowledged, and Redis hands
it back only after the visibility timeout (two hours here; see field-notes 3). So the webhook itself
lives in an outbox entry, written before its message is sent:

* the entry (one hash per message id) holds the URL, the payload, the attempts made and a ``drive``
  token; the message carries only the id and the token, so URLs (which may hold a receiver's token)
  and payloads stay out of Flower and the broker;
* ``due_at`` (also the score in :data:`PENDING_KEY`) is when the entry should next show a sign of
  life: the end of the current attempt, or of the countdown to the next one;
* the entry is removed when the receiver answers 2xx, or when the webhook is dead-lettered (both in
  one transaction with what they record);
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

KEY_PREFIX = "lipsync:webhook:"
#: Sorted set of message ids of undelivered webhooks, scored by ``due_at``.
PENDING_KEY = "lipsync:webhooks:pending"
#: List of webhooks given up on (JSON), for ``lipsync-worker callbacks list|replay``.
DEAD_LETTER_KEY = "lipsync:callbacks:dead"

# Start an attempt if the message's token is the entry's: count it, push due_at to the attempt's end.
_CLAIM = """
local h = redis.call('HMGET', KEYS[1], 'drive', 'url', 'payload', 'attempts')
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

# Become the entry's only sender if it is (still) overdue: bump the token and due_at.
_TAKE_OVER = """
local due = redis.call('HGET', KEYS[1], 'due_at')
if not due then
  redis.call('ZREM', KEYS[2], ARGV[3])
  return false
end
if tonumber(due) > tonumber(ARGV[1]) then return false end
local drive = redis.call('HINCRBY', KEYS[1], 'drive', 1)
redis.call('HSET', KEYS[1], 'due_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return drive
"""


@dataclass(frozen=True)
class Attempt:
    """A delivery attempt the outbox agreed to: the webhook, and which attempt this is (from 1)."""

    msg_id: str
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

    @staticmethod
    def key(msg_id: str) -> str:
        return KEY_PREFIX + msg_id

    def put(self, msg_id: str, url: str, payload: dict[str, Any], *, due_at: float) -> int:
        """Owe ``payload`` to ``url`` (again, if it was owed already: attempts start over).

        Returns the token the message to send must carry; any earlier message becomes stale.
        """
        key = self.key(msg_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(key, "drive", 1)
        pipe.hset(
            key,
            mapping={
                "url": url,
                "payload": json.dumps(payload, separators=(",", ":")),
                "attempts": 0,
                "due_at": repr(due_at),
                "created_at": repr(time.time()),
            },
        )
        pipe.zadd(PENDING_KEY, {msg_id: due_at})
        pipe.expire(key, self.ttl)
        drive, *_ = pipe.execute()
        return int(drive)

    def claim(self, msg_id: str, drive: int, *, due_at: float) -> Attempt | None:
        """Start an attempt; None if the webhook was delivered or dead-lettered, or the message is stale."""
        found = self._claim(
            keys=[self.key(msg_id), PENDING_KEY], args=[drive, repr(due_at), msg_id, self.ttl]
        )
        if not found:
            return None
        url, payload, number = cast("list[Any]", found)
        return Attempt(msg_id=msg_id, url=_text(url), payload=json.loads(payload), number=int(number))

    def reschedule(self, msg_id: str, drive: int, *, due_at: float) -> bool:
        """Expect the next sign of life at ``due_at`` (the next attempt, after a countdown)."""
        moved = self._reschedule(
            keys=[self.key(msg_id), PENDING_KEY], args=[drive, repr(due_at), msg_id, self.ttl]
        )
        return bool(moved)

    def delivered(self, msg_id: str) -> None:
        """The receiver took it: nothing is owed any more."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key(msg_id))
        pipe.zrem(PENDING_KEY, msg_id)
        pipe.execute()

    def give_up(self, attempt: Attempt, *, error: str) -> None:
        """Move the webhook to the dead-letter list, in one step with removing it from the outbox."""
        entry = {
            "msg_id": attempt.msg_id,
            "url": attempt.url,
            "payload": attempt.payload,
            "error": error,
            "attempts": attempt.number,
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(DEAD_LETTER_KEY, json.dumps(entry))
        pipe.delete(self.key(attempt.msg_id))
        pipe.zrem(PENDING_KEY, attempt.msg_id)
        pipe.execute()

    def overdue(self, now: float, limit: int = 100) -> list[str]:
        raw = self.redis.zrangebyscore(PENDING_KEY, "-inf", now, start=0, num=limit)
        return [_text(item) for item in cast("list[bytes]", raw)]

    def take_over(self, msg_id: str, *, now: float, due_at: float) -> int | None:
        """The token for a re-sent message if the webhook is overdue at ``now``, else None.

        Atomic, so two sweepers never both re-send one webhook.
        """
        drive = self._take_over(
            keys=[self.key(msg_id), PENDING_KEY], args=[repr(now), repr(due_at), msg_id, self.ttl]
        )
        return int(drive) if drive else None

    def pending(self, msg_id: str) -> dict[str, Any] | None:
        """What an operator may see of an owed webhook (no URL: it can hold a receiver's token)."""
        raw = cast("list[bytes | None]", self.redis.hmget(self.key(msg_id), ["attempts", "due_at"]))
        attempts, due_at = raw
        if due_at is None:
            return None
        return {"msg_id": msg_id, "attempts": int(attempts or 0), "due_at": float(due_at)}

    def pending_count(self) -> int:
        return int(self.redis.zcard(PENDING_KEY))

    # -- dead letters --------------------------------------------------------------------------

    def dead_letters(self) -> list[dict[str, Any]]:
        raw = cast("list[bytes]", self.redis.lrange(DEAD_LETTER_KEY, 0, -1))
        return [json.loads(item) for item in raw]

    def remove_dead_letter(self, entry: dict[str, Any]) -> bool:
        return bool(self.redis.lrem(DEAD_LETTER_KEY, 1, json.dumps(entry)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
