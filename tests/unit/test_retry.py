"""The one retry decision (worker.retry.decide), and the backoff it computes."""

from __future__ import annotations

import pytest
import redis

from worker.callbacks.webhooks import WebhookFailed, WebhookRejected
from worker.errors import ConfigurationError, LipsyncJobFailed, RequestInvalid
from worker.gen.errors import (
    GenAuthError,
    GenBadResponse,
    GenNotFound,
    GenRateLimited,
    GenRejected,
    GenServerError,
    GenTimeout,
    GenTransportError,
)
from worker.jobs.errors import GenerationFailed, JobTimeout
from worker.output.errors import OutputDownloadError, OutputInvalid, StorageError, UnsafeURL
from worker.retry import MAX_COUNTDOWN, GiveUp, Retry, RetryPolicy, decide, is_retryable, retry_delay

BACKOFF = RetryPolicy(limit=3, cap=60)


@pytest.mark.parametrize(
    "exc",
    [
        GenTransportError("reset"),
        GenTimeout("slow"),
        GenRateLimited("429", status_code=429),
        GenServerError("503", status_code=503),
        GenBadResponse("not json"),
        OutputDownloadError("broke off"),
        StorageError("s3 down"),
        WebhookFailed("500"),
        redis.ConnectionError("our own Redis blinked"),
    ],
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert is_retryable(exc)
    assert isinstance(decide(exc, retries=0, policy=BACKOFF), Retry)


@pytest.mark.parametrize(
    "exc",
    [
        GenAuthError("401", status_code=401),
        GenNotFound("404", status_code=404),
        GenRejected("422", status_code=422),
        OutputInvalid("not a video"),
        UnsafeURL("private address"),
        WebhookRejected("410"),
        GenerationFailed("no face"),
        JobTimeout("deadline"),
        RequestInvalid([{"field": "sheet_id", "message": "missing"}]),
        ConfigurationError("no key"),
        LipsyncJobFailed({"job_id": "j"}),
        KeyError("a bug"),
        ValueError("a bug"),
    ],
)
def test_final_failures_and_bugs_are_not_retried(exc: BaseException) -> None:
    assert not is_retryable(exc)
    assert decide(exc, retries=0, policy=BACKOFF) == GiveUp(exhausted=False)


def test_a_policy_limit_is_the_number_of_retries() -> None:
    exc = GenServerError("503", status_code=503)
    assert all(isinstance(decide(exc, retries=n, policy=BACKOFF), Retry) for n in range(3))
    assert decide(exc, retries=3, policy=BACKOFF) == GiveUp(exhausted=True)


def test_no_limit_means_retry_for_as_long_as_it_takes() -> None:
    verdict = decide(GenServerError("503"), retries=10_000, policy=RetryPolicy(limit=None, cap=30))
    assert isinstance(verdict, Retry)
    assert verdict.delay <= 30


def test_backoff_honours_retry_after_beyond_the_cap() -> None:
    exc = GenRateLimited("429", status_code=429, retry_after=120.0)
    assert decide(exc, retries=0, policy=BACKOFF, rand=lambda: 0.0) == Retry(120.0)


def test_a_schedule_replaces_the_backoff_and_its_last_delay_repeats() -> None:
    policy = RetryPolicy(limit=None, delays=(5.0, 30.0))
    delays = [decide(WebhookFailed("x"), retries=n, policy=policy) for n in range(4)]
    assert delays == [Retry(5.0), Retry(30.0), Retry(30.0), Retry(30.0)]


def test_no_delay_exceeds_the_countdown_cap() -> None:
    scheduled = decide(WebhookFailed("x"), retries=0, policy=RetryPolicy(limit=1, delays=(10_000.0,)))
    asked = decide(GenRateLimited("429", retry_after=10_000.0), retries=0, policy=BACKOFF)
    assert scheduled == asked == Retry(MAX_COUNTDOWN)


@pytest.mark.parametrize(
    ("attempt", "rand", "retry_after", "expected"),
    [
        (0, 1.0, None, 1.0),
        (3, 1.0, None, 8.0),
        (3, 0.5, None, 4.0),
        (10, 1.0, None, 60.0),  # capped
        (0, 0.0, 20.0, 20.0),  # Retry-After wins over a shorter backoff
        (10, 1.0, 5.0, 60.0),  # ... but does not shorten a longer one
        (0, 0.0, 120.0, 120.0),  # Retry-After may exceed our own cap
        (0, 0.0, 10_000.0, MAX_COUNTDOWN),  # never beyond the visibility-timeout-safe cap
    ],
)
def test_retry_delay(attempt: int, rand: float, retry_after: float | None, expected: float) -> None:
    delay = retry_delay(attempt, retry_after=retry_after, cap=60, rand=lambda: rand)
    assert delay == pytest.approx(expected)
