"""The durable job record: one Redis hash per job id, the source of truth about a job.

Celery messages come and go (retries are new messages; a killed worker or a broker restart can lose
some); the record says what has already happened to a job, so that no step is done twice against
the paid API and no job is forgotten:

* ``generation_id`` is written (HSETNX) the moment GEN accepts the job, before the chain moves on.
  A re-run submit reads it and does not POST again.
* ``outcome`` is written (HSETNX) once. Whoever writes it first decides the job's end; everyone
  else reads it back.
* ``drive`` is a token carried by every message of the job's chain. The sweeper bumps it when it
  re-drives a job whose messages are overdue; a message carrying an older token is stale and does
  nothing. So at most one chain drives a job at a time, however many messages resurface later.
* ``overdue_at`` (also the score in the ``lipsync:jobs:active`` sorted set) is when the job should
  have shown its next sign of life. The sweeper re-drives jobs past it (see :mod:`worker.jobs.sweeper`).
* ``callback`` is where the outcome and events go. It lives here only: a webhook URL can carry a
  receiver's token, and task messages and Celery's results (arguments included) are kept where
  monitors read them, so the job travels without it (:meth:`worker.jobs.models.Job.for_message`).
  Records written before it had a field of its own keep it in ``job``: read with
  :meth:`JobStore.callback`, and moved into the field before a job without it replaces ``job``.

Records live ``job_timeout + result_ttl`` seconds after their last update.

GEN's own events (:mod:`worker.events`) name generations, cells and layers, never our jobs: when GEN
accepts a job, :meth:`JobStore.accept` also indexes it by its generation id and by the cell
and layer it runs on, with the record's TTL, so an event can be traced back to the jobs waiting on
what it names (:meth:`JobStore.jobs_of_generations`, :meth:`JobStore.jobs_on_targets`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis
from pydantic import BaseModel, Field

from worker.names import ACTIVE_JOBS_KEY, FREE_REDRIVE, JOB_KEY_PREFIX, Stage
from worker.ops import deferred
from worker.ops.replies import as_text

# Create the record in one step, or find it: a process dying half-way must not leave a record
# without its TTL, its job or its place in the active set. A hash without ``created_at`` is what a
# late step of a forgotten job left behind (a generation id, a flag), not a record: it is replaced.
# KEYS: record, active set. ARGV: job id, ttl, overdue_at, then the fields as name, value pairs.
_CLAIM = """
if redis.call('HEXISTS', KEYS[1], 'created_at') == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# Set a one-time flag on an existing record (never create one: a flag on an unknown id would be
# inherited by a later job with that id). ARGV: flag field. Returns 1 for the caller that set it.
_MARK_ONCE = """
if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], '1')
"""

# Flag an existing record cancelled and bump its drive token (an unknown id stays unknown: a
# later job with that id must not start out cancelled). KEYS: record, active set. ARGV: updated_at,
# ttl, job id, the reason ('' for none), overdue_at ('' to leave it).
_REQUEST_CANCEL = """
if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'cancel_reason', ARGV[4]) end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'overdue_at', ARGV[5])
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
end
redis.call('HINCRBY', KEYS[1], 'drive', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


#: The event index (see the module's docstring): a string per generation id, holding its job id, and
#: a set of job ids per cell and per layer (jobs that may wait on it; finished ones are dropped when
#: an event finds them there). Each key lives as long as the records it points at.
EVENT_GENERATION_PREFIX = "lipsync:events:generation:"
EVENT_CELL_PREFIX = "lipsync:events:cell:"
EVENT_LAYER_PREFIX = "lipsync:events:layer:"

# Record the generation id unless one is recorded (the first wins), and index the job under it and
# its targets in the same step: a submit that dies half-way must not leave a job events cannot find.
# Nothing is indexed for a hash without a record (a late step of a forgotten job).
# KEYS: record, the generation's index key, then the target sets. ARGV: generation id, job id, ttl.
# Returns the recorded generation id and the job's cancel_requested flag ('' when unset), read in
# the same step, so the submit learns of a cancel that came while GEN was accepting.
_SET_GENERATION = """
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') or ''
if redis.call('HSETNX', KEYS[1], 'generation_id', ARGV[1]) == 0 then
  return {redis.call('HGET', KEYS[1], 'generation_id'), cancel}
