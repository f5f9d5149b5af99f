"""kombu's Redis channel reuses one client per connection pool (worker.ops.kombu_reuse).

On a real Redis: the operations a worker's main process runs per task (publish, take, acknowledge)
share one client and still work; a replaced pool (what kombu does after a lost connection) gets a
client of its own; kombu's asynchronous BRPOP client is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

import worker.app  # noqa: F401 - creating the app installs it
from worker.ops import kombu_reuse

#: Typed as Any: the stubs do not declare the private method replaced.
CHANNEL: Any = kombu_redis.Channel
WORK = Queue("reuse-work", Exchange("reuse-work"), "reuse-work")


@pytest.fixture
def channel(redis_url: str) -> Iterator[Any]:
    with Connection(redis_url) as connection:
        chan: Any = connection.channel()
        WORK.bind(chan).declare()
        yield chan
        chan.close()


def _counting_clients(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    made: list[Any] = []
    real = redis.Redis.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", init)
    return made


def test_the_app_installs_it() -> None:
    assert getattr(CHANNEL._create_client, "_lipsync_reuses_clients", False)


def test_publish_take_and_ack_share_one_client(channel: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    channel._create_client()  # the channel's first client, made before counting
    made = _counting_clients(monkeypatch)
    producer = Producer(channel)
    for n in range(5):
        producer.publish({"n": n}, exchange=WORK.exchange, routing_key="reuse-work", declare=[WORK])
    taken = [WORK.bind(channel).get(no_ack=False) for _ in range(5)]
    for message in taken:
        assert message is not None
        message.ack()
    assert [m.payload["n"] for m in taken if m is not None] == list(range(5))
    assert made == []  # without the reuse: one client per publish, take and ack
    assert channel._size("reuse-work") == 0
    assert channel.qos.can_consume()


def test_a_replaced_pool_gets_a_client_of_its_own(channel: Any) -> None:
    first = channel._create_client()
    assert channel._create_client() is first
    channel._disconnect_pools()  # kombu's step after a lost connection
    second = channel._create_client()
    assert second is not first
    assert second.connection_pool is channel.pool
    assert second.ping()


def test_the_asynchronous_client_is_kombus_own(channel: Any) -> None:
    assert channel._create_client(asynchronous=True) is not channel._create_client(asynchronous=True)
    assert channel._create_client(asynchronous=True) is not channel._create_client()


def test_install_is_idempotent() -> None:
    before = CHANNEL._create_client
    kombu_reuse.install()
    assert CHANNEL._create_client is before
