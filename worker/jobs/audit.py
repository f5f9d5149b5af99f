"""Jobs whose message is nowhere any more: re-driven once that is sure, not after the backstop timer.

A broker restart can drop a message outright. kombu's Redis transport takes a message off its queue
(BRPOP) and only then records it as unacknowledged: a Redis stopping in between loses it. A step
whose publish keeps failing past Celery's publish retries loses its next message too. Liveness
(:mod:`worker.jobs.liveness`) cannot see such a job, because nobody holds it, and its record's
timer fires only after ``LIPSYNC_QUEUED_RECOVERY`` (an hour) when the step was waiting in a queue.

The audit compares what should exist with what does: every unfinished job and owed webhook against
every lipsync message in the broker (our queues at every priority, and the unacknowledged hash: a
message taken by a worker counts if the record says it is held, or for ``LIPSYNC_NODE_DEAD_AFTER``
after it was taken, the time its holding takes to be written). A job or webhook with no message is a
*suspect*, noted with its record's last change. Found missing
again by a later audit (at least one sweep later), with its record unchanged, it is *lost*: it is
made overdue now and the sweeper re-drives it in the same round, without counting the re-drive
toward ``LIPSYNC_MAX_REDRIVES``. Two looks with nothing changed in between rule out a message
that was only in flight (being published, or between BRPOP and its record).

Audits run on every sweep for :data:`AFTER_TROUBLE` seconds after a worker was found dead or
released (when broker losses happen), and every ``LIPSYNC_AUDIT_INTERVAL`` otherwise, as a safety
net. Each reads the whole of our queues and the unacknowledged hash once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.names import (
    ACTIVE_JOBS_KEY,
    ALL_QUEUES,
    AUDIT_STATE_KEY,
    AUDIT_SUSPECTS_KEY,
    FREE_REDRIVE,
    JOB_KEY_PREFIX,
    WEBHOOK_KEY_PREFIX,
    WEBHOOKS_PENDING_KEY,
)
from worker.ops.broker import in_broker
from worker.ops.replies import as_text

log = logging.getLogger("lipsync.audit")

#: How long after a dead or released worker the audit runs on every sweep.
AFTER_TROUBLE = 180.0
#: Suspects are forgotten after this long (an audit that never came back for them).
SUSPECTS_TTL = 900

# Make a job overdue now if its record has not changed since it was suspected. KEYS: record, active
# set. ARGV: updated_at as suspected, overdue_at, job id, the free re-drive field.
_JOB_LOST = """
local h = redis.call('HMGET', KEYS[1], 'updated_at', 'outcome')
if h[2] or h[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'overdue_at', ARGV[2], ARGV[4], '1')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# The same for an owed webhook: its due_at is what changes when it moves.
_WEBHOOK_LOST = """
local due = redis.call('HGET', KEYS[1], 'due_at')
if not due or due ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'due_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


@dataclass
class Audit:
    """What one audit found."""

    suspects: int = 0
    lost_jobs: list[str] = field(default_factory=list)
    lost_webhooks: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.lost_jobs or self.lost_webhooks)


def trouble_seen(r: redis.Redis, now: float) -> None:
    """A worker was found dead or released: audit on every sweep for a while."""
    r.hset(AUDIT_STATE_KEY, "until", repr(now + AFTER_TROUBLE))


def due(r: redis.Redis, now: float, *, interval: float) -> bool:
    """Whether this sweep should audit: in the window after trouble, or ``interval`` since the last."""
    until, last = r.hmget(AUDIT_STATE_KEY, ["until", "last"])
    if until is not None and float(until) >= now:
        return True
    return last is None or now - float(last) >= interval


def audit(r: redis.Redis, broker: redis.Redis, *, now: float, dead_after: float) -> Audit:
    """Compare the unfinished jobs and owed webhooks with the broker; make the lost ones overdue.

    A message a worker took counts only if the record says it is held (liveness watches it), or
    if it was taken less than ``dead_after`` ago (its holding may not be written yet): one taken by
    a worker that died before recording it would otherwise sit unacknowledged for hours, unseen.
    """
    r.hset(AUDIT_STATE_KEY, "last", repr(now))
    found = in_broker(broker, ALL_QUEUES)
    raw_previous: dict[Any, Any] = r.hgetall(AUDIT_SUSPECTS_KEY)
    previous = {as_text(k): as_text(v) for k, v in raw_previous.items()}
    # kombu stamps a taken message with its taker's wall clock: compare with ours, not res.clock.
    look = _Look(r, now, time.time(), dead_after, previous)
    job_rows = _read(r, ACTIVE_JOBS_KEY, JOB_KEY_PREFIX, ["updated_at", "outcome", "held_tag"])
    for job_id, (updated_at, outcome, held_tag) in job_rows:
        if outcome is None and job_id not in found.queued_jobs:
            look.missing("job", job_id, updated_at, held_tag, found.taken_jobs.get(job_id, []))
    webhook_rows = _read(r, WEBHOOKS_PENDING_KEY, WEBHOOK_KEY_PREFIX, ["due_at", "held_tag"])
    for msg_id, (due_at, held_tag) in webhook_rows:
        if msg_id not in found.queued_webhooks:
            look.missing("webhook", msg_id, due_at, held_tag, found.taken_webhooks.get(msg_id, []))
    look.remember_suspects()
    result = look.result
    if result:
        log.warning(
            "audit: %d job(s) and %d webhook(s) have no message in the broker (lost in a broker restart?); "
            "re-driving them: %s %s",
            len(result.lost_jobs),
            len(result.lost_webhooks),
            result.lost_jobs[:20],
            result.lost_webhooks[:20],
        )
    return result


@dataclass
class _Look:
    """One audit's bookkeeping: this look's suspects, and what the previous look's confirm."""

    r: redis.Redis
    now: float
    wall: float
    dead_after: float
    previous: dict[str, str]
    suspects: dict[str, str] = field(default_factory=dict)
    result: Audit = field(default_factory=Audit)

    def missing(
        self, kind: str, item: str, marker: str | None, held_tag: str | None, taken: list[tuple[str, float]]
    ) -> None:
        """``item`` has no message in a queue; ``taken`` are its unacknowledged ones."""
        held_or_young = (tag == held_tag or self.wall - since < self.dead_after for tag, since in taken)
        if marker is None or any(held_or_young):
            return
        key = f"{kind}:{item}"
        if self.previous.get(key) != marker:
            self.suspects[key] = marker  # first look, or it moved since: look again next time
            return
        if kind == "job":
            script, keys = _JOB_LOST, [JOB_KEY_PREFIX + item, ACTIVE_JOBS_KEY]
            args = [marker, repr(self.now), item, FREE_REDRIVE]
        else:
            script, keys = _WEBHOOK_LOST, [WEBHOOK_KEY_PREFIX + item, WEBHOOKS_PENDING_KEY]
            args = [marker, repr(self.now), item]
        if self.r.register_script(script)(keys=keys, args=args):
            (self.result.lost_jobs if kind == "job" else self.result.lost_webhooks).append(item)

    def remember_suspects(self) -> None:
        pipe = self.r.pipeline()
        pipe.delete(AUDIT_SUSPECTS_KEY)
        if self.suspects:
            pipe.hset(AUDIT_SUSPECTS_KEY, items=[part for pair in self.suspects.items() for part in pair])
            pipe.expire(AUDIT_SUSPECTS_KEY, SUSPECTS_TTL)
        pipe.execute()
        self.result.suspects = len(self.suspects)


def _read(
    r: redis.Redis, index: str, prefix: str, fields: list[str]
) -> list[tuple[str, tuple[str | None, ...]]]:
    """(id, fields) of every member of ``index``, read in pipelined pages."""
    ids = [as_text(member) for member, _score in r.zscan_iter(index, count=500)]
    rows: list[tuple[str, tuple[str | None, ...]]] = []
    for start in range(0, len(ids), 500):
        page = ids[start : start + 500]
        pipe = r.pipeline(transaction=False)
        for item in page:
            pipe.hmget(prefix + item, fields)
        for item, values in zip(page, pipe.execute(), strict=True):
            rows.append((item, tuple(None if v is None else as_text(v) for v in values)))
    return rows
