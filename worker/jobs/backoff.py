"""The poll schedule's arithmetic, kept pure so it is unit-tested on its own.

Every delay here becomes a Celery ``countdown``, so it is capped at
:data:`worker.retry.MAX_COUNTDOWN` (far below Redis's visibility timeout).
"""

from __future__ import annotations

import math
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
    phase: float = 0.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before poll number ``attempt + 2`` (the first asks at once): capped geometric
    growth, minus up to ``jitter``.

    A fresh generation is checked soon; a slow one less and less often, never less often than
    every ``cap`` seconds. The jitter only shortens delays, so the cap stays a true upper bound.

    ``phase`` (0 to 1, the job's stagger) shifts the schedule along itself by that much of a step.
    Unshifted, polls come at once and then at ``T(1), T(2), ...`` after the submit, where
    ``T(x) = initial * (1 + factor + ... + factor**(x - 1))``, continued smoothly between whole
    ``x``; shifted, at once and then at ``T(1 + phase), T(2 + phase), ...``. Jobs whose phases
    spread evenly over 0-1 between them poll at every moment of a step, so generations that end
    together are seen running just before the end by some job and done just after it by another,
    and the fleet learns where they end from its very first ones. Unshifted, they were all seen at
    the same few times, up to half a step (a third of the elapsed time) apart.
    """
    # The first delay runs from the poll at once to T(1 + phase); each later one is a whole step.
    base = _stretch(initial, factor, 1.0 + phase) if attempt <= 0 else initial * factor ** (attempt + phase)
    return min(MAX_COUNTDOWN, min(cap, base) * (1.0 - jitter * rand()))


def _stretch(initial: float, factor: float, steps: float) -> float:
    """``T(steps)``: the time ``steps`` (a real number) delays of the geometric schedule take."""
    if factor == 1.0:
        return initial * steps
    return initial * (math.pow(factor, steps) - 1.0) / (factor - 1.0)


def clamp_to_deadline(delay: float, *, now: float, deadline: float, floor: float = 0.05) -> float:
    """Never sleep past the job's deadline: the next run must notice it on time."""
    return float(max(floor, min(delay, deadline - now)))
