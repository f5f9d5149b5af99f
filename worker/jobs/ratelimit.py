"""One GEN rate limit for the whole fleet, kept in Redis.

Celery's ``rate_limit`` is per worker process, so adding workers multiplies the rate GEN sees. Here
every process on every node asks the same Redis before calling GEN: a sliding-window log (a sorted
set of call times per budget) that admits at most ``limit`` calls in any ``window`` seconds. The
check and the admission are one Lua script, and time is Redis's own clock, so nodes with skewed
clocks still share one window.

A call that is not admitted is not waited for in the worker where the step can come back later: the
step comes back as "again in N seconds" (the wait the window says) and the worker slot is free
meanwhile (generate, and the poll's status read). The other GEN calls (stops, content-resource
lookups, cells and layers) are made in the middle of a step, which cannot come back half-way: they
wait for room in the status budget (:meth:`FleetRateLimiter.wait`), a bounded time.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Literal

import redis

from worker.names import RATELIMIT_KEY_PREFIX

Budget = Literal["generate", "status"]

# Returns 0 when admitted, else the milliseconds until the oldest call leaves the window.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZADD', KEYS[1], now, ARGV[3])
    redis.call('PEXPIRE', KEYS[1], window)
    return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""


class FleetRateLimiter:
    """``acquire(budget)`` → 0.0 if the call may go now, else seconds to wait before trying again."""

    def __init__(self, client: redis.Redis, *, limits: dict[Budget, int], window: float) -> None:
        self._script = client.register_script(_ACQUIRE)
        self._limits = limits
        self._window_ms = int(window * 1000)
        self._me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0

    def acquire(self, budget: Budget) -> float:
        limit = self._limits.get(budget, 0)
        if limit <= 0:
            return 0.0
        self._seq += 1
        member = f"{self._me}-{self._seq}"
        wait_ms = int(
            self._script(keys=[RATELIMIT_KEY_PREFIX + budget], args=[self._window_ms, limit, member])
        )
        return wait_ms / 1000.0

    def wait(self, budget: Budget, *, max_wait: float, sleep: Callable[[float], None] = time.sleep) -> float:
        """Block until a call of ``budget`` is admitted (0.0), sleeping at most ``max_wait`` seconds
        in all. When the window has no room that soon, return the wait still ahead, not admitted
        (nothing is taken from the budget)."""
        waited = 0.0
        while True:
            wait = self.acquire(budget)
            if wait <= 0:
                return 0.0
            if waited + wait > max_wait:
                return wait
            # Others may take the freed room first: then the next acquire names a new wait.
            sleep(wait)
            waited += wait
