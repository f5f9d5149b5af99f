import pytest

from worker.jobs.backoff import clamp_to_deadline, poll_delay


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


def test_clamp_to_deadline() -> None:
    assert clamp_to_deadline(30, now=100, deadline=110) == 10
    assert clamp_to_deadline(5, now=100, deadline=110) == 5
    assert clamp_to_deadline(5, now=120, deadline=110) == 0.05