end
if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then return {ARGV[1], cancel} end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
return {ARGV[1], cancel}
"""

# Poll now: re-drive a job that waits for its next poll, if that poll is far enough away. Like a
# sweeper's take-over it bumps the drive token (the waiting countdown poll turns stale) and gives
# the fresh chain the queued-message deadline, but it is free: ``redrives`` is not counted, nor a
# pending free_redrive flag used up. ``next_poll_at`` becomes now (the poll is due), so no second
# nudge can pass until that poll has run and scheduled the next one; ``nudged_at`` spaces nudges.
# KEYS: record, active set. ARGV: now, min_gain, min_interval, overdue_at, ttl, job id.
# Returns the verdict: 'nudged' or why not (see NudgeVerdict).
_NUDGE = """
local f = redis.call('HMGET', KEYS[1], 'created_at', 'outcome', 'cancel_requested', 'state',
  'generation_id', 'job', 'gen_status', 'next_poll_at', 'nudged_at')
local function blank(v) return (not v) or v == '' end
if blank(f[1]) then return 'unknown' end
if not blank(f[2]) then return 'finished' end
if f[3] == '1' then return 'cancelled' end
if f[4] ~= 'polling' or blank(f[5]) or blank(f[6]) then return 'not_polling' end
if f[7] == 'completed' or f[7] == 'failed' or f[7] == 'stopped' then return 'not_polling' end
local now = tonumber(ARGV[1])
local due = tonumber(f[8] or '')
if (not due) or due <= now + tonumber(ARGV[2]) then return 'poll_due' end
local last = tonumber(f[9] or '')
if last and now - last < tonumber(ARGV[3]) then return 'recently_nudged' end
redis.call('HINCRBY', KEYS[1], 'drive', 1)
redis.call('HSET', KEYS[1], 'nudged_at', ARGV[1], 'next_poll_at', ARGV[1], 'updated_at', ARGV[1],
  'overdue_at', ARGV[4], 'flag:chain_started', '1')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
return 'nudged'
"""

#: What :meth:`JobStore.nudge` did: ``nudged``, or why not: the job is ``unknown`` (no record),
#: ``finished``, ``cancelled``, ``not_polling`` (not waiting on GEN: queued, submitting, fetching, or
#: its generation already ended), its next poll is due within the gain asked (``poll_due``, which
#: includes a poll running now), or it was nudged less than the interval ago (``recently_nudged``).
NudgeVerdict = Literal[
    "nudged", "unknown", "finished", "cancelled", "not_polling", "poll_due", "recently_nudged"
]


#: What became of a stop asked of GEN (at a cancel, or at the deadline): ``stopped`` (GEN confirmed
#: it: the credits are refunded), ``already_ended`` (GEN refused: the generation had already ended
#: there), ``failed`` (it may still be running on GEN).
StopResult = Literal["stopped", "already_ended", "failed"]


# Set the record's callback unless it has one; never create a record. ARGV: the callback's JSON.
_KEEP_CALLBACK = """
if redis.call('HEXISTS', KEYS[1], 'created_at') == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'callback', ARGV[1])
"""


# Record the outcome unless one is recorded (the first writer decides) and, for that writer, the
# job's state and when its callbacks are overdue; return what whoever tells the caller needs, read
# in the same step. ``callback`` is written unless the record has one (its field, or in the job of
# a record from before the field). KEYS: record, active set. ARGV: outcome, callback ('' for none),
# state, overdue_at, updated_at, ttl, job id. Returns: 1 if this call recorded the outcome, the
# recorded outcome, the callback field, the job (only when the field is empty, for an older
# record's callback), the caller's task id, callbacks_dispatched.
_END = """
if ARGV[2] ~= '' and not redis.call('HGET', KEYS[1], 'callback') then
  local job = redis.call('HGET', KEYS[1], 'job')
  local ok, decoded = pcall(cjson.decode, job or 'null')
  local old = ok and type(decoded) == 'table' and type(decoded.request) == 'table'
    and type(decoded.request.callback) == 'table'
  if not old then redis.call('HSET', KEYS[1], 'callback', ARGV[2]) end
end
local first = redis.call('HSETNX', KEYS[1], 'outcome', ARGV[1])
if first == 1 then
  redis.call('HSET', KEYS[1], 'state', ARGV[3], 'next_poll_at', '', 'overdue_at', ARGV[4],
    'updated_at', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[7])
