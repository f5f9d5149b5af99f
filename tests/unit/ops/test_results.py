"""worker.ops.results against a real throwaway Redis: a store is one round trip, keeps Celery's
rule (nothing over a SUCCESS), and stores and publishes what plain Celery reads."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, states

from tests.unit.conftest import unit_settings
from worker.app import create_app
from worker.ops.results import ResultBackend, backend_setting


@pytest.fixture
def app(redis_url: str, tmp_path: Path) -> Celery:
    return create_app(unit_settings(redis_url, "http://127.0.0.1:9", tmp_path, result_ttl=120))


@pytest.fixture
def plain(redis_url: str) -> Iterator[Celery]:
    """An app of a producer that does not import our code: Celery's own Redis backend."""
    plain = Celery("plain", broker=redis_url, backend=redis_url)
    plain.conf.result_serializer = "json"
    yield plain
    plain.close()


def commands_on(r: redis.Redis, key: str, action: Any) -> list[str]:
    """The commands Redis ran on ``key`` while ``action`` ran (its MONITOR stream)."""
    with r.monitor() as stream:  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        action()
        r.set("test:monitor-end", "1")
        seen = []
        while "test:monitor-end" not in (command := str(stream.next_command()["command"])):
            if key in command:
                seen.append(command.split()[0].upper())
    return seen


def test_the_app_uses_it_for_a_redis_url_and_celerys_own_for_others(app: Celery) -> None:
    assert isinstance(app.backend, ResultBackend)
    assert backend_setting("redis://h:6379/1") == "worker.ops.results:ResultBackend+redis://h:6379/1"
    assert backend_setting("rediss://:p+w@h/1").endswith("+rediss://:p+w@h/1")
    assert backend_setting("db+postgresql://h/db") == "db+postgresql://h/db"


def test_a_store_is_one_round_trip(app: Celery, redis_url: str) -> None:
    task_id = str(uuid.uuid4())
    backend: Any = app.backend
    key = backend.get_key_for_task(task_id).decode()
    r = redis.Redis.from_url(redis_url)
    app.backend.store_result(str(uuid.uuid4()), {}, states.SUCCESS)  # the script is loaded once, on first use
    seen = commands_on(r, key, lambda: app.backend.store_result(task_id, {"ok": 1}, states.SUCCESS))
    # Inside the script: the read, the write, the publish; the client sent one EVALSHA.
    assert seen == ["EVALSHA", "GET", "SETEX", "PUBLISH"], seen
    assert 0 < int(r.ttl(key)) <= 120


def test_nothing_is_stored_over_a_success(app: Celery, plain: Celery) -> None:
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, {"n": 1}, "POLLING")
    app.backend.store_result(task_id, {"n": 2}, states.SUCCESS)
    app.backend.store_result(task_id, {"n": 3}, "FETCHING")
    app.backend.store_result(task_id, RuntimeError("late"), states.FAILURE)
    meta = plain.backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"n": 2})


def test_a_failure_overwrites_progress_and_plain_celery_reads_it(app: Celery, plain: Celery) -> None:
    task_id = str(uuid.uuid4())
    app.backend.store_result(task_id, {"n": 1}, "POLLING")
    app.backend.store_result(task_id, RuntimeError("it broke"), states.FAILURE, traceback="tb")
    result = plain.AsyncResult(task_id)
    assert result.state == states.FAILURE
    assert isinstance(result.result, Exception) and "it broke" in str(result.result)
    assert str(result.traceback) == "tb"


def test_a_subscriber_hears_the_stored_value(app: Celery, redis_url: str) -> None:
    task_id = str(uuid.uuid4())
    backend: Any = app.backend
    key = backend.get_key_for_task(task_id)
    r = redis.Redis.from_url(redis_url)
    listener = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    listener.subscribe(key)
    try:
        app.backend.store_result(task_id, {"ok": True}, states.SUCCESS)
        deadline = time.monotonic() + 5
        message = None
        while message is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)  # None also for the subscribe confirmation
    finally:
        listener.close()
    assert message is not None
    assert message["data"] == r.get(key)
    assert json.loads(message["data"])["result"] == {"ok": True}


def test_plain_celery_waiting_on_a_result_gets_it(app: Celery, plain: Celery) -> None:
    task_id = str(uuid.uuid4())
    waiting = plain.AsyncResult(task_id)
    app.backend.store_result(task_id, {"done": 1}, states.SUCCESS)
    assert waiting.get(timeout=5) == {"done": 1}
