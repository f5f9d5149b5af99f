"""Delay arithmetic for polls and retries, kept pure so it is unit-tested on its own.

Every delay here becomes a Celery ``countdown``. Redis redelivers any message not acknowledged
within the visibility timeout, and a countdown message stays unacknowledged until it runs, so every
delay is capped at :data:`MAX_COUNTDOWN`, far below the visibility timeout (kombu#337).
"""

from __future__ import annotations

import random
from collections.abc import Callable

#: No countdown is ever longer than this (seconds), whatever GEN's Retry-After says.
MAX_COUNTDOWN = 900.0


def poll_delay(
    attempt: int,
    *,
    initial: float,
    factor: float,
    cap: float,
    jitter: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before poll number ``attempt + 1``: capped geometric growth, minus up to ``jitter``.

    A fresh generation is checked soon; a slow one less and less often, never less often than
    every ``cap`` seconds. The jitter only shortens delays, so the cap stays a true upper bound.
    """
    base = min(cap, initial * factor ** max(attempt, 0))
    return min(MAX_COUNTDOWN, base * (1.0 - jitter * rand()))


def retry_delay(
    attempt: int,
    *,
    retry_after: float | None,
    cap: float,
    base: float = 1.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retrying a transient error: "full jitter" exponential backoff, or Retry-After.

    When GEN sends ``Retry-After`` we wait at least that long (it may exceed ``cap``, which bounds
    only our own backoff), up to :data:`MAX_COUNTDOWN`.
    """
    ceiling = min(cap, base * 2.0 ** max(attempt, 0))
    delay = ceiling * rand()
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(MAX_COUNTDOWN, delay)


def clamp_to_deadline(delay: float, *, now: float, deadline: float, floor: float = 0.05) -> float:
    """Never sleep past the job's deadline: the next run must notice it on time."""
    return float(max(floor, min(delay, deadline - now)))
