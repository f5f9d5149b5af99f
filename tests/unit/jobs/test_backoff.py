import pytest

from worker.jobs.backoff import clamp_to_deadline, poll_delay
from worker.retry import MAX_COUNTDOWN, retry_delay


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 5.0), (1, 7.5), (2, 11.25), (3, 16.875), (4, 25.3125), (5, 30.0), (50, 30.0)],
)
def test_poll_schedule_grows_geometrically_to_the_cap(attempt: int, expected: float) -> None:
    delay = poll_delay(attempt, initial=5, factor=1.5, cap=30, jitter=0.2, rand=lambda: 0.0)
    assert delay == pytest.approx(expected)


def test_poll_jitter_only_shortens() -> None:
    longest = poll_delay(10, initial=5, factor=1.5, cap=30, jitter=0.2, rand=lambda: 0.0)
    shortest = poll_delay(10, initial=5, factor=1.5, cap=30, jitter=0.2, rand=lambda: 1.0)
    assert longest == 30.0
    assert shortest == pytest.approx(24.0)


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


def test_clamp_to_deadline() -> None:
    assert clamp_to_deadline(30, now=100, deadline=110) == 10
    assert clamp_to_deadline(5, now=100, deadline=110) == 5
    assert clamp_to_deadline(5, now=120, deadline=110) == 0.05
