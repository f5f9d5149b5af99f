"""The poll schedule's arithmetic, kept pure so it is unit-tested on its own.

Every delay here becomes a Celery ``countdown``, so it is capped at
:data:`worker.retry.MAX_COUNTDOWN` (far below Redis's visibility timeout).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from worker.retry import MAX_COUNTDOWN


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


def clamp_to_deadline(delay: float, *, now: float, deadline: float, floor: float = 0.05) -> float:
    """Never sleep past the job's deadline: the next run must notice it on time."""
    return float(max(floor, min(delay, deadline - now)))
