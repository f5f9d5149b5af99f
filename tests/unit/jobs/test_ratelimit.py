import time
from collections.abc import Iterator

import pytest
import redis

from gensim import GenSimulator
from tests.unit.conftest import ResFactory
from worker.dev.embedded_redis import EmbeddedRedis
from worker.gen.errors import GenRateLimited
from worker.jobs.ratelimit import FleetRateLimiter
from worker.jobs.resources import Resources
from worker.names import RATELIMIT_KEY_PREFIX


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


# --------------------------------------------------------------------------------------------
# the GEN calls the steps do not pace themselves (stops, content-resource lookups, cells and
# layers) share the status budget, as GEN sees them
# --------------------------------------------------------------------------------------------

#: Simulator endpoint kinds of the calls the pacer holds.
PACED_KINDS = ("stop", "content_resource")


def generations(res: Resources, count: int) -> list[str]:
    return [
        res.gen.generate_lipsync(
            sheet_id="101",
            cell_id=str(3000 + n),
            layer_id=None,
            model="gen",
            video_resource_id="5001",
            audio_resource_id="6001",
            idempotency_key=f"pacing-{n}",
        ).generation_id
        for n in range(count)
    ]


def seen_by_gen(sim: GenSimulator, kinds: tuple[str, ...]) -> list[float]:
    """When GEN received each call of these kinds (the simulator's own clock: wall time)."""
    return sorted(r["t"] for r in sim.stats()["requests"] if r["endpoint"] in kinds)


def test_a_burst_of_stops_and_lookups_reaches_gen_at_the_fleet_rate(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    window, rate = 0.5, 2
    res = make_res(gen_status_rate=rate, gen_rate_window=window, gen_dialect="autocontentengine")
    ids = generations(res, 3)  # generate is the steps' own budget: not held here

    started = time.monotonic()
    for generation_id in ids:
        res.gen.stop_generation(generation_id)
    for _ in range(3):
        res.gen.get_content_resource("5001")
    elapsed = time.monotonic() - started

    arrivals = seen_by_gen(sim, PACED_KINDS)
    assert len(arrivals) == 6
    # GEN never sees more than `rate` of them within one window (a few ms for the loopback trip).
    assert all(arrivals[i + rate] - arrivals[i] >= window - 0.05 for i in range(len(arrivals) - rate))
    assert elapsed >= 2 * window - 0.05, "six calls at two per window wait out two windows"


def test_generate_and_status_reads_are_left_to_the_steps_budgets(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    """The steps pace generate and get_generation themselves (and come back later instead of
    waiting): the pacer must not count them a second time."""
    res = make_res(gen_status_rate=1, gen_rate_window=30.0, gen_dialect="autocontentengine")
    (generation_id,) = generations(res, 1)
    started = time.monotonic()
    for _ in range(5):
        res.gen.get_generation(generation_id)
    assert time.monotonic() - started < 2
    assert res.redis.zcard(RATELIMIT_KEY_PREFIX + "status") == 0


def test_the_wait_is_bounded_then_the_call_is_a_retryable_rate_limit(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    """With no room within one GEN read timeout, the call is not made: GenRateLimited with the
    window's wait as Retry-After, which the caller's retry policy honours."""
    res = make_res(gen_status_rate=1, gen_rate_window=30.0, gen_read_timeout=0.3, gen_dialect="vidsheet")
    started = time.monotonic()
    with pytest.raises(GenRateLimited) as info:
        # vidsheet resolves both resources first: the second lookup finds no room.
        generations(res, 1)
    assert time.monotonic() - started < 2, "bounded: the worker is not held for the window"
    exc = info.value
    assert exc.endpoint == "get_content_resource" and exc.retryable
    assert exc.retry_after is not None and 25 <= exc.retry_after <= 30
    assert len(seen_by_gen(sim, ("content_resource",))) == 1
    assert seen_by_gen(sim, ("generate",)) == [], "nothing was generated (nor charged)"
