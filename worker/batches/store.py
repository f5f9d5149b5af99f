"""The durable batch record in Redis: what a batch holds, how far it got, and whether its one batch
callback went out.

Keys (all refreshed to the record's TTL on every write):

* ``lipsync:batch:<id>`` (hash): ``total``, ``max_parallel``, ``admitted`` (items 0..admitted-1 have
  been started, in order), ``state`` (``running`` or ``cancelled``), the batch ``callback`` and
  ``metadata`` (JSON), ``n:<status>`` counts of ended items, and at the end ``outcome`` (HSETNX:
  one batch result, decided once) and ``dispatched``;
* ``lipsync:batch:<id>:items`` (list): each item's request JSON (its job id filled in);
* ``lipsync:batch:<id>:results`` (hash): item index -> the item's outcome, written once (HSETNX);
* ``lipsync:batchitem:<job id>`` (string): ``<batch_id> <index>``, how a job's end finds its batch;
* ``lipsync:batches:active`` (sorted set): batches not yet done with, scored by when the sweeper
  should next look at them (:mod:`worker.batches.progress`).

Every change that must not be half-made (creating the batch, reserving the next items, recording an
item's end, cancelling) is one Lua script.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis
from pydantic import BaseModel, Field

from worker.batches.models import BatchRequest
from worker.names import ACTIVE_BATCHES_KEY, BATCH_ITEM_KEY_PREFIX, BATCH_KEY_PREFIX
from worker.ops.replies import as_text

# Create the batch unless it exists (a second enqueue joins the first). KEYS: record, items,
# active set. ARGV: batch id, ttl, due_at, n items, then the record's fields as name/value pairs
# (2*n_fields values), then the items' JSON, then the items' job ids.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[4])
local nfields = tonumber(ARGV[5])
local pos = 6
for i = 1, nfields do
  redis.call('HSET', KEYS[1], ARGV[pos], ARGV[pos + 1])
  pos = pos + 2
end
for i = 1, n do
  redis.call('RPUSH', KEYS[2], ARGV[pos])
  pos = pos + 1
end
for i = 1, n do
  local item = KEYS[4] .. ARGV[pos]
  redis.call('SET', item, ARGV[1] .. ' ' .. (i - 1), 'EX', ARGV[2])
  pos = pos + 1
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"""

# Reserve the next items to start: as many as max_parallel leaves room for, in order. Nothing for a
# batch that is cancelled, finished or unknown. KEYS: record, results. ARGV: ttl.
# Returns {first, end}: items first..end-1 are this caller's to start.
_ADMIT = """
local h = redis.call('HMGET', KEYS[1], 'total', 'admitted', 'max_parallel', 'state')
if not h[1] then return {0, 0} end
local total, admitted, parallel = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
if h[4] ~= 'running' then return {admitted, admitted} end
local ended = redis.call('HLEN', KEYS[2])
local room = math.min(parallel - (admitted - ended), total - admitted)
if room <= 0 then return {admitted, admitted} end
redis.call('HSET', KEYS[1], 'admitted', admitted + room)
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {admitted, admitted + room}
"""

# Record an item's outcome once, and count it. KEYS: record, results, items. ARGV: index, outcome
# JSON, status, ttl. Returns {1 if this call recorded it, items ended, total} ({-1, 0, 0}: no batch).
_ITEM_ENDED = """
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return {-1, 0, 0} end
local first = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if first == 1 then redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[3], 1) end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return {first, redis.call('HLEN', KEYS[2]), tonumber(total)}
"""

# Stop admitting: the batch is cancelled, and the items not started yet will never be. KEYS:
# record. ARGV: ttl. Returns {admitted, total} ({-1, 0}: no such batch; {-2, ...}: already done).
_CANCEL = """
local h = redis.call('HMGET', KEYS[1], 'total', 'admitted', 'outcome')
if not h[1] then return {-1, 0} end
if h[3] then return {-2, tonumber(h[1])} end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {tonumber(h[2]), tonumber(h[1])}
"""