end
local f = redis.call('HMGET', KEYS[1], 'outcome', 'callback', 'task_id', 'callbacks_dispatched')
local job = ''
if not f[2] or f[2] == '' then job = redis.call('HGET', KEYS[1], 'job') or '' end
return {first, f[1], f[2] or '', job, f[3] or '', f[4] or ''}
"""


@dataclass(frozen=True)
class Ended:
    """What :meth:`JobStore.end` found: whether this call recorded the outcome, the recorded one,
    and, as the record holds them after it, where the outcome goes, the caller's task id, and
    whether the callbacks were marked dispatched."""

    first: bool
    outcome: dict[str, Any]
    callback: dict[str, Any] | None
    task_id: str | None
    callbacks_dispatched: bool


@dataclass(frozen=True)
class Accepted:
    """What :meth:`JobStore.accept` recorded: the job's generation id (the first one recorded
    wins), and whether a cancel of the job was asked for."""

    generation_id: str
    cancel_requested: bool


def _target_keys_of(request: Mapping[str, Any]) -> list[str]:
    """The event index's sets for the cell and the layer a request names."""
    keys = []
    for prefix, name in ((EVENT_CELL_PREFIX, "cell_id"), (EVENT_LAYER_PREFIX, "layer_id")):
        if request.get(name) is not None:
            keys.append(prefix + str(request[name]))
    return keys


def _callback_of(callback: Any, job: Any) -> dict[str, Any] | None:
    """A record's callback: its own field, else (a record from before the field) its job's."""
    return cast("dict[str, Any]", callback) if callback else _callback_in(job)


def _json_or_none(raw: bytes | str | None) -> Any:
    return json.loads(raw) if raw else None


def _callback_in(job: Any) -> dict[str, Any] | None:
    """The callback a job's JSON carries (jobs in messages carry none)."""
    request = job.get("request") if isinstance(job, dict) else None
    callback = request.get("callback") if isinstance(request, dict) else None
    return callback if isinstance(callback, dict) else None


class JobRecord(BaseModel):
    """A job as the record knows it (``lipsync-worker status JOB_ID`` prints this)."""

    job_id: str
    state: str
    task_id: str | None = None
    model: str | None = None
    generation_id: str | None = None
    gen_status: str | None = None
    polls: int = 0
    drive: int = 1
    redrives: int = 0
    next_poll_at: float | None = None
    overdue_at: float | None = None
    created_at: float
    updated_at: float
    last_error: str | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None
    #: A cancel that supersedes the job (worker.cards) ends it ``superseded``, naming the job that
    #: replaced it (None: nothing did, the sources went back to those of the current output).
    superseded: bool = False
    superseded_by: str | None = None
    #: What GEN said to our stop of the generation, and why it was not confirmed (None: never asked).
    stop_result: StopResult | None = None
    stop_error: str | None = None
    #: Stops the sweeper tried for a cancel whose canceller died, that failed transiently.
    stop_attempts: int = 0
    #: Celery id of the message that carries the job now (revoked on cancel).
    step_task_id: str | None = None
    #: The latest job state as carried by the chain (what the sweeper re-drives from).
    job: dict[str, Any] | None = None
    #: Where the outcome and events go (see the module's docstring). Not shown (``status``): its
    #: webhook URL can carry a receiver's token.
    callback: dict[str, Any] | None = Field(default=None, exclude=True, repr=False)
    outcome: dict[str, Any] | None = None
    callbacks_dispatched: bool = False

    def callback_json(self) -> dict[str, Any] | None:
        """Where the outcome and events go, as :meth:`JobStore.callback` reads it."""
        return _callback_of(self.callback, self.job)

    @property
    def terminal(self) -> bool:
        return self.outcome is not None

    @property
    def generation_stopped(self) -> bool | None:
        """Whether GEN confirmed our stop of the generation (None: no stop was asked)."""
        return None if self.stop_result is None else self.stop_result == "stopped"


