"""worker.ops.deferred against a real throwaway Redis: when a task's writes reach Redis, in how many
round trips, and that they never fail what they ride along with."""

from __future__ import annotations

import logging
from typing import cast

import pytest
import redis

from worker.dev.embedded_redis import EmbeddedRedis
from worker.ops import deferred


def count(key: str) -> deferred.Write:
    return lambda pipe: pipe.hincrby(key, "n", 1)


def value(r: redis.Redis, key: str) -> int:
    return int(cast(bytes, r.hget(key, "n") or b"0"))


def execs(r: redis.Redis) -> int:
    """MULTI/EXEC round trips Redis has served since the test began."""
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


def test_outside_a_task_a_write_goes_out_at_once(r: redis.Redis) -> None:
    deferred.write(r, "a", count("k"))
    assert value(r, "k") == 1
    assert execs(r) == 1


def test_in_a_task_writes_wait_for_its_end_and_go_out_in_one_round_trip(r: redis.Redis) -> None:
    deferred.collecting()
    for _ in range(3):
        deferred.write(r, "a", count("k"))
    deferred.write(r, "b", count("other"))
    assert value(r, "k") == 0
    assert execs(r) == 0
    deferred.flush()
    assert (value(r, "k"), value(r, "other")) == (3, 1)
    assert execs(r) == 1
    # After the task, at once again.
    deferred.write(r, "a", count("k"))
    assert value(r, "k") == 4


def test_pending_writes_ride_along_the_tasks_next_round_trip_to_the_same_redis(
    r: redis.Redis, server: EmbeddedRedis
) -> None:
    elsewhere = redis.Redis(port=server.port, db=1)
    deferred.collecting()
    deferred.write(r, "a", count("k"))
    deferred.write(elsewhere, "b", count("k"))
    pipe = r.pipeline(transaction=True)
    pipe.set("own", "1")
    pipe.get("own")
    assert deferred.execute_with(r, pipe) == [True, b"1"]  # only the pipeline's own replies
    assert value(r, "k") == 1
    assert execs(r) == 1
    assert value(elsewhere, "k") == 0  # another client's write is not taken along
    r.delete("k")
    deferred.flush()
    assert value(r, "k") == 0, "a write that rode along is not written again at the task's end"
    assert value(elsewhere, "k") == 1
    elsewhere.close()


def test_a_failing_ride_never_fails_the_write_it_rides_with(
    r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    r.set("string", "x")
    deferred.collecting()
    deferred.write(r, "metrics: broken", count("string"))  # WRONGTYPE
    pipe = r.pipeline(transaction=True)
    pipe.set("own", "1")
    with caplog.at_level(logging.DEBUG, logger="lipsync.deferred"):
        assert deferred.execute_with(r, pipe) == [True]
    assert r.get("own") == b"1"
    assert "metrics: broken not recorded" in caplog.text


def test_the_pipelines_own_error_still_raises(r: redis.Redis) -> None:
    r.set("string", "x")
    deferred.collecting()
    deferred.write(r, "a", count("k"))
    pipe = r.pipeline(transaction=True)
    pipe.hincrby("string", "n", 1)
    with pytest.raises(redis.ResponseError):
        deferred.execute_with(r, pipe)
    assert value(r, "k") == 1  # the ride was applied all the same: MULTI/EXEC does not roll back


def test_a_task_that_did_not_end_cleanly_leaves_nothing_behind(r: redis.Redis) -> None:
    deferred.collecting()
    deferred.write(r, "a", count("k"))
    deferred.collecting()  # the next task begins without the previous one's end
    assert value(r, "k") == 1
