"""tasks.base.redis_blinks_retried: a Redis error in the block re-runs the task; nothing else does."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis

from tasks.base import REDIS_BLINK, redis_blinks_retried


class Retried(Exception):
    """What the stub's ``retry`` returns for the caller to raise, as Celery's ``Task.retry`` does."""

    def __init__(self, countdown: float, exc: BaseException) -> None:
        super().__init__(countdown, exc)
        self.countdown, self.exc = countdown, exc


class StubTask:
    name = "lipsync.stub"

    def __init__(self, retries: int) -> None:
        self.request = SimpleNamespace(retries=retries)

    def retry(self, *, countdown: float, exc: BaseException) -> Retried:
        return Retried(countdown, exc)


def run(task: Any, error: BaseException | None) -> None:
    with redis_blinks_retried(task):
        if error is not None:
            raise error


def test_a_redis_error_retries_the_task_on_the_blink_schedule() -> None:
    blink = redis.ConnectionError("Redis restarting")
    with pytest.raises(Retried) as raised:
        run(StubTask(retries=2), blink)
    assert raised.value.exc is blink
    assert raised.value.countdown == REDIS_BLINK.delays[2]


def test_anything_else_goes_on_up_and_a_clean_block_does_nothing() -> None:
    with pytest.raises(ValueError, match="a bad card"):
        run(StubTask(retries=0), ValueError("a bad card"))
    run(StubTask(retries=0), None)
