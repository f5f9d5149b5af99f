import time
from collections.abc import Iterator

import pytest
import redis

from worker.dev.embedded_redis import EmbeddedRedis
from worker.jobs.ratelimit import FleetRateLimiter


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def test_admits_the_limit_then_says_how_long_to_wait(client: redis.Redis) -> None:
    client.flushall()
    limiter = FleetRateLimiter(client, limits={"status": 3}, window=1.0)
    assert [limiter.acquire("status") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("status")
    assert 0.9 <= wait <= 1.0
    time.sleep(wait + 0.01)
    assert limiter.acquire("status") == 0.0


def test_budgets_are_separate_and_zero_means_unlimited(client: redis.Redis) -> None:
    client.flushall()
    limiter = FleetRateLimiter(client, limits={"generate": 1, "status": 0}, window=10.0)
    assert limiter.acquire("generate") == 0.0
    assert limiter.acquire("generate") > 0
    assert all(limiter.acquire("status") == 0.0 for _ in range(50))
    assert client.zcard("lipsync:ratelimit:status") == 0


def test_processes_share_one_window(client: redis.Redis) -> None:
    client.flushall()
    a = FleetRateLimiter(client, limits={"status": 4}, window=5.0)
    b = FleetRateLimiter(client, limits={"status": 4}, window=5.0)
    granted = [x.acquire("status") == 0.0 for x in (a, b, a, b, a, b)]
    assert granted == [True, True, True, True, False, False]
