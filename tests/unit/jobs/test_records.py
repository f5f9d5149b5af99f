"""The durable job record (worker.jobs.records.JobStore) against a real Redis."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.jobs.records import JobStore
from worker.jobs.resources import Resources
from worker.names import ACTIVE_JOBS_KEY, Stage

JOB: dict[str, Any] = {"request": {"job_id": "j1", "model": "gen"}, "attempt": 0}
OUTCOME: dict[str, Any] = {"job_id": "j1", "status": "completed", "video": {"path": "/o/j1.mp4"}}


@pytest.fixture
def jobs(res: Resources) -> JobStore:
    return res.jobs


def claim(jobs: JobStore, job_id: str = "j1", *, overdue_at: float, task_id: str = "t-1") -> None:
    created, _ = jobs.claim(job_id, task_id=task_id, model="gen", job=JOB, overdue_at=overdue_at)
    assert created


def active(jobs: JobStore) -> dict[str, float]:
    raw = cast("list[tuple[bytes, float]]", jobs.redis.zrange(ACTIVE_JOBS_KEY, 0, -1, withscores=True))
    return {member.decode(): score for member, score in raw}


def assert_ttl_is_the_stores(jobs: JobStore, job_id: str = "j1") -> None:
    assert jobs.ttl - 1 <= jobs.redis.ttl(JobStore.key(job_id)) <= jobs.ttl


# -- claim and get -----------------------------------------------------------------------------


def test_claim_creates_the_record_once(jobs: JobStore) -> None:
    now = time.time()
    created, record = jobs.claim("j1", task_id="t-1", model="gen", job=JOB, overdue_at=now + 60)

    assert created
    assert (record.job_id, record.state, record.task_id, record.model) == (
        "j1",
        Stage.QUEUED.value,
        "t-1",
        "gen",
    )
    assert (record.drive, record.redrives, record.polls) == (1, 0, 0)
    assert record.job == JOB and record.overdue_at == now + 60
    assert record.outcome is None and not record.terminal
    assert not record.cancel_requested and not record.callbacks_dispatched
    assert active(jobs) == {"j1": now + 60}

    again, second = jobs.claim("j1", task_id="t-2", model="sync_so", job={"other": 1}, overdue_at=now + 999)

    assert not again
    assert second == jobs.get("j1")
    assert (second.task_id, second.model, second.job, second.overdue_at) == ("t-1", "gen", JOB, now + 60)
    assert active(jobs) == {"j1": now + 60}, "a second claim does not reschedule"


def test_an_unknown_job_has_no_record(jobs: JobStore) -> None:
    assert jobs.get("nope") is None
    assert not jobs.cancel_requested("nope")


def test_records_expire_after_the_stores_ttl(jobs: JobStore, res: Resources) -> None:
    assert jobs.ttl == int(res.settings.job_timeout) + res.settings.result_ttl
    claim(jobs, overdue_at=time.time() + 60)
    assert_ttl_is_the_stores(jobs)

    jobs.redis.expire(JobStore.key("j1"), 5)  # as if time had passed: each write renews it
    jobs.update("j1", state=Stage.POLLING.value, polls=1)
    assert_ttl_is_the_stores(jobs)

    jobs.redis.expire(JobStore.key("j1"), 5)
    jobs.end("j1", OUTCOME, state="completed", overdue_at=time.time() + 60)
    assert_ttl_is_the_stores(jobs)


# -- update and the active set -----------------------------------------------------------------


def test_update_writes_fields_and_clears_with_none(jobs: JobStore) -> None:
    claim(jobs, overdue_at=time.time() + 60)

    jobs.update("j1", state=Stage.POLLING.value, polls=3, last_error="HTTP 503", job={"step": 2})
    record = jobs.get("j1")
    assert record is not None
    assert (record.state, record.polls, record.last_error, record.job) == (
        "polling",
        3,
        "HTTP 503",
        {"step": 2},
    )

    jobs.update("j1", last_error=None)
    record = jobs.get("j1")
    assert record is not None and record.last_error is None
    assert record.job == {"step": 2}, "job=None leaves the stored job alone"


def test_update_with_overdue_at_reschedules_the_sweeper(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 60)

    jobs.update("j1", state=Stage.POLLING.value, overdue_at=now + 300)

    assert jobs.overdue(now + 299) == []
    assert jobs.overdue(now + 300) == ["j1"]
    assert jobs.overdue(now + 10_000) == ["j1"]
    assert active(jobs) == {"j1": now + 300} and jobs.active_count() == 1
    record = jobs.get("j1")
    assert record is not None and record.overdue_at == now + 300

    jobs.update("j1", polls=1)  # no overdue_at: the schedule stays
    assert active(jobs) == {"j1": now + 300}


def test_overdue_lists_only_the_jobs_past_due_soonest_first(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, "late", overdue_at=now - 10)
    claim(jobs, "later", overdue_at=now - 20)
    claim(jobs, "future", overdue_at=now + 10)

    assert jobs.overdue(now) == ["later", "late"]
    assert jobs.overdue(now, limit=1) == ["later"]
    assert jobs.active_count() == 3


# -- what happened once ------------------------------------------------------------------------


def test_the_first_generation_id_wins(jobs: JobStore) -> None:
    claim(jobs, overdue_at=time.time() + 60)

    assert jobs.accept("j1", "gen-A", target={}).generation_id == "gen-A"
    assert jobs.accept("j1", "gen-B", target={}).generation_id == "gen-A"

    record = jobs.get("j1")
    assert record is not None and record.generation_id == "gen-A"


def test_finish_records_the_outcome_once(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 60)
    jobs.update("j1", state=Stage.POLLING.value, next_poll_at=now + 5)

    first = jobs.end("j1", OUTCOME, state="completed", overdue_at=now + 120)
    assert (first.first, first.outcome) == (True, OUTCOME)
    other = {"job_id": "j1", "status": "cancelled"}
    again = jobs.end("j1", other, state="failed", overdue_at=now + 999)
    assert (again.first, again.outcome) == (False, OUTCOME)

    record = jobs.get("j1")
    assert record is not None and record.terminal
    assert (record.outcome, record.state, record.next_poll_at) == (OUTCOME, "completed", None)
    assert active(jobs) == {"j1": now + 120}, "still active until its callbacks are dispatched"
    assert not record.callbacks_dispatched


def test_marking_callbacks_dispatched_leaves_the_active_set(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 60)
    claim(jobs, "j2", overdue_at=now + 60)
    jobs.end("j1", OUTCOME, state="completed", overdue_at=now + 120)

    jobs.mark_callbacks_dispatched("j1")

    record = jobs.get("j1")
    assert record is not None and record.callbacks_dispatched
    assert active(jobs) == {"j2": now + 60}
    assert jobs.overdue(now + 10_000) == ["j2"]


def test_mark_once_is_true_only_the_first_time(jobs: JobStore) -> None:
    claim(jobs, overdue_at=time.time() + 60)
    claim(jobs, "j2", overdue_at=time.time() + 60)

    assert jobs.mark_once("j1", "event:submitted")
    assert not jobs.mark_once("j1", "event:submitted")
    assert jobs.mark_once("j1", "chain_started"), "flags are independent"
    assert jobs.mark_once("j2", "event:submitted"), "and per job"
    assert not jobs.mark_once("j2", "event:submitted")


# -- drive tokens ------------------------------------------------------------------------------


def test_take_over_only_when_overdue(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 60)

    assert jobs.take_over("j1", now=now + 59, overdue_at=now + 500) is None
    record = jobs.get("j1")
    assert record is not None and (record.drive, record.redrives, record.overdue_at) == (1, 0, now + 60)
    assert active(jobs) == {"j1": now + 60}

    taken = jobs.take_over("j1", now=now + 60, overdue_at=now + 500)

    assert taken is not None
    assert (taken.drive, taken.redrives, taken.overdue_at) == (2, 1, now + 500)
    assert taken == jobs.get("j1")
    assert active(jobs) == {"j1": now + 500}


def test_of_two_take_overs_at_the_same_time_only_the_first_wins(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now - 1)

    first = jobs.take_over("j1", now=now, overdue_at=now + 300)
    second = jobs.take_over("j1", now=now, overdue_at=now + 300)

    assert first is not None and first.drive == 2
    assert second is None
    record = jobs.get("j1")
    assert record is not None and (record.drive, record.redrives) == (2, 1)


def test_a_forced_take_over_ignores_the_due_time(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 3600)

    taken = jobs.take_over("j1", now=now, overdue_at=now + 30, force=True)

    assert taken is not None and (taken.drive, taken.overdue_at) == (2, now + 30)
    assert active(jobs) == {"j1": now + 30}


@pytest.mark.parametrize("force", [False, True])
def test_a_finished_job_is_never_taken_over(jobs: JobStore, force: bool) -> None:
    now = time.time()
    claim(jobs, overdue_at=now - 100)
    jobs.end("j1", OUTCOME, state="completed", overdue_at=now - 50)

    assert jobs.take_over("j1", now=now, overdue_at=now + 300, force=force) is None

    record = jobs.get("j1")
    assert record is not None and (record.drive, record.redrives) == (1, 0)
    assert active(jobs) == {"j1": now - 50}


@pytest.mark.parametrize("force", [False, True])
def test_an_unknown_job_is_never_taken_over(jobs: JobStore, force: bool) -> None:
    assert jobs.take_over("ghost", now=time.time(), overdue_at=time.time() + 60, force=force) is None
    assert not jobs.redis.exists(JobStore.key("ghost"))
    assert jobs.active_count() == 0


def test_request_cancel_sets_the_flag_and_bumps_the_drive(jobs: JobStore) -> None:
    claim(jobs, overdue_at=time.time() + 60)
    assert not jobs.cancel_requested("j1")

    record = jobs.request_cancel("j1")

    assert record is not None and record.cancel_requested and record.drive == 2
    assert jobs.cancel_requested("j1")
    assert record == jobs.get("j1")
    assert record.redrives == 0, "a cancel is not a re-drive"


# -- forget ------------------------------------------------------------------------------------


def test_forget_removes_the_record_and_its_active_entry(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now - 1)
    claim(jobs, "j2", overdue_at=now - 1)

    jobs.forget("j1")

    assert jobs.get("j1") is None
    assert not jobs.redis.exists(JobStore.key("j1"))
    assert jobs.overdue(now) == ["j2"] and jobs.active_count() == 1
    created, record = jobs.claim("j1", task_id="t-9", model="gen", job=JOB, overdue_at=now + 60)
    assert created and record.task_id == "t-9", "a forgotten job id can be claimed afresh"


# -- atomicity and debris ----------------------------------------------------------------------


class DyingConnection(redis.Connection):
    """A connection whose process "dies" after sending ``sends_left`` commands (a pipeline or a
    script is one send), as a worker SIGKILLed in the middle of a call would: everything after
    that never reaches Redis. The connection's own handshake is not counted."""

    sends_left = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not _is_handshake(command):
            if DyingConnection.sends_left <= 0:
                raise redis.ConnectionError("the process died here")
            DyingConnection.sends_left -= 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def _is_handshake(command: Any) -> bool:
    packed = b"".join(command) if isinstance(command, list) else bytes(command)
    return any(word in packed[:64].upper() for word in (b"HELLO", b"CLIENT", b"PING", b"SELECT"))


