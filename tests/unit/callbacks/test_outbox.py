"""The webhook outbox against a real Redis: tokens, attempts, due times, take-over, dead letters."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from worker.callbacks.outbox import EXPIRED, Outbox
from worker.dev.embedded_redis import EmbeddedRedis
from worker.names import WEBHOOKS_PENDING_KEY

PAYLOAD = {"job_id": "j1", "status": "completed"}
URL = "https://hooks.example.com/lipsync?token=abc"


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as s:
        yield s


@pytest.fixture
def outbox(server: EmbeddedRedis) -> Iterator[Outbox]:
    client = redis.Redis(port=server.port, db=0)
    client.flushall()
    yield Outbox(client, ttl=600)
    client.close()


def test_a_put_webhook_is_pending_until_delivered(outbox: Outbox) -> None:
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    assert outbox.pending_count() == 1
    attempt = outbox.claim("j1.outcome", drive, due_at=time.time() + 30)
    assert attempt is not None
    assert (attempt.url, attempt.payload, attempt.number) == (URL, PAYLOAD, 1)
    outbox.delivered("j1.outcome")
    assert outbox.pending_count() == 0
    assert outbox.claim("j1.outcome", drive, due_at=time.time() + 30) is None
    assert not outbox.redis.exists(Outbox.key("j1.outcome"))


def test_attempts_are_counted_across_messages(outbox: Outbox) -> None:
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    numbers = []
    for _ in range(3):
        attempt = outbox.claim("j1.outcome", drive, due_at=time.time() + 30)
        assert attempt is not None
        numbers.append(attempt.number)
    assert numbers == [1, 2, 3]


def test_a_second_put_makes_the_first_message_stale_and_starts_over(outbox: Outbox) -> None:
    first = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    assert outbox.claim("j1.outcome", first, due_at=time.time() + 30) is not None
    second = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    assert second > first
    assert outbox.claim("j1.outcome", first, due_at=time.time() + 30) is None
    attempt = outbox.claim("j1.outcome", second, due_at=time.time() + 30)
    assert attempt is not None and attempt.number == 1


def test_the_due_time_follows_claims_and_reschedules(outbox: Outbox) -> None:
    now = time.time()
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=now + 60)
    assert outbox.overdue(now + 61) == ["j1.outcome"]
    outbox.claim("j1.outcome", drive, due_at=now + 10)
    assert outbox.overdue(now + 11) == ["j1.outcome"]
    assert outbox.overdue(now + 9) == []
    assert outbox.reschedule("j1.outcome", drive, due_at=now + 100)
    assert outbox.overdue(now + 99) == []
    assert not outbox.reschedule("j1.outcome", drive + 1, due_at=now + 5), "a stale token moves nothing"
    assert outbox.redis.zscore(WEBHOOKS_PENDING_KEY, "j1.outcome") == pytest.approx(now + 100)


def test_take_over_only_when_overdue_and_only_once(outbox: Outbox) -> None:
    now = time.time()
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=now + 10)
    assert outbox.take_over("j1.outcome", now=now, due_at=now + 60) == 0, "not due yet"
    new = outbox.take_over("j1.outcome", now=now + 11, due_at=now + 60)
    assert new > drive
    assert outbox.take_over("j1.outcome", now=now + 11, due_at=now + 60) == 0, "a second sweeper"
    assert outbox.claim("j1.outcome", drive, due_at=now + 30) is None, "the lost message is stale"
    attempt = outbox.claim("j1.outcome", new, due_at=now + 30)
    assert attempt is not None and attempt.number == 1


def test_take_over_of_an_expired_entry_forgets_it(outbox: Outbox) -> None:
    outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time())
    outbox.redis.delete(Outbox.key("j1.outcome"))  # as if its TTL ran out
    assert outbox.take_over("j1.outcome", now=time.time() + 1, due_at=time.time() + 60) == EXPIRED
    assert outbox.pending_count() == 0


def test_give_up_moves_the_webhook_to_the_dead_letters(outbox: Outbox) -> None:
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    attempt = outbox.claim("j1.outcome", drive, due_at=time.time() + 30)
    assert attempt is not None
    assert outbox.give_up(attempt, error="receiver answered 410 Gone")
    assert outbox.pending_count() == 0
    (entry,) = outbox.dead_letters()
    assert entry == {
        "msg_id": "j1.outcome",
        "url": URL,
        "payload": PAYLOAD,
        "error": "receiver answered 410 Gone",
        "attempts": 1,
    }
    assert outbox.remove_dead_letter(entry)
    assert outbox.dead_letters() == []


def test_tokens_are_never_reused_even_for_a_webhook_owed_again(outbox: Outbox) -> None:
    # Delivered (or dead-lettered), then owed again (a replay): a message from the first life
    # (say, handed back by Redis after the visibility timeout) must stay stale.
    first = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    outbox.delivered("j1.outcome")
    again = outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    assert again != first
    assert outbox.claim("j1.outcome", first, due_at=time.time() + 30) is None


def test_a_taken_over_attempt_cannot_dead_letter_the_webhook(outbox: Outbox) -> None:
    now = time.time()
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=now)
    old = outbox.claim("j1.outcome", drive, due_at=now)
    assert old is not None
    new = outbox.take_over("j1.outcome", now=now + 1, due_at=now + 60)
    assert new > drive
    assert not outbox.give_up(old, error="slow receiver")
    assert outbox.dead_letters() == [] and outbox.pending_count() == 1
    current = outbox.claim("j1.outcome", new, due_at=now + 30)
    assert current is not None and outbox.give_up(current, error="slow receiver")
    assert len(outbox.dead_letters()) == 1 and outbox.pending_count() == 0


def test_pending_shows_attempts_and_due_time_but_not_the_url(outbox: Outbox) -> None:
    now = time.time()
    drive = outbox.put("j1.outcome", URL, PAYLOAD, due_at=now + 60)
    outbox.claim("j1.outcome", drive, due_at=now + 30)
    assert outbox.pending("j1.outcome") == {"msg_id": "j1.outcome", "attempts": 1, "due_at": now + 30}
    outbox.delivered("j1.outcome")
    assert outbox.pending("j1.outcome") is None


def test_entries_expire(outbox: Outbox) -> None:
    outbox.put("j1.outcome", URL, PAYLOAD, due_at=time.time() + 60)
    assert 0 < outbox.redis.ttl(Outbox.key("j1.outcome")) <= 600


def test_decoding_clients_work_too(server: EmbeddedRedis) -> None:
    client = redis.Redis(port=server.port, db=1, decode_responses=True)
    client.flushdb()
    box = Outbox(client, ttl=600)
    drive = box.put("j1.outcome", URL, PAYLOAD, due_at=time.time())
    assert box.overdue(time.time() + 1) == ["j1.outcome"]
    attempt = box.claim("j1.outcome", drive, due_at=time.time() + 30)
    assert attempt is not None and attempt.payload == PAYLOAD
    client.close()
