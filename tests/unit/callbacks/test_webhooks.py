"""The webhook attempt policy (worker.callbacks.webhooks) on a real outbox, against a real receiver.

Each test owes one webhook in the outbox, drives :func:`webhooks.attempt` the way the
``lipsync.deliver_webhook`` task does (one call per message, the countdown it returns is the next
message), and asserts what the receiver got, what the outbox and the dead-letter list hold, and what
was counted. The retry schedule is short (:data:`DELAYS`); nothing waits for a countdown.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from gensim import GenSimulator
from tests.unit.conftest import WEBHOOK_SECRET, unit_settings
from tests.webhook_receiver import WebhookReceiver
from worker.callbacks import webhooks
from worker.callbacks.outbox import Outbox
from worker.callbacks.webhooks import WebhookFailed, WebhookRejected
from worker.dev.embedded_redis import free_port
from worker.jobs.resources import Resources
from worker.names import WEBHOOKS_PENDING_KEY
from worker.ops.metrics import CALLBACKS_KEY
from worker.retry import RetryPolicy

MSG_ID = "job-7.outcome"
PAYLOAD: dict[str, Any] = {"job_id": "job-7", "status": "completed", "video": {"url": "https://x/y.mp4"}}
DELAYS = [1.0, 2.0, 3.0]
#: unit_settings' default (Settings.recovery_grace), restated so the due times below are explicit.
GRACE = 60.0

MakeRes = Callable[..., Resources]


@pytest.fixture
def make_res(redis_url: str, sim: GenSimulator, tmp_path: Path) -> Iterator[MakeRes]:
    """Resources on the test's Redis, with :data:`DELAYS` and a short webhook timeout unless overridden."""
    made: list[Resources] = []

    def make(**overrides: Any) -> Resources:
        values: dict[str, Any] = {"webhook_retry_delays": DELAYS, "webhook_timeout": 2.0, **overrides}
        resources = Resources(unit_settings(redis_url, sim.base_url, tmp_path / "outputs", **values))
        assert resources.settings.recovery_grace == GRACE
        made.append(resources)
        return resources

    yield make
    for resources in made:
        if "http" in resources.__dict__:
            resources.http.close()
        resources.redis.close()


@pytest.fixture
def fast(make_res: MakeRes) -> Resources:
    return make_res()


class Redirector:
    """A real HTTP endpoint that answers every POST with a redirect to ``location``."""

    def __init__(self, status: int, location: str) -> None:
        self.posts = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.posts += 1
                self.send_response(status)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def owe(res: Resources, url: str, msg_id: str = MSG_ID) -> int:
    """Owe PAYLOAD to ``url``; the token the delivery message carries."""
    return res.outbox.put(msg_id, url, PAYLOAD, due_at=time.time() + 60)


def attempt(res: Resources, drive: int, msg_id: str = MSG_ID, **kwargs: Any) -> float | None:
    return webhooks.attempt(res.outbox, res.http, res.settings, msg_id, drive, **kwargs)


def callbacks_counted(r: redis.Redis) -> dict[tuple[str, ...], int]:
    raw: dict[bytes, bytes] = r.hgetall(CALLBACKS_KEY)  # type: ignore[assignment]
    return {tuple(json.loads(k)): int(v) for k, v in raw.items()}


def is_owed(res: Resources, msg_id: str = MSG_ID) -> bool:
    return bool(res.outbox.redis.exists(Outbox.key(msg_id))) and res.outbox.pending(msg_id) is not None


# -- success -----------------------------------------------------------------------------------