@pytest.mark.parametrize("sends", [1, 2, 3])
def test_a_process_dying_inside_claim_leaves_no_half_record(redis_url: str, sends: int) -> None:
    """Whatever the point a claim is cut off at, the id is either unknown or a whole record: with
    its TTL, its job, and its entry in the active set (a half record never expires and blocks the id)."""
    observer = redis.Redis.from_url(redis_url)
    observer.script_flush()  # the store's scripts must be loaded again: one more send to die at
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=DyingConnection)
    DyingConnection.sends_left = sends
    # No retries: a dead process does not reconnect.
    dying = JobStore(redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0)), ttl=3600)
    try:
        dying.claim("j1", task_id="t-1", model="gen", job=JOB, overdue_at=time.time() + 60)
    except redis.ConnectionError:
        pass
    finally:
        pool.disconnect()

    jobs = JobStore(observer, ttl=3600)
    key = JobStore.key("j1")
    if observer.exists(key):
        record = jobs.get("j1")
        assert record is not None and record.job == JOB
        assert 0 < observer.ttl(key) <= 3600
        assert active(jobs).keys() == {"j1"}
    else:
        assert active(jobs) == {}
    observer.close()


def test_a_cancel_of_an_unknown_job_writes_nothing_and_a_later_job_starts_uncancelled(
    jobs: JobStore,
) -> None:
    assert jobs.request_cancel("j1") is None
    assert not jobs.redis.exists(JobStore.key("j1"))

    claim(jobs, overdue_at=time.time() + 60)
    record = jobs.get("j1")
    assert record is not None and not record.cancel_requested and record.drive == 1


