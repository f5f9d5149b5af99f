"""The one retry decision: whether a failed attempt is made again, and how long from now.

Every step and task asks :func:`decide` — submit, poll, download, webhook delivery, and a task
whose own Redis blinked — each with its :class:`RetryPolicy` (how many retries, how far apart).
What is retryable is said by the errors themselves (``LipsyncError.retryable``): 408/429/5xx,
transport errors, timeouts, unreadable bodies, broken downloads and uploads, failed webhook
attempts; plus ``redis.RedisError`` (our own state store blinked, which ends nothing). Anything else
is final: an unknown exception type is a bug and fails loudly rather than loop.

Every delay becomes a Celery ``countdown``. Redis redelivers a message not acknowledged within the
visibility timeout, and a countdown message stays unacknowledged until it runs, so no delay exceeds
:data:`MAX_COUNTDOWN`, far below the visibility timeout (kombu#337).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker.errors import LipsyncError

#: No countdown is ever longer than this (seconds), whatever GEN's Retry-After says.
MAX_COUNTDOWN = 900.0


@dataclass(frozen=True)
class RetryPolicy:
    """How a kind of work retries its retryable failures."""

    #: Retries allowed before giving up; None: no count limit (a deadline bounds them instead).
    limit: int | None
    #: Cap of the exponential backoff ("full jitter", from 1 s doubling). GEN's Retry-After is
    #: honoured beyond it, up to MAX_COUNTDOWN.
    cap: float = 60.0
    #: A fixed schedule instead of the backoff: retry n waits ``delays[n]`` (the last one repeats).
    delays: tuple[float, ...] = ()


@dataclass(frozen=True)
class Retry:
    """Try again in ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Do not try again. ``exhausted``: the failure was retryable but the policy's retries are spent
    (else retrying cannot help: the failure itself is final)."""

    exhausted: bool


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, redis.RedisError):
        return True
    return isinstance(exc, LipsyncError) and exc.retryable


def decide(
    exc: BaseException,
    *,
    retries: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> Retry | GiveUp:
    """Whether to retry after ``exc``, given the ``retries`` already made under ``policy``."""
    if not is_retryable(exc):
        return GiveUp(exhausted=False)
    if policy.limit is not None and retries >= policy.limit:
        return GiveUp(exhausted=True)
    if policy.delays:
        return Retry(min(MAX_COUNTDOWN, policy.delays[min(retries, len(policy.delays) - 1)]))
    retry_after = getattr(exc, "retry_after", None)
    return Retry(retry_delay(retries, retry_after=retry_after, cap=policy.cap, rand=rand))


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
    # The exponent stops growing long before any cap matters (2**63 s): a float power beyond
    # ~2**1023 would overflow, and an unlimited policy can count that far.
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 63))
    delay = ceiling * rand()
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(MAX_COUNTDOWN, delay)
