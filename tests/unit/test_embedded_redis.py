"""The throwaway Redis the demo and the tests start: it must come up on a port of its own even when
another process takes the port it probed (tests start servers side by side)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis

from worker.dev.embedded_redis import EmbeddedRedis


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_picked_port_taken_meanwhile_moves_to_another(taken_port: int) -> None:
    server = EmbeddedRedis()
    server.port = taken_port  # what the race looks like: our probe's port was bound by someone else
    with server:
        assert server.port != taken_port
        assert redis.Redis.from_url(server.url).ping()


def test_another_redis_answering_on_the_port_is_not_mistaken_for_ours() -> None:
    with EmbeddedRedis() as first:
        second = EmbeddedRedis()
        second.port = first.port
        with second:
            assert second.port != first.port
            pid = redis.Redis.from_url(second.url).info("server")["process_id"]
            assert pid == second._process.pid  # type: ignore[union-attr]


def test_a_port_the_caller_named_is_not_silently_changed(taken_port: int) -> None:
    with pytest.raises(RuntimeError, match=f"port {taken_port} is taken"):
        EmbeddedRedis(taken_port).start()