def test_mark_once_on_an_unknown_job_writes_nothing_and_a_later_job_starts_unmarked(
    jobs: JobStore,
) -> None:
    assert not jobs.mark_once("j1", "chain_started"), "nothing was marked"
    assert not jobs.redis.exists(JobStore.key("j1"))

    claim(jobs, overdue_at=time.time() + 60)
    assert jobs.mark_once("j1", "chain_started")


def test_claim_ignores_what_a_late_step_left_under_a_forgotten_id(jobs: JobStore) -> None:
    claim(jobs, overdue_at=time.time() + 60)
    jobs.forget("j1")
    # A step of the forgotten job was still running: it records its generation under the id.
    jobs.accept("j1", "gen-of-the-old-job", target={})

    claim(jobs, overdue_at=time.time() + 60)

    record = jobs.get("j1")
    assert record is not None and record.generation_id is None
    assert_ttl_is_the_stores(jobs)


def test_take_over_and_request_cancel_renew_the_ttl(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now - 1)

    jobs.redis.expire(JobStore.key("j1"), 5)
    assert jobs.take_over("j1", now=now, overdue_at=now + 60) is not None
    assert_ttl_is_the_stores(jobs)

    jobs.redis.expire(JobStore.key("j1"), 5)
    assert jobs.request_cancel("j1") is not None
    assert_ttl_is_the_stores(jobs)