class JobStore:
    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl
        self._claim = client.register_script(_CLAIM)
        self._mark_once = client.register_script(_MARK_ONCE)
        self._request_cancel = client.register_script(_REQUEST_CANCEL)
        self._keep_callback = client.register_script(_KEEP_CALLBACK)
        self._set_generation = client.register_script(_SET_GENERATION)
        self._nudge = client.register_script(_NUDGE)
        self._end = client.register_script(_END)

    @staticmethod
    def key(job_id: str) -> str:
        return JOB_KEY_PREFIX + job_id

    # -- reading -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.key(job_id))  # type: ignore[assignment]
        if not raw or b"created_at" not in raw:
            return None
        # Empty strings mean "cleared" (a hash cannot hold None).
        fields: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items() if v != b""}
        for name in ("outcome", "job", "callback"):
            if name in fields:
                fields[name] = json.loads(fields[name])
        fields.setdefault("job_id", job_id)
        fields.setdefault("state", Stage.QUEUED.value)
        fields.setdefault("updated_at", fields["created_at"])
        fields["callbacks_dispatched"] = fields.get("callbacks_dispatched") == "1"
        fields["cancel_requested"] = fields.get("cancel_requested") == "1"
        return JobRecord.model_validate(fields)

    def callback(self, job_id: str) -> dict[str, Any] | None:
        """The job's callback as JSON, or None (no callback, or no such job)."""
        raw = cast("list[bytes | None]", self.redis.hmget(self.key(job_id), ["callback", "job"]))
        callback, job = raw
        return _callback_of(json.loads(callback) if callback else None, json.loads(job) if job else None)

    def task_id(self, job_id: str) -> str | None:
        """The caller's Celery task id (what its AsyncResult waits on), if the job has a record."""
        raw = self.redis.hget(self.key(job_id), "task_id")
        return raw.decode() if isinstance(raw, bytes) and raw else None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.key(job_id), "cancel_requested") == b"1"

    def overdue(self, now: float, limit: int = 100) -> list[str]:
        """Ids of jobs whose ``overdue_at`` has passed."""
        raw = self.redis.zrangebyscore(ACTIVE_JOBS_KEY, "-inf", now, start=0, num=limit)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in raw]

    def active_count(self) -> int:
        return int(self.redis.zcard(ACTIVE_JOBS_KEY))

    # -- writing -------------------------------------------------------------------------------

    def claim(
        self, job_id: str, *, task_id: str, model: str, job: dict[str, Any] | None, overdue_at: float
    ) -> tuple[bool, JobRecord]:
        """Create the record unless it exists, atomically. Returns (created, record)."""
        now = repr(time.time())
        fields: dict[str, str] = {
            "created_at": now,
            "updated_at": now,
            "state": Stage.QUEUED.value,
            "task_id": task_id,
            "model": model,
            "job_id": job_id,
            "drive": "1",
            "overdue_at": repr(overdue_at),
        }
        if job is not None:
            callback = _callback_in(job)
            if callback is not None:
                # One place for it: the job is kept as it travels, without.
                fields["callback"] = json.dumps(callback)
                job = {**job, "request": {**job["request"], "callback": None}}
            fields["job"] = json.dumps(job)
        pairs = [item for name_value in fields.items() for item in name_value]
        args: list[str | int] = [job_id, self.ttl, repr(overdue_at), *pairs]
        created = bool(self._claim(keys=[self.key(job_id), ACTIVE_JOBS_KEY], args=args))
        record = self.get(job_id)
        assert record is not None
        return created, record

    def update(
        self,
        job_id: str,
        /,
        *,
        job: dict[str, Any] | None = None,
        overdue_at: float | None = None,
        **fields: Any,
    ) -> None:
        """Write fields; ``job`` stores the chain's state, ``overdue_at`` reschedules the sweeper."""
        pipe = self._updating(job_id, job=job, overdue_at=overdue_at, **fields)
        # The task's pending metrics ride along: a step writes its record anyway.
        deferred.execute_with(self.redis, pipe)

    def _updating(
        self, job_id: str, /, *, job: dict[str, Any] | None, overdue_at: float | None, **fields: Any
    ) -> Any:
        """The MULTI/EXEC pipeline of :meth:`update`, not yet executed."""
        key = self.key(job_id)
        mapping: dict[Any, Any] = {
            name: "" if value is None else str(value) for name, value in fields.items()
        }
        if job is not None:
            mapping["job"] = json.dumps(job)
        if overdue_at is not None:
            mapping["overdue_at"] = repr(overdue_at)
        mapping["updated_at"] = repr(time.time())
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=mapping)
        callback = _callback_in(job) if job is not None else None
        if callback is not None:
            # A job from a message written before the callback had its own field: move it there.
            pipe.hsetnx(key, "callback", json.dumps(callback))
        pipe.expire(key, self.ttl)
        if overdue_at is not None:
            pipe.zadd(ACTIVE_JOBS_KEY, {key.removeprefix(JOB_KEY_PREFIX): overdue_at})
        return pipe

    def keep_callback(self, job_id: str, callback: dict[str, Any]) -> None:
        """Make ``callback`` the job's callback unless it has one (a record from before the field).
        Nothing is written for an unknown job."""
        self._keep_callback(keys=[self.key(job_id)], args=[json.dumps(callback)])

    def accept(self, job_id: str, generation_id: str, *, target: Mapping[str, Any]) -> Accepted:
        """Record GEN's generation id (if one is recorded already, that one wins and is returned),
        index the job for GEN's events under it and under the cell and layer of ``target`` (the
        job's request), and read whether a cancel was asked for: all in one step."""
        keys = [self.key(job_id), EVENT_GENERATION_PREFIX + generation_id, *_target_keys_of(target)]
        winner, cancel = self._set_generation(keys=keys, args=[generation_id, job_id, self.ttl])
        return Accepted(as_text(winner), cancel_requested=as_text(cancel) == "1")

    def end(
        self,
        job_id: str,
        outcome: dict[str, Any],
        *,
        state: str,
        overdue_at: float,
        callback: dict[str, Any] | None = None,
    ) -> Ended:
        """Record the job's outcome once, and read what the one who tells the caller needs
        (:class:`Ended`: whether this call decided it, the recorded outcome, ...), in one step.

        The job stays in the active set, due at ``overdue_at``, until its callbacks are marked
        dispatched: a crash between the two leaves it for the sweeper to re-dispatch, to
        ``callback`` if the record had none (a request refused before it became a job).
        """
        args: list[str | int] = [
            json.dumps(outcome),
            "" if callback is None else json.dumps(callback),
            state,
            repr(overdue_at),
            repr(time.time()),
            self.ttl,
            job_id,
        ]
        first, stored, recorded, job, task_id, dispatched = self._end(
            keys=[self.key(job_id), ACTIVE_JOBS_KEY], args=args
        )
        return Ended(
            first=bool(first),
            outcome=json.loads(stored),
            callback=_callback_of(_json_or_none(recorded), _json_or_none(job)),
            task_id=as_text(task_id) or None,
            callbacks_dispatched=as_text(dispatched) == "1",
        )

    def mark_callbacks_dispatched(self, job_id: str) -> None:
        pipe = self._updating(job_id, job=None, overdue_at=None, callbacks_dispatched="1")
        # Out of the active set in the same step (one round trip): nothing is owed any more.
        pipe.zrem(ACTIVE_JOBS_KEY, job_id)
        deferred.execute_with(self.redis, pipe)

    def mark_once(self, job_id: str, flag: str) -> bool:
        """Set a one-time flag on the job (e.g. an event sent); True for the caller that set it.
        False for an unknown job, on which nothing is written."""
        return bool(self._mark_once(keys=[self.key(job_id)], args=[f"flag:{flag}"]))

    def unmark(self, job_id: str, flag: str) -> None:
        """Clear a flag :meth:`mark_once` set, for a step that turned out not to happen."""
        self.redis.hdel(self.key(job_id), f"flag:{flag}")

    def take_over(
        self, job_id: str, *, now: float, overdue_at: float, force: bool = False
    ) -> JobRecord | None:
        """Atomically become the job's driver: bump ``drive`` if the job is (still) overdue.

        Returns the updated record, or None when someone else got there first, the job finished
        meanwhile, or (unless ``force``) it is no longer overdue. Two sweepers racing for one job
        cannot both win: the check and the bump happen under WATCH.

        The job has a chain from now on (the one the taker sends), so ``flag:chain_started`` is set
        in the same step: a ``lipsync.run`` message redelivered late joins the job instead of
        starting a second chain.
        """
        key = self.key(job_id)
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                fields = ["overdue_at", "outcome", "created_at", "callback", "job", FREE_REDRIVE]
                overdue_raw, outcome, created, callback, job, free = pipe.hmget(key, fields)
                if created is None or outcome is not None:
                    return None
                if not force and (overdue_raw is None or float(overdue_raw) > now):
                    return None
                pipe.multi()
                pipe.hincrby(key, "drive", 1)
                if free:
                    # Its worker lost the broker and dropped it, or the broker lost its message
                    # (worker.jobs.liveness, worker.jobs.audit): not the job's doing, so it does not
                    # count toward LIPSYNC_MAX_REDRIVES (a guard against inputs that kill workers).
                    pipe.hdel(key, FREE_REDRIVE)
                else:
                    pipe.hincrby(key, "redrives", 1)
                pipe.hset(
                    key,
                    mapping={
                        "overdue_at": repr(overdue_at),
                        "updated_at": repr(now),
                        "flag:chain_started": "1",
                    },
                )
                old_callback = None if callback or not job else _callback_in(json.loads(job))
                if old_callback is not None:
                    # A record from before the field: the re-driven messages carry no callback.
                    pipe.hset(key, "callback", json.dumps(old_callback))
                pipe.expire(key, self.ttl)
                pipe.zadd(ACTIVE_JOBS_KEY, {job_id: overdue_at})
                pipe.execute()
            except redis.WatchError:
                return None
        return self.get(job_id)

    def request_cancel(
        self, job_id: str, *, reason: str | None = None, overdue_at: float | None = None
    ) -> JobRecord | None:
        """Flag the job cancelled and invalidate every message of its current chain. None (and
        nothing written) for an unknown job.

        ``reason`` is kept for whoever finishes the cancel (the sweeper, if the canceller dies);
        ``overdue_at`` is when the canceller, still working on it, should be presumed dead.
        """
        due = "" if overdue_at is None else repr(overdue_at)
        args: list[str | int] = [repr(time.time()), self.ttl, job_id, reason or "", due]
        if not self._request_cancel(keys=[self.key(job_id), ACTIVE_JOBS_KEY], args=args):
            return None
        return self.get(job_id)

    def forget(self, job_id: str) -> None:
        """Remove a job entirely (an enqueue that failed before anything was sent)."""
        pipe = self.redis.pipeline()
        pipe.delete(self.key(job_id))
        pipe.zrem(ACTIVE_JOBS_KEY, job_id)
        pipe.execute()

    def forget_active(self, job_id: str) -> None:
        self.redis.zrem(ACTIVE_JOBS_KEY, job_id)

    # -- GEN's events: which jobs an event names, and polling one of them now ------------------

    def jobs_of_generations(self, generation_ids: Sequence[str]) -> dict[str, str]:
        """generation id -> job id, for the generation ids the index knows."""
        if not generation_ids:
            return {}
        found = self.redis.mget([EVENT_GENERATION_PREFIX + g for g in generation_ids])
        return {
            g: job.decode() if isinstance(job, bytes) else str(job)
            for g, job in zip(generation_ids, found, strict=True)
            if job
        }

    def jobs_on_targets(self, cell_ids: Iterable[str], layer_ids: Iterable[str]) -> set[str]:
        """Ids of the jobs indexed under any of these cells or layers (finished ones included until
        :meth:`drop_from_targets` removes them)."""
        keys = [EVENT_CELL_PREFIX + c for c in cell_ids] + [EVENT_LAYER_PREFIX + layer for layer in layer_ids]
        if not keys:
            return set()
        return {member.decode() for member in cast("set[bytes]", self.redis.sunion(keys))}

    def drop_from_targets(self, job_id: str, cell_ids: Iterable[str], layer_ids: Iterable[str]) -> None:
        """Take a job that waits on nothing any more (finished, or gone) out of these target sets."""
        keys = [EVENT_CELL_PREFIX + c for c in cell_ids] + [EVENT_LAYER_PREFIX + layer for layer in layer_ids]
        if keys:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.srem(key, job_id)
            pipe.execute()

    def nudge(
        self, job_id: str, *, now: float, min_gain: float, min_interval: float, overdue_at: float
    ) -> tuple[NudgeVerdict, JobRecord | None]:
        """Atomically make the job's next poll happen now, if it is waiting for one more than
        ``min_gain`` seconds away and was not nudged in the last ``min_interval`` seconds: bump
        ``drive`` (free: not a counted re-drive) and return the updated record, to send the fresh
        poll chain from (:func:`worker.jobs.nudge.nudge_jobs`). Otherwise the verdict says why not,
        and nothing is written.
        """
        args: list[str | int | float] = [
            repr(now),
            repr(min_gain),
            repr(min_interval),
            repr(overdue_at),
            self.ttl,
            job_id,
        ]
        raw = self._nudge(keys=[self.key(job_id), ACTIVE_JOBS_KEY], args=args)
        verdict = cast("NudgeVerdict", raw.decode() if isinstance(raw, bytes) else str(raw))
        if verdict != "nudged":
            return verdict, None
        return verdict, self.get(job_id)
