"""The Python helper: validate, record the job, then send; a failed send leaves nothing behind."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from gensim import GenSimulator
from tests.unit.conftest import queued, unit_settings
from worker.app import create_app
from worker.dev.embedded_redis import free_port
from worker.enqueue import enqueue, job_status, resources_of
from worker.errors import RequestInvalid
from worker.jobs.resources import Resources
from worker.names import QUEUE_JOBS, TASK_FETCH, TASK_POLL, TASK_RUN, TASK_SUBMIT, Stage

REQUEST: dict[str, Any] = {
    "job_id": "episode-42",
    "sheet_id": 101,
    "cell_id": 3000,
    "video_resource_id": 5001,
    "audio_resource_id": 6001,
    "metadata": {"episode": 42},
}


def test_enqueue_records_the_job_then_sends_it_under_the_job_id(res: Resources, queue: Any) -> None:
    result = enqueue(REQUEST, app=queue.app)

    assert result.id == "episode-42"
    record = job_status("episode-42", store=res.jobs)
    assert record is not None
    assert record.state == Stage.QUEUED
    assert record.task_id == "episode-42"
    # The sweeper knows the job from now on, even if the message were lost before any worker took it.
    assert record.overdue_at == pytest.approx(time.time() + res.settings.queued_recovery, abs=60)
    assert record.model == res.settings.default_model
    # The chain itself, not lipsync.run: the record is written, so no task has to open it.
    (message,) = queued(res, QUEUE_JOBS)
    assert message["task"] == TASK_SUBMIT
    assert message["chain"] == [TASK_POLL, TASK_FETCH]
    assert message["last_id"] == "episode-42"
    assert res.jobs.mark_once("episode-42", "chain_started") is False, "a later lipsync.run must join"
    # The validated request, as JSON (ids as GEN's strings), in the job the chain carries.
    (job,) = message["args"]
    checked = {
        **REQUEST,
        "sheet_id": "101",
        "cell_id": "3000",
        "video_resource_id": "5001",
        "audio_resource_id": "6001",
    }
    assert {name: job["request"][name] for name in checked} == checked
    assert job["request"]["callback"] is None
    assert (job["task_id"], job["drive"], job["model"]) == ("episode-42", record.drive, record.model)


def test_the_callers_link_and_link_error_go_with_the_chain(res: Resources, queue: Any) -> None:
    link, link_error = queue.app.signature("on.done"), queue.app.signature("on.error")
    enqueue(REQUEST, app=queue.app, link=link, link_error=link_error)
    (raw,) = res.redis.lrange(QUEUE_JOBS, 0, -1)
    _, _, embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
    # The first step names the errback; each later step (the chain, reversed) names it too, and
    # only the last one, running under the job id, names the callback.
    assert [e["task"] for e in embed["errbacks"]] == ["on.error"]
    fetch, poll = embed["chain"]
    assert fetch["options"]["task_id"] == "episode-42"
    assert [c["task"] for c in fetch["options"]["link"]] == ["on.done"]
    assert "link" not in poll["options"] and not embed["callbacks"]
    assert [e["task"] for e in fetch["options"]["link_error"]] == ["on.error"]
    assert [e["task"] for e in poll["options"]["link_error"]] == ["on.error"]


def test_an_invalid_request_is_refused_before_anything_is_recorded_or_sent(
    res: Resources, queue: Any
) -> None:
    with pytest.raises(RequestInvalid) as info:
        enqueue({**REQUEST, "sheet_id": None}, app=queue.app)

    assert [e["field"] for e in info.value.errors] == ["sheet_id"]
    assert job_status("episode-42", store=res.jobs) is None
    assert queued(res, QUEUE_JOBS) == []


def test_a_send_the_broker_refuses_forgets_the_job(
    redis_url: str, sim: GenSimulator, tmp_path: Path, res: Resources
) -> None:
    # Job records and results on the test's Redis; the broker on a port where nothing listens.
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    settings = unit_settings(
        dead_broker, sim.base_url, tmp_path, redis_url=redis_url, result_backend=redis_url
    )
    app = create_app(settings)
    app.conf.task_publish_retry = False
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "max_retries": 0}

    with pytest.raises(OperationalError):
        enqueue(REQUEST, app=app)

    # The caller learned the enqueue failed: the job must not run behind its back.
    assert resources_of(app).jobs.get("episode-42") is None
    assert job_status("episode-42", store=res.jobs) is None


def test_a_second_enqueue_of_a_recorded_job_keeps_the_first_record(res: Resources, queue: Any) -> None:
    enqueue(REQUEST, app=queue.app)
    first = job_status("episode-42", store=res.jobs)

    enqueue({**REQUEST, "model": "sync_so"}, app=queue.app)

    again = job_status("episode-42", store=res.jobs)
    assert first is not None and again is not None
    assert again.created_at == first.created_at
    assert again.model == first.model  # the recorded job wins; lipsync.run joins it
    assert [m["task"] for m in queued(res, QUEUE_JOBS)] == [TASK_SUBMIT, TASK_RUN]


def test_a_webhook_url_stays_in_the_record_not_in_the_message(res: Resources, queue: Any) -> None:
    hook = "https://hooks.example/lipsync?token=receiver-secret-81f2"
    enqueue({**REQUEST, "callback": {"webhook_url": hook}}, app=queue.app)
    (message,) = queued(res, QUEUE_JOBS)
    assert "receiver-secret-81f2" not in str(message)
    callback = res.jobs.callback("episode-42")
    assert callback is not None and callback["webhook_url"] == hook