def test_take_over_marks_the_chain_started(jobs: JobStore) -> None:
    """A re-driven job has a chain: a ``lipsync.run`` message redelivered late joins it rather
    than starting a second one."""
    now = time.time()
    claim(jobs, overdue_at=now - 1)

    assert jobs.take_over("j1", now=now, overdue_at=now + 60) is not None

    assert not jobs.mark_once("j1", "chain_started")


# -- the callback ------------------------------------------------------------------------------

CALLBACK: dict[str, Any] = {"webhook_url": "https://hooks.example.com/x?token=T0K3N", "events": []}


def test_the_callback_has_one_place_in_the_record_and_is_not_shown(jobs: JobStore) -> None:
    job = {"request": {"job_id": "j1", "callback": CALLBACK}}
    jobs.claim("j1", task_id="t-1", model="gen", job=job, overdue_at=time.time() + 60)

    assert jobs.callback("j1") == CALLBACK
    record = jobs.get("j1")
    assert record is not None and record.job == {"request": {"job_id": "j1", "callback": None}}
    assert "T0K3N" not in json.dumps(record.model_dump(mode="json")), "status prints this"
    assert jobs.callback("nobody") is None


@pytest.mark.parametrize("how", ["a message carrying it", "a re-drive"])
def test_a_record_from_before_keeps_its_callback_in_its_job_until_it_moves(jobs: JobStore, how: str) -> None:
    now = time.time()
    old_job = {"request": {"job_id": "j1", "callback": CALLBACK}}
    claim(jobs, overdue_at=now - 1)
    jobs.redis.hset(JobStore.key("j1"), "job", json.dumps(old_job))  # as written before the field
    assert jobs.callback("j1") == CALLBACK

    if how == "a message carrying it":
        jobs.update("j1", job=old_job)
    else:
        assert jobs.take_over("j1", now=now, overdue_at=now + 60) is not None
    jobs.update("j1", job={"request": {"job_id": "j1", "callback": None}})  # what travels now

    assert jobs.callback("j1") == CALLBACK


def test_end_reads_what_the_one_who_tells_the_caller_needs_in_the_same_step(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 60, task_id="caller-task")

    first = jobs.end("j1", OUTCOME, state="completed", overdue_at=now + 120, callback=CALLBACK)
    assert (first.first, first.outcome, first.task_id) == (True, OUTCOME, "caller-task")
    assert first.callback == CALLBACK, "a record without a callback takes the one given"
    assert not first.callbacks_dispatched

    jobs.mark_callbacks_dispatched("j1")
    other = {"job_id": "j1", "status": "cancelled"}
    later = jobs.end("j1", other, state="failed", overdue_at=now + 999, callback={"task": "else"})
    assert (later.first, later.outcome, later.callback) == (False, OUTCOME, CALLBACK)
    assert later.callbacks_dispatched
    assert active(jobs) == {}, "a later writer does not put it back in the active set"


def test_end_keeps_the_callback_of_a_record_from_before_the_field(jobs: JobStore) -> None:
    now = time.time()
    claim(jobs, overdue_at=now + 60)
    old_job = {"request": {"job_id": "j1", "callback": CALLBACK}}
    jobs.redis.hset(JobStore.key("j1"), "job", json.dumps(old_job))  # as written before the field

    ended = jobs.end("j1", OUTCOME, state="completed", overdue_at=now + 120, callback={"task": "else"})

    assert ended.callback == CALLBACK
    assert jobs.callback("j1") == CALLBACK