def test_a_2xx_delivers_one_signed_post_and_clears_the_entry(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    drive = owe(fast, receiver.url)

    assert attempt(fast, drive) is None

    assert receiver.attempts == 1
    (got,) = receiver.received
    assert got.verified, "the signature checks out with the configured secret"
    assert got.msg_id == MSG_ID and got.headers["webhook-id"] == MSG_ID
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.payload == PAYLOAD
    assert not is_owed(fast) and fast.outbox.pending_count() == 0
    assert fast.outbox.redis.zscore(WEBHOOKS_PENDING_KEY, MSG_ID) is None
    assert fast.outbox.dead_letters() == []
    assert callbacks_counted(fast.redis) == {("webhook", "delivered"): 1}
    assert attempt(fast, drive) is None and receiver.attempts == 1, "a redelivered message sends nothing"


def test_without_a_secret_no_webhook_goes_out_it_is_dead_lettered_saying_why(
    make_res: MakeRes, receiver: WebhookReceiver
) -> None:
    """A webhook owed before the secret went missing (or the failure of a request refused for
    that very reason) is not sent unsigned behind anyone's back: an operator sees it, sets the
    secret and replays it."""
    res = make_res(webhook_secret=None)
    drive = owe(res, receiver.url)

    assert attempt(res, drive) is None

    assert receiver.attempts == 0
    (dead,) = res.outbox.dead_letters()
    assert dead["msg_id"] == MSG_ID
    assert "LIPSYNC_WEBHOOK_SECRET" in dead["error"] and "LIPSYNC_ALLOW_UNSIGNED_WEBHOOKS" in dead["error"]
    assert not is_owed(res)
    assert callbacks_counted(res.redis) == {("webhook", "dead_lettered"): 1}


def test_unsigned_webhooks_go_out_only_when_allowed_explicitly(
    make_res: MakeRes, receiver: WebhookReceiver
) -> None:
    res = make_res(webhook_secret=None, allow_unsigned_webhooks=True)
    drive = owe(res, receiver.url)

    # This receiver insists on a signature (401), which makes the attempt a failed one.
    assert attempt(res, drive) == DELAYS[0]

    (got,) = receiver.received
    assert not got.verified and "webhook-signature" not in got.headers
    assert got.headers["webhook-id"] == MSG_ID
    assert is_owed(res)


# -- failures and the schedule -----------------------------------------------------------------


def test_a_500_is_retried_after_the_first_delay_with_the_same_webhook_id(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    receiver.fail_next, receiver.fail_status = 1, 500
    drive = owe(fast, receiver.url)

    before = time.time()
    countdown = attempt(fast, drive)
    after = time.time()

    assert countdown == DELAYS[0]
    assert receiver.attempts == 1 and receiver.received == []
    pending = fast.outbox.pending(MSG_ID)
    assert pending is not None and pending["attempts"] == 1
    assert before + DELAYS[0] + GRACE <= pending["due_at"] <= after + DELAYS[0] + GRACE
    assert fast.outbox.redis.zscore(WEBHOOKS_PENDING_KEY, MSG_ID) == pending["due_at"]
    assert fast.outbox.dead_letters() == []
    assert callbacks_counted(fast.redis) == {("webhook", "failed_attempt"): 1}

    # The retry (the same message, after its countdown) carries the same id.
    assert attempt(fast, drive) is None
    assert receiver.ids() == [MSG_ID] and receiver.received[0].verified
    assert receiver.attempts == 2
    assert not is_owed(fast)
    assert callbacks_counted(fast.redis) == {
        ("webhook", "failed_attempt"): 1,
        ("webhook", "delivered"): 1,
    }


def test_the_schedule_is_followed_then_the_next_failure_dead_letters(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    receiver.fail_next, receiver.fail_status = 100, 503
    drive = owe(fast, receiver.url)

    countdowns = [attempt(fast, drive) for _ in range(len(DELAYS) + 1)]

    assert countdowns == [*DELAYS, None]
    assert receiver.attempts == len(DELAYS) + 1
    (dead,) = fast.outbox.dead_letters()
    assert dead["msg_id"] == MSG_ID and dead["url"] == receiver.url and dead["payload"] == PAYLOAD
    assert dead["attempts"] == len(DELAYS) + 1
    assert "503" in dead["error"]
    assert not is_owed(fast) and fast.outbox.pending_count() == 0
    assert callbacks_counted(fast.redis) == {
        ("webhook", "failed_attempt"): len(DELAYS) + 1,
        ("webhook", "dead_lettered"): 1,
    }
    assert attempt(fast, drive) is None and receiver.attempts == len(DELAYS) + 1, "nothing after that"


def test_410_gone_dead_letters_at_once(fast: Resources, receiver: WebhookReceiver) -> None:
    receiver.fail_next, receiver.fail_status = 1, 410
    drive = owe(fast, receiver.url)

    assert attempt(fast, drive) is None

    assert receiver.attempts == 1
    (dead,) = fast.outbox.dead_letters()
    assert (dead["msg_id"], dead["attempts"]) == (MSG_ID, 1)
    assert "410" in dead["error"]
    assert not is_owed(fast)
    assert callbacks_counted(fast.redis) == {("webhook", "dead_lettered"): 1}


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_is_a_failed_attempt_and_is_not_followed(
    fast: Resources, receiver: WebhookReceiver, status: int
) -> None:
    redirector = Redirector(status, receiver.url)
    try:
        drive = owe(fast, redirector.url)
        assert attempt(fast, drive) == DELAYS[0]
        assert redirector.posts == 1
    finally:
        redirector.close()
    assert receiver.attempts == 0, "the redirect's target got nothing"
    pending = fast.outbox.pending(MSG_ID)
    assert pending is not None and pending["attempts"] == 1
    assert fast.outbox.dead_letters() == []


def test_a_refused_connection_is_a_failed_attempt(fast: Resources) -> None:
    drive = owe(fast, f"http://127.0.0.1:{free_port()}/hooks")

    assert attempt(fast, drive) == DELAYS[0]

    assert is_owed(fast)
    assert callbacks_counted(fast.redis) == {("webhook", "failed_attempt"): 1}


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt(
    make_res: MakeRes, receiver: WebhookReceiver
) -> None:
    res = make_res(webhook_timeout=0.2)
    receiver.hold_next, receiver.hold_seconds = 1, 0.6
    drive = owe(res, receiver.url)

    started = time.monotonic()
    assert attempt(res, drive) == DELAYS[0]
    assert time.monotonic() - started < 0.55, "the attempt did not wait for the receiver"
    assert is_owed(res)
    # The receiver still takes the abandoned POST: delivery is at-least-once, hence webhook-id.
    deadline = time.monotonic() + 2
    while not receiver.received and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.ids() == [MSG_ID]


@pytest.mark.parametrize(
    ("allow_private", "url"),
    [(False, "RECEIVER"), (True, "ftp://127.0.0.1/hooks"), (True, "http://user:pw@127.0.0.1/hooks")],
)
def test_an_unsafe_url_is_dead_lettered_without_any_post(
    make_res: MakeRes, receiver: WebhookReceiver, allow_private: bool, url: str
) -> None:
    res = make_res(allow_private_urls=allow_private)
    url = receiver.url if url == "RECEIVER" else url
    drive = owe(res, url)

    assert attempt(res, drive) is None

    assert receiver.attempts == 0
    (dead,) = res.outbox.dead_letters()
    assert (dead["msg_id"], dead["url"], dead["attempts"]) == (MSG_ID, url, 1)
    assert dead["error"]
    assert not is_owed(res)
    assert callbacks_counted(res.redis) == {("webhook", "dead_lettered"): 1}


# -- tokens: stale messages and taken-over attempts --------------------------------------------


@pytest.mark.parametrize("newer", ["take_over", "put_again"])
def test_a_stale_message_does_nothing(fast: Resources, receiver: WebhookReceiver, newer: str) -> None:
    old = owe(fast, receiver.url)
    if newer == "take_over":  # the sweeper re-sent it
        new = fast.outbox.take_over(MSG_ID, now=time.time() + 61, due_at=time.time() + 120)
    else:  # owed again (a re-dispatch, a dead-letter replay)
        new = owe(fast, receiver.url)
    assert new > old

    assert attempt(fast, old) is None

    assert receiver.attempts == 0
    pending = fast.outbox.pending(MSG_ID)
    assert pending is not None and pending["attempts"] == 0, "the stale copy did not count an attempt"
    assert fast.outbox.dead_letters() == [] and callbacks_counted(fast.redis) == {}

    assert attempt(fast, new) is None
    assert receiver.ids() == [MSG_ID]


def test_a_failed_attempt_taken_over_meanwhile_leaves_the_retry_to_the_newer_message(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    receiver.fail_next, receiver.fail_status = 1, 503
    drive = owe(fast, receiver.url)
    newer: list[int] = []

    def post_while_the_sweeper_takes_over(*args: Any, **kwargs: Any) -> int:
        newer.append(fast.outbox.take_over(MSG_ID, now=time.time() + 10_000, due_at=time.time() + 60))
        return webhooks.post_webhook(*args, **kwargs)

    assert attempt(fast, drive, post=post_while_the_sweeper_takes_over) is None, "no countdown for this copy"

    assert receiver.attempts == 1 and newer[0] > drive
    pending = fast.outbox.pending(MSG_ID)
    assert pending is not None and pending["attempts"] == 1
    assert attempt(fast, newer[0]) is None
    assert receiver.ids() == [MSG_ID]


def test_a_final_failure_taken_over_meanwhile_does_not_dead_letter(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    receiver.fail_next, receiver.fail_status = 1, 410
    drive = owe(fast, receiver.url)
    newer: list[int] = []

    def post_while_the_sweeper_takes_over(*args: Any, **kwargs: Any) -> int:
        newer.append(fast.outbox.take_over(MSG_ID, now=time.time() + 10_000, due_at=time.time() + 60))
        return webhooks.post_webhook(*args, **kwargs)

    assert attempt(fast, drive, post=post_while_the_sweeper_takes_over) is None

    assert fast.outbox.dead_letters() == []
    assert is_owed(fast), "the newer message still owns the webhook"
    assert callbacks_counted(fast.redis) == {}
    # The newer message makes its own attempt (the receiver takes it this time).
    assert attempt(fast, newer[0]) is None
    assert receiver.attempts == 2 and receiver.ids() == [MSG_ID]
    assert fast.outbox.dead_letters() == [] and not is_owed(fast)


# -- attempts whose workers died -------------------------------------------------------------


def test_attempts_whose_workers_died_count_up_to_the_limit(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    drive = owe(fast, receiver.url)
    for _ in range(len(DELAYS)):  # claimed, then the worker died before reporting anything
        assert fast.outbox.claim(MSG_ID, drive, due_at=time.time() + 30) is not None

    assert attempt(fast, drive) is None, "attempt limit+1 is still made"

    assert receiver.ids() == [MSG_ID]
    assert fast.outbox.dead_letters() == [] and not is_owed(fast)


def test_attempts_whose_workers_died_count_beyond_the_limit_dead_letters_without_a_post(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    drive = owe(fast, receiver.url)
    for _ in range(len(DELAYS) + 1):
        assert fast.outbox.claim(MSG_ID, drive, due_at=time.time() + 30) is not None

    assert attempt(fast, drive) is None

    assert receiver.attempts == 0
    (dead,) = fast.outbox.dead_letters()
    assert (dead["msg_id"], dead["attempts"]) == (MSG_ID, len(DELAYS) + 2)
    assert f"{len(DELAYS) + 1} attempts" in dead["error"]
    assert not is_owed(fast)
    assert callbacks_counted(fast.redis) == {("webhook", "dead_lettered"): 1}


def test_an_attempt_pushes_the_due_time_past_its_hard_time_limit(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    drive = owe(fast, receiver.url)
    _, hard_limit = webhooks.attempt_time_limits(fast.settings.webhook_timeout)
    during: list[dict[str, Any] | None] = []

    def post_and_look(*args: Any, **kwargs: Any) -> int:
        during.append(fast.outbox.pending(MSG_ID))
        return webhooks.post_webhook(*args, **kwargs)

    before = time.time()
    assert attempt(fast, drive, post=post_and_look) is None
    after = time.time()

    (seen,) = during
    assert seen is not None and seen["attempts"] == 1
    assert before + hard_limit + GRACE <= seen["due_at"] <= after + hard_limit + GRACE
    assert receiver.ids() == [MSG_ID]


# -- the post= hook ----------------------------------------------------------------------------


def test_a_poster_raising_webhook_failed_is_a_failed_attempt(
    fast: Resources, receiver: WebhookReceiver
) -> None:
    drive = owe(fast, receiver.url)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def out_of_time(*args: Any, **kwargs: Any) -> int:
        calls.append((args, kwargs))
        raise WebhookFailed(f"webhook {kwargs['msg_id']}: no answer in time")

    assert attempt(fast, drive, post=out_of_time) == DELAYS[0]

    (args, kwargs) = calls[0]
    assert args == (fast.http, receiver.url, PAYLOAD)
    assert kwargs == {
        "msg_id": MSG_ID,
        "secret": WEBHOOK_SECRET,
        "timeout": fast.settings.webhook_timeout,
        "allow_private": True,
    }
    assert receiver.attempts == 0
    pending = fast.outbox.pending(MSG_ID)
    assert pending is not None and pending["attempts"] == 1
    assert callbacks_counted(fast.redis) == {("webhook", "failed_attempt"): 1}


def test_a_poster_raising_webhook_rejected_dead_letters(fast: Resources, receiver: WebhookReceiver) -> None:
    drive = owe(fast, receiver.url)

    def gone(*args: Any, **kwargs: Any) -> int:
        raise WebhookRejected("gone")

    assert attempt(fast, drive, post=gone) is None
    (dead,) = fast.outbox.dead_letters()
    assert (dead["error"], dead["attempts"]) == ("gone", 1)


# -- policy from the settings ------------------------------------------------------------------


def test_retry_policy_follows_the_settings(make_res: MakeRes) -> None:
    assert webhooks.retry_policy(make_res().settings) == RetryPolicy(limit=3, delays=(1.0, 2.0, 3.0))
    other = make_res(webhook_retry_delays=[5, 30]).settings
    assert webhooks.retry_policy(other) == RetryPolicy(limit=2, delays=(5.0, 30.0))


def test_attempt_time_limits_bound_the_whole_request() -> None:
    soft, hard = webhooks.attempt_time_limits(15.0)
    assert 15.0 < soft < hard


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"webhook_retry_delays": [1.0, 2.0, 3.0]},
        {"webhook_retry_delays": [10.0, 7000.0], "visibility_timeout": 7200, "queued_recovery": 60.0},
        {"webhook_timeout": 3000.0, "queued_recovery": 30.0, "webhook_retry_delays": [1.0]},
        {"result_ttl": 60, "sweep_interval": 120.0},
    ],
)
def test_outbox_ttl_outlives_the_result_ttl_plus_the_longest_gap(
    make_res: MakeRes, overrides: dict[str, Any]
) -> None:
    res = make_res(**overrides)
    s = res.settings
    ttl = webhooks.outbox_ttl(s)
    _, hard_limit = webhooks.attempt_time_limits(s.webhook_timeout)
    for gap in (
        s.queued_recovery,
        max(s.webhook_retry_delays) + s.recovery_grace,
        hard_limit + s.recovery_grace,
    ):
        assert ttl >= s.result_ttl + gap + s.sweep_interval - 1  # int() may drop a fraction
    assert res.outbox.ttl == ttl
    owe(res, "https://hooks.example.com/x")
    assert ttl - 1 <= res.outbox.redis.ttl(Outbox.key(MSG_ID)) <= ttl


# -- DNS failures are transient ----------------------------------------------------------------


def test_a_host_that_does_not_resolve_is_retried_on_the_schedule_not_dead_lettered(
    make_res: MakeRes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DNS blip (EAI_AGAIN) on the receiver's name is a failed attempt like a refused connection:
    only an address in a private range is final."""
    real_getaddrinfo = socket.getaddrinfo

    def blip(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.blip.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", blip)
    res = make_res(allow_private_urls=False)
    drive = owe(res, "https://hooks.blip.example/lipsync")

    countdowns = [attempt(res, drive) for _ in range(len(DELAYS) + 1)]

    assert countdowns == [*DELAYS, None], "retried on the schedule, then dead-lettered"
    (dead,) = res.outbox.dead_letters()
    assert dead["attempts"] == len(DELAYS) + 1
    assert "hooks.blip.example" in dead["error"]
    assert callbacks_counted(res.redis) == {
        ("webhook", "failed_attempt"): len(DELAYS) + 1,
        ("webhook", "dead_lettered"): 1,
    }
