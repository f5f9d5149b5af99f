"""The durable job record: one Redis hash per job id, the source of truth about a job.

Celery messages come and go (retries are new messages; a broker restart can lose some); the record
says what has already happened to a job, so that no step is done twice against the paid API:

* ``generation_id`` is written (HSETNX) the moment GEN accepts the job, before the chain moves on.
  A re-run submit reads it and does not POST again.
* ``outcome`` is written (HSETNX) once. Whoever writes it first decides the job's end; everyone
  else reads it back. Callbacks carry ids derived from the job id, so a re-send is recognisable.

Records live ``job_timeout + result_ttl`` seconds after their last update (the README documents it).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from pydantic import BaseModel

KEY_PREFIX = "lipsync:job:"
DEAD_LETTER_KEY = "lipsync:callbacks:dead"

#: Job states, in the order a successful job passes through them.
QUEUED = "queued"
SUBMITTED = "submitted"
POLLING = "polling"
FETCHING = "fetching"
COMPLETED = "completed"


class JobRecord(BaseModel):
    """A job as the record knows it (``lipsync-worker status JOB_ID`` prints this)."""

    job_id: str
    state: str
    task_id: str | None = None
    model: str | None = None
    generation_id: str | None = None
    gen_status: str | None = None
    polls: int = 0
    attempts: int = 0
    next_poll_at: float | None = None
    created_at: float
    updated_at: float
    last_error: str | None = None
    outcome: dict[str, Any] | None = None
    callbacks_dispatched: bool = False

    @property
    def terminal(self) -> bool:
        return self.outcome is not None


class JobStore:
    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.redis = client
        self.ttl = ttl

    @staticmethod
    def key(job_id: str) -> str:
        return KEY_PREFIX + job_id

    def claim(self, job_id: str, *, task_id: str, model: str) -> tuple[bool, JobRecord]:
        """Create the record unless it exists. Returns (created, record)."""
        key = self.key(job_id)
        now = time.time()
        created = bool(self.redis.hsetnx(key, "created_at", repr(now)))
        if created:
            self._write(key, state=QUEUED, task_id=task_id, model=model, job_id=job_id, attempts=0)
        record = self.get(job_id)
        assert record is not None
        return created, record

    def get(self, job_id: str) -> JobRecord | None:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.key(job_id))  # type: ignore[assignment]
        if not raw or b"created_at" not in raw:
            return None
        # Empty strings mean "cleared" (a hash cannot hold None).
        fields = {k.decode(): v.decode() for k, v in raw.items() if v != b""}
        outcome = fields.pop("outcome", None)
        return JobRecord.model_validate(
            {
                **fields,
                "job_id": fields.get("job_id", job_id),
                "state": fields.get("state", QUEUED),
                "updated_at": fields.get("updated_at", fields["created_at"]),
                "outcome": json.loads(outcome) if outcome else None,
                "callbacks_dispatched": fields.get("callbacks_dispatched") == "1",
            }
        )

    def update(self, job_id: str, **fields: Any) -> None:
        self._write(self.key(job_id), **fields)

    def incr_attempts(self, job_id: str) -> int:
        key = self.key(job_id)
        value = int(self.redis.hincrby(key, "attempts", 1))
        self.redis.expire(key, self.ttl)
        return value

    def set_generation(self, job_id: str, generation_id: str) -> str:
        """Record GEN's generation id; if one is already recorded, that one wins and is returned."""
        key = self.key(job_id)
        if not self.redis.hsetnx(key, "generation_id", generation_id):
            existing = self.redis.hget(key, "generation_id")
            assert existing is not None
            return existing.decode() if isinstance(existing, bytes) else str(existing)
        self._write(key, state=SUBMITTED)
        return generation_id

    def finish(self, job_id: str, outcome: dict[str, Any], *, state: str) -> tuple[bool, dict[str, Any]]:
        """Record the job's outcome once. Returns (this call decided it, the recorded outcome)."""
        key = self.key(job_id)
        first = bool(self.redis.hsetnx(key, "outcome", json.dumps(outcome)))
        if first:
            self._write(key, state=state, next_poll_at="")
            return True, outcome
        stored = self.redis.hget(key, "outcome")
        assert stored is not None
        return False, json.loads(stored)

    def mark_callbacks_dispatched(self, job_id: str) -> None:
        self._write(self.key(job_id), callbacks_dispatched="1")

    def mark_once(self, job_id: str, flag: str) -> bool:
        """Set a one-time flag on the job (e.g. an event sent); True for the caller that set it."""
        return bool(self.redis.hsetnx(self.key(job_id), f"flag:{flag}", "1"))

    def dead_letter(self, entry: dict[str, Any]) -> None:
        self.redis.lpush(DEAD_LETTER_KEY, json.dumps(entry))

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        raw: list[bytes] = self.redis.lrange(DEAD_LETTER_KEY, 0, limit - 1)  # type: ignore[assignment]
        return [json.loads(item) for item in raw]

    def _write(self, key: str, **fields: Any) -> None:
        mapping: dict[Any, Any] = {
            name: "" if value is None else str(value) for name, value in fields.items()
        }
        mapping["updated_at"] = repr(time.time())
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.ttl)
        pipe.execute()
