"""The event receiver (worker.events.receiver) served over real HTTP on loopback, in this process, on
the fast tier's Redis and CeleryQueue: what each kind of POST gets back, what it counts, what it
polls, and what it logs (never the token)."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.unit.conftest import ResFactory, queued
from tests.unit.events.test_nudge import generation_of, waiting
from worker.celery_queue import CeleryQueue
from worker.dev.embedded_redis import free_port
from worker.events.receiver import DRAIN_LIMIT, EventReceiver, EventServer
from worker.jobs.resources import Resources
from worker.names import QUEUE_JOBS, TASK_POLL
from worker.ops.metrics import GEN_EVENTS_KEY

TOKEN = "unit-events-TOKEN-8c2f41d0"
MAX_BODY = 4096


@pytest.fixture
def server(res: Resources, queue: CeleryQueue) -> Iterator[EventServer]:
    receiver = EventReceiver(queue, res, token=TOKEN, max_body=MAX_BODY)
    running = EventServer(receiver, "127.0.0.1", 0).start()
    yield running
    running.stop()


def url(server: EventServer, token: str = TOKEN) -> str:
    return f"http://127.0.0.1:{server.port}/gen-events/{token}"


def post(server: EventServer, document: Any, token: str = TOKEN) -> requests.Response:
    return requests.post(url(server, token), json=document, timeout=10)


def counted(res: Resources) -> dict[str, int]:
    raw = res.redis.hgetall(GEN_EVENTS_KEY)
    return {json.loads(key)[0]: int(value) for key, value in raw.items()}


def polls_sent(res: Resources) -> list[dict[str, Any]]:
    return [m for m in queued(res, QUEUE_JOBS) if m["task"] == TASK_POLL]


def test_an_event_about_a_waiting_job_polls_it_now(server: EventServer, res: Resources) -> None:
    waiting(res)
    event = {
        "event": "generation.completed",
        "generation": {"id": int(generation_of(res)), "status": "completed"},
    }

    answer = post(server, event)

    assert answer.status_code == 200
    assert answer.json() == {"outcome": "matched", "polled_now": 1}
    [poll] = polls_sent(res)
    assert poll["args"][0]["request"]["job_id"] == "j1" and poll["args"][0]["drive"] == 2
    assert counted(res) == {"matched": 1}


def test_an_event_about_nothing_of_ours_is_acknowledged(server: EventServer, res: Resources) -> None:
    waiting(res)
    answer = post(server, {"event": "generation.completed", "generation_id": 123456, "cell_id": 3099})
    assert (answer.status_code, answer.json()) == (200, {"outcome": "unmatched", "polled_now": 0})
    assert polls_sent(res) == [] and counted(res) == {"unmatched": 1}


@pytest.mark.parametrize(
    ("token", "method", "status"),
    [
        ("wrong-token-0000000000", "POST", 404),
        ("", "POST", 404),
        (TOKEN + "x", "POST", 404),
        ("wrong-token-0000000000", "GET", 404),
        (TOKEN, "GET", 405),
        (TOKEN, "PUT", 405),
    ],
)
def test_wrong_tokens_and_methods_are_refused(
    server: EventServer, res: Resources, token: str, method: str, status: int
) -> None:
    waiting(res)
    document = {"generation_id": int(generation_of(res))}
    answer = requests.request(method, url(server, token), json=document, timeout=10)
    assert answer.status_code == status
    assert TOKEN not in answer.text
    assert polls_sent(res) == [] and counted(res) == {"refused": 1}


def test_an_oversized_body_is_refused_and_the_sender_told(server: EventServer, res: Resources) -> None:
    waiting(res)
    padding = "x" * (MAX_BODY + 1)
    answer = post(server, {"generation_id": int(generation_of(res)), "padding": padding})
    assert answer.status_code == 413
    assert polls_sent(res) == [] and counted(res) == {"refused": 1}
    assert MAX_BODY < DRAIN_LIMIT


def test_a_body_without_a_length_is_refused(server: EventServer, res: Resources) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", f"/gen-events/{TOKEN}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"2\r\n{}\r\n0\r\n\r\n")
    assert connection.getresponse().status == 411
    connection.close()
    assert counted(res) == {"refused": 1}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json at all", 400),
        (b"", 400),
        (b'{"cut": ', 400),
        (b"[" * 4000, 400),
        (b'{"event": "ping"}', 200),
    ],
)
def test_unreadable_events_are_counted_and_logged_by_shape_only(
    server: EventServer, res: Resources, caplog: pytest.LogCaptureFixture, body: bytes, status: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="lipsync.events")
    answer = requests.post(url(server), data=body, headers={"Content-Type": "text/plain"}, timeout=10)
    assert (answer.status_code, answer.json()) == (status, {"outcome": "unreadable"})
    assert counted(res) == {"unreadable": 1}
    [line] = [r for r in caplog.records if "not understood" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert body.decode() not in line.getMessage() or not body.strip(b"[")


def test_the_same_unreadable_shape_warns_once(
    server: EventServer, res: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lipsync.events")
    for n in range(3):
        assert post(server, {"event": "ping", "n": n}).status_code == 200
    levels = [r.levelno for r in caplog.records if "not understood" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "{event: str, n: int}" in caplog.records[0].getMessage()
    assert counted(res) == {"unreadable": 3}


def test_the_token_never_reaches_the_log(
    server: EventServer, res: Resources, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lipsync")
    waiting(res)
    post(server, {"generation_id": int(generation_of(res))})
    post(server, {"junk": True})
    requests.post(url(server), data=b"junk", timeout=10)
    requests.get(url(server), timeout=10)
    # A request line the server refuses outright (it logs the line it could not parse).
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", f"/gen-events/{TOKEN}?x={'y' * 70_000}")
    connection.endheaders()
    assert connection.getresponse().status in (400, 414)
    connection.close()
    # What the receiver logged (this process's HTTP client logs the URL it called: not the receiver).
    served = [r.getMessage() for r in caplog.records if r.name.startswith("lipsync")]
    assert any("events http" in line for line in served), "the test must see the receiver's access log"
    assert all(TOKEN not in line for line in served)


def test_a_healthcheck_needs_no_token(server: EventServer, res: Resources) -> None:
    answer = requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
    assert (answer.status_code, answer.text) == (200, "ok")
    assert counted(res) == {}


def test_redis_failing_is_a_503_not_a_crash(make_res: ResFactory, queue: CeleryQueue) -> None:
    dead = make_res(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    running = EventServer(EventReceiver(queue, dead, token=TOKEN, max_body=MAX_BODY), "127.0.0.1", 0).start()
    try:
        assert post(running, {"generation_id": 9001}).status_code == 503
        # Still serving.
        assert requests.get(f"http://127.0.0.1:{running.port}/healthz", timeout=10).status_code == 200
    finally:
        running.stop()
