import itertools

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


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("phase", [0.0, 0.3, 0.99])
def test_a_staggered_schedule_is_the_same_schedule_shifted_along_itself(factor: float, phase: float) -> None:
    # After the poll at once, a job with phase u polls at T(1 + u), T(2 + u), ..., where
    # T(x) = initial * (1 + factor + ... + factor**(x - 1)), continued smoothly between whole x.
    def t(x: float) -> float:
        return 5.0 * x if factor == 1.0 else 5.0 * (factor**x - 1) / (factor - 1)

    at = 0.0
    for attempt in range(4):
        at += poll_delay(attempt, initial=5, factor=factor, cap=1e9, jitter=0.0, phase=phase)
        assert at == pytest.approx(t(attempt + 1 + phase))


def test_staggered_jobs_poll_at_every_moment_of_a_step() -> None:
    # Twenty jobs, phases spread over 0-1: the third polls after the submit cover the step from
    # T(3) = 23.75 s to T(4) = 40.6 s evenly, where unstaggered they all came at 23.75 s.
    thirds = []
    for i in range(20):
        at = sum(poll_delay(a, initial=5, factor=1.5, cap=30, jitter=0.0, phase=i / 20) for a in range(3))
        thirds.append(at)
    gaps = [b - a for a, b in itertools.pairwise(thirds)]
    assert thirds[0] == pytest.approx(23.75) and 38.0 < thirds[-1] < 40.625
    assert max(gaps) < 1.5
