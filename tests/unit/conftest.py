"""Fixtures for the fast tier: the Celery-free core against real parts, without worker processes.

* ``redis_url``: one throwaway ``redis-server`` per session on a free loopback port (flushed per test).
* ``clock``: a clock the test moves by hand; the simulator's generations and the steps both read it,
  so pending -> processing -> completed, backoffs and deadlines take no real time.
* ``sim``: the GEN simulator as a real HTTP server on loopback, driven by ``clock``.
* ``res``: the per-process :class:`~worker.jobs.resources.Resources` the steps take, on that Redis
  and that simulator, reading ``clock``.
* ``queue``: the real :class:`~worker.celery_queue.CeleryQueue` over a Celery app on that Redis.
  Nothing consumes its messages: :func:`queued` reads back what was sent, as a worker would get it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from gensim import GenSimulator
from worker.app import create_app
from worker.celery_queue import CeleryQueue
from worker.dev.embedded_redis import EmbeddedRedis
from worker.jobs.resources import Resources
from worker.ops.broker import queue_lists
from worker.settings import Settings

API_KEY = "sk-unit-SECRET-7d1e"
AGENT_ID = "42"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"unit-webhook-secret-0123456789ab").decode()
#: Simulated generation times (seconds of the fake clock).
DURATIONS = {"gen": 10.0, "sync_so": 20.0}


@dataclass
class FakeClock:
    """Epoch seconds that move only when the test says so."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def _redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(_redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(_redis_server.url)
    client.flushall()
    client.close()
    return _redis_server.url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[GenSimulator]:
    with GenSimulator(api_key=API_KEY, agent_ids=(AGENT_ID,), durations=DURATIONS, clock=clock) as server:
        yield server


def unit_settings(broker_url: str, sim_url: str, storage: Path, **overrides: Any) -> Settings:
    """The defaults, pointed at the test's Redis (the broker, and the records unless ``redis_url`` is
    overridden) and simulator; ``overrides`` say what a test changes."""
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "gen_base_url": sim_url,
        "gen_api_key": API_KEY,
        "gen_agent_id": AGENT_ID,
        "storage_dir": storage,
        # The simulator's CDN is on loopback.
        "allow_private_urls": True,
        "webhook_secret": WEBHOOK_SECRET,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture
def settings(redis_url: str, sim: GenSimulator, tmp_path: Path) -> Settings:
    return unit_settings(redis_url, sim.base_url, tmp_path / "outputs")


@pytest.fixture
def res(settings: Settings, clock: FakeClock) -> Iterator[Resources]:
    resources = Resources(settings, clock=clock)
    yield resources
    resources.redis.close()


ResFactory = Callable[..., Resources]


@pytest.fixture
def make_res(redis_url: str, sim: GenSimulator, tmp_path: Path, clock: FakeClock) -> Iterator[ResFactory]:
    """Resources with settings of the test's choosing (``make_res(gen_status_rate=2)``)."""
    made: list[Resources] = []

    def build(**overrides: Any) -> Resources:
        made.append(Resources(unit_settings(redis_url, sim.base_url, tmp_path, **overrides), clock=clock))
        return made[-1]

    yield build
    for resources in made:
        resources.redis.close()


@pytest.fixture
def queue(settings: Settings) -> CeleryQueue:
    return CeleryQueue(create_app(settings))


def queued(res: Resources, queue_name: str) -> list[dict[str, Any]]:
    """The messages waiting in a Celery queue, in the order a worker takes them (higher priorities
    first, then oldest first): ``{"task", "id", "args", "kwargs", "chain", "last_id"}``
    (``chain``: the names of the tasks that follow; ``last_id``: the task id the chain's last task
    will run under)."""
    messages = []
    raws = [raw for name in queue_lists(queue_name) for raw in reversed(res.redis.lrange(name, 0, -1))]
    for raw in raws:
        message = json.loads(raw)
        headers = message["headers"]
        body = json.loads(base64.b64decode(message["body"]))
        args, kwargs, embed = body
        steps = list(reversed(embed.get("chain") or []))
        last_id = steps[-1]["options"].get("task_id") if steps else headers["id"]
        messages.append(
            {
                "task": headers["task"],
                "id": headers["id"],
                "args": args,
                "kwargs": kwargs,
                "chain": [step["task"] for step in steps],
                "last_id": last_id,
            }
        )
    return messages
