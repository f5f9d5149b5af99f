"""A throwaway Redis per test module, and a clean client on it per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from worker.dev.embedded_redis import EmbeddedRedis
from worker.ops import deferred


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as s:
        yield s


@pytest.fixture
def r(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """Emptied, its command statistics reset (tests count round trips with INFO commandstats)."""
    client = redis.Redis(port=server.port, db=0)
    client.flushall()
    client.config_resetstat()
    yield client
    deferred.flush()  # no test leaves this thread collecting writes
    client.close()