class BatchRecord(BaseModel):
    """A batch as its record knows it (``lipsync-worker status BATCH_ID`` prints this)."""

    batch_id: str
    state: str
    total: int
    max_parallel: int
    admitted: int
    #: Items ended so far, by outcome status.
    counts: dict[str, int]
    created_at: float
    metadata: dict[str, Any]
    #: Not shown: a webhook URL can carry a receiver's token.
    callback: dict[str, Any] | None = Field(default=None, exclude=True, repr=False)
    outcome: dict[str, Any] | None = None
    dispatched: bool = False

    @property
    def ended(self) -> int:
        return sum(self.counts.values())

    @property
    def in_flight(self) -> int:
        return self.admitted - self.ended if self.admitted >= self.ended else 0


class BatchStore:
    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl
        self._create = client.register_script(_CREATE)
        self._admit = client.register_script(_ADMIT)
        self._item_ended = client.register_script(_ITEM_ENDED)
        self._cancel = client.register_script(_CANCEL)

    @staticmethod
    def key(batch_id: str) -> str:
        return BATCH_KEY_PREFIX + batch_id

    def _keys(self, batch_id: str) -> tuple[str, str, str]:
        key = self.key(batch_id)
        return key, key + ":items", key + ":results"

    # -- writing -------------------------------------------------------------------------------

    def create(self, batch: BatchRequest, *, max_parallel: int, due_at: float) -> bool:
        """Record the batch unless a batch with its id exists. True if this call created it."""
        record, items, _ = self._keys(batch.batch_id)
        fields = {
            "batch_id": batch.batch_id,
            "created_at": repr(time.time()),
            "state": "running",
            "total": str(len(batch.items)),
            "admitted": "0",
            "max_parallel": str(batch.max_parallel or max_parallel),
            "metadata": json.dumps(batch.metadata),
            "callback": json.dumps(batch.callback.model_dump(mode="json")) if batch.callback else "",
        }
        pairs = [part for pair in fields.items() for part in pair]
        requests = [item.model_dump_json() for item in batch.items]
        args: list[str | int] = [
            batch.batch_id,
            self.ttl,
            repr(due_at),
            len(batch.items),
            len(fields),
            *pairs,
            *requests,
            *batch.job_ids(),
        ]
        keys = [record, items, ACTIVE_BATCHES_KEY, BATCH_ITEM_KEY_PREFIX]
        return bool(self._create(keys=keys, args=args))

    def admit(self, batch_id: str) -> range:
        """Reserve the next items to start (the caller starts them). Empty when there is no room."""
        record, _, results = self._keys(batch_id)
        first, end = cast("list[int]", self._admit(keys=[record, results], args=[self.ttl]))
        return range(int(first), int(end))

    def item_ended(self, batch_id: str, index: int, outcome: dict[str, Any]) -> tuple[bool, int, int]:
        """Record an item's outcome (once). Returns (this call recorded it, items ended, total);
        total 0: no such batch."""
        record, items, results = self._keys(batch_id)
        status = str(outcome.get("status") or "failed")
        first, ended, total = cast(
            "list[int]",
            self._item_ended(
                keys=[record, results, items], args=[index, json.dumps(outcome), status, self.ttl]
            ),
        )
        return int(first) == 1, int(ended), int(total)

    def cancel(self, batch_id: str) -> tuple[int, int]:
        """Stop admitting items. Returns (items started, total); (-1, 0) unknown; (-2, total): the
        batch had finished already."""
        admitted, total = cast("list[int]", self._cancel(keys=[self.key(batch_id)], args=[self.ttl]))
        return int(admitted), int(total)

    def record_outcome(self, batch_id: str, outcome: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Record the batch's result once. Returns (this call decided it, the recorded result)."""
        key = self.key(batch_id)
        if self.redis.hsetnx(key, "outcome", json.dumps(outcome)):
            self.redis.hset(key, "finished_at", repr(time.time()))
            return True, outcome
        stored = self.redis.hget(key, "outcome")
        assert stored is not None
        return False, cast("dict[str, Any]", json.loads(stored))

    def mark_dispatched(self, batch_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key(batch_id), "dispatched", "1")
        pipe.zrem(ACTIVE_BATCHES_KEY, batch_id)
        pipe.execute()

    def due(self, batch_id: str, at: float) -> None:
        """When the sweeper should next look at the batch (it stays active until dispatched)."""
        self.redis.zadd(ACTIVE_BATCHES_KEY, {batch_id: at}, xx=True)

    def forget(self, batch_id: str) -> None:
        """Remove the batch entirely (its enqueue failed before anything ran)."""
        job_ids = self.job_ids(batch_id)
        pipe = self.redis.pipeline()
        pipe.delete(*self._keys(batch_id), *(BATCH_ITEM_KEY_PREFIX + job_id for job_id in job_ids))
        pipe.zrem(ACTIVE_BATCHES_KEY, batch_id)
        pipe.execute()

    def forget_active(self, batch_id: str) -> None:
        self.redis.zrem(ACTIVE_BATCHES_KEY, batch_id)

    # -- reading -------------------------------------------------------------------------------

    def get(self, batch_id: str) -> BatchRecord | None:
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(self.key(batch_id)))
        if not raw or b"total" not in raw:
            return None
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        counts = {k.removeprefix("n:"): int(v) for k, v in fields.items() if k.startswith("n:")}
        return BatchRecord(
            batch_id=batch_id,
            state=fields.get("state", "running"),
            total=int(fields["total"]),
            max_parallel=int(fields.get("max_parallel", "1")),
            admitted=int(fields.get("admitted", "0")),
            counts=counts,
            created_at=float(fields.get("created_at", "0")),
            metadata=json.loads(fields.get("metadata") or "{}"),
            callback=json.loads(fields["callback"]) if fields.get("callback") else None,
            outcome=json.loads(fields["outcome"]) if fields.get("outcome") else None,
            dispatched=fields.get("dispatched") == "1",
        )

    def items(self, batch_id: str, indexes: range) -> list[dict[str, Any]]:
        """The requests of items ``indexes`` (a contiguous range), as JSON."""
        if not indexes:
            return []
        raw = self.redis.lrange(self._keys(batch_id)[1], indexes.start, indexes.stop - 1)
        return [cast("dict[str, Any]", json.loads(item)) for item in raw]

    def job_ids(self, batch_id: str) -> list[str]:
        return [str(json.loads(raw)["job_id"]) for raw in self.redis.lrange(self._keys(batch_id)[1], 0, -1)]

    def job_ids_at(self, batch_id: str, indexes: list[int]) -> list[str]:
        """The job ids of items ``indexes`` (any of them), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for index in indexes:
            pipe.lindex(self._keys(batch_id)[1], index)
        return [str(json.loads(raw)["job_id"]) for raw in pipe.execute()]

    def state(self, batch_id: str) -> str | None:
        raw = self.redis.hget(self.key(batch_id), "state")
        return as_text(raw) if raw else None

    def results(self, batch_id: str) -> dict[int, dict[str, Any]]:
        """Ended items' outcomes by index."""
        raw = cast("dict[bytes, bytes]", self.redis.hgetall(self._keys(batch_id)[2]))
        return {int(k): cast("dict[str, Any]", json.loads(v)) for k, v in raw.items()}

    def ended_indexes(self, batch_id: str) -> set[int]:
        return {int(k) for k in self.redis.hkeys(self._keys(batch_id)[2])}

    def batch_of(self, job_id: str) -> tuple[str, int] | None:
        """The batch and index of an item's job, or None for a job of no batch."""
        raw = self.redis.get(BATCH_ITEM_KEY_PREFIX + job_id)
        if not raw:
            return None
        batch_id, _, index = as_text(raw).rpartition(" ")
        return batch_id, int(index)

    def overdue(self, now: float, limit: int = 100) -> list[str]:
        raw = self.redis.zrangebyscore(ACTIVE_BATCHES_KEY, "-inf", now, start=0, num=limit)
        return [as_text(item) for item in raw]

    def active(self, limit: int = 10_000) -> list[str]:
        return [as_text(item) for item in self.redis.zrange(ACTIVE_BATCHES_KEY, 0, limit - 1)]
