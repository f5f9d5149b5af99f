"""A Redis restart under a consumer, for real: nothing may raise anything but a connection error.

Celery's consumer reconnects on the transport's connection errors and ends the worker on anything
else ("Unrecoverable error"). kombu 5.7 raises ``AttributeError`` from a channel whose connection
was closed under it (docs/redis-restart-crash.md); worker.ops.kombu_fixes turns that into a
connection error. Each test below puts a real kombu channel in that state the way Celery's consumer
does, then runs one operation a worker runs on it; the last tests check that the app's settings
ride over a short outage of the result backend and of publishing.

One Redis of this module's own (persistent, so a restart keeps its data), stopped and started for
real.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states
from kombu import Connection, Consumer, Exchange, Message, Producer, Queue
from kombu.common import ignore_errors
from kombu.transport import redis as kombu_redis

from tests.unit.conftest import unit_settings
from worker.app import create_app
from worker.dev.embedded_redis import EmbeddedRedis
from worker.ops import kombu_fixes

WORK = Queue("work", Exchange("work"), "work")
#: A broadcast queue, as Celery's remote-control (pidbox) consumer declares one per worker.
CONTROL = Queue("node1.control", Exchange("control", type="fanout"), auto_delete=True)


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(persistent=True) as s:
        yield s


@pytest.fixture
def url(server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.ConnectionError:  # a failed test left it stopped
        server.start()
    client.flushall()
    client.close()
    kombu_fixes.install()
    return server.url


@dataclass
class Consuming:
    """A consumer holding one unacknowledged message (a late-ack task still running)."""

    conn: Connection
    channel: Any
    message: Message
    #: What Celery treats as a lost connection (``Consumer.connection_errors``), read while attached.
    errors: tuple[type[BaseException], ...]

    def unacked(self) -> set[str]:
        client = redis.Redis.from_url(self.conn.as_uri(include_password=True), decode_responses=True)
        try:
            return {str(key) for key in client.hkeys("unacked")}
        finally:
            client.close()


def keep(into: list[Message]) -> Callable[[Any, Message], None]:
    return lambda _body, message: into.append(message)


def consume_one(url: str, *, idle: bool = True) -> Consuming:
    """``idle``: then wait until the next BRPOP is in flight, as the worker's event loop keeps one;
    it waits up to 10 s, so it is still pending when Redis goes away."""
    conn = Connection(url, transport_options={"polling_interval": 10})
    Producer(conn.channel()).publish({"step": 1}, exchange=WORK.exchange, routing_key="work", declare=[WORK])
    received: list[Message] = []
    channel = conn.default_channel
    Consumer(channel, [WORK], callbacks=[keep(received)]).consume()
    Consumer(conn.channel(), [CONTROL], callbacks=[keep([])]).consume()
    while not received:
        conn.drain_events(timeout=1)
    while idle:
        try:
            conn.drain_events(timeout=0.1)
        except TimeoutError:
            break
    return Consuming(conn, channel, received[0], conn.connection_errors)


def lose_connection(consuming: Consuming, server: EmbeddedRedis) -> None:
    """Redis restarts under the consumer, which then does what Celery's consumer does on a connection
    error (``Consumer.on_connection_error_after_connected``): ``collect()`` ignoring everything, then
    ``close()`` ignoring connection and channel errors. Anything else would end the worker."""
    conn = consuming.conn
    server.stop()
    with contextlib.suppress(Exception):  # Celery ignores everything here too
        conn.collect(socket_timeout=0.5)
    server.start()
    ignore_errors(conn, conn.close)


def lost(url: str, server: EmbeddedRedis) -> Consuming:
    consuming = consume_one(url)
    lose_connection(consuming, server)
    # What a late-ack message still held by a running task sees: its channel is detached.
    assert consuming.channel.connection is None
    return consuming


# ----------------------------------------------------------------------------------------------
# The operations a worker runs on a channel closed under it
# ----------------------------------------------------------------------------------------------


def test_closing_skips_the_restore_and_leaves_the_messages_in_redis(url: str, server: EmbeddedRedis) -> None:
    consuming = consume_one(url)
    tag = consuming.message.delivery_tag
    # Unguarded: AttributeError("'NoneType' object has no attribute 'hostname'") from close().
    lose_connection(consuming, server)
    assert consuming.channel.connection is None
    # Not restored to the queue, not lost: Redis redelivers it after the visibility timeout, and
    # the sweeper re-drives its job before that.
    assert tag in consuming.unacked()


def test_restore_on_a_detached_channel_is_skipped(url: str, server: EmbeddedRedis) -> None:
    consuming = lost(url, server)
    consuming.channel.qos.restore_unacked()
    assert consuming.message.delivery_tag in consuming.unacked()


def test_ack_raises_a_connection_error(url: str, server: EmbeddedRedis) -> None:
    consuming = lost(url, server)
    with pytest.raises(consuming.errors, match="connection is closed"):
        consuming.message.ack()
    assert consuming.message.delivery_tag in consuming.unacked()


def test_a_failed_ack_is_only_logged_the_way_celery_acks(
    url: str, server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    consuming = lost(url, server)
    logger = logging.getLogger("test.ack")
    # celery.worker.request.Request.acknowledge, for a task that finished after the reconnect.
    consuming.message.ack_log_error(logger, consuming.errors)
    assert "Couldn't ack" in caplog.text


def test_reject_raises_a_connection_error(url: str, server: EmbeddedRedis) -> None:
    consuming = lost(url, server)
    with pytest.raises(consuming.errors, match="connection is closed"):
        consuming.message.reject()
    assert consuming.message.delivery_tag in consuming.unacked()


def test_requeue_raises_a_connection_error(url: str, server: EmbeddedRedis) -> None:
    consuming = lost(url, server)
    with pytest.raises(consuming.errors, match="connection is closed"):
        consuming.message.requeue()
    assert consuming.message.delivery_tag in consuming.unacked()
    assert redis.Redis.from_url(url).llen("work") == 0


@pytest.mark.parametrize("exchange", ["work", ""], ids=["to-an-exchange", "to-a-queue"])
def test_publish_raises_a_connection_error(url: str, server: EmbeddedRedis, exchange: str) -> None:
    consuming = lost(url, server)
    producer = Producer(consuming.channel)
    with pytest.raises(consuming.errors, match="connection is closed"):
        producer.publish({"step": 2}, exchange=exchange, routing_key="work")


def test_a_producer_whose_connection_was_collected_publishes_again_with_retry(
    url: str, server: EmbeddedRedis
) -> None:
    """A producer of a task process (Celery's producer pool: it owns its connection) after the
    connection was collected under it: ``Connection.ensure`` treats the error as a lost connection,
    reconnects and publishes on a new channel. Unguarded: ``AttributeError`` ('state'), no retry."""
    conn = Connection(url)
    producer = Producer(conn)
    producer.publish({"step": 1}, exchange=WORK.exchange, routing_key="work", declare=[WORK])
    stale: Any = producer.channel
    server.stop()
    with contextlib.suppress(Exception):
        conn.collect(socket_timeout=0.5)
    server.start()
    assert stale.connection is None
    retry = {"max_retries": 2}
    producer.publish({"step": 2}, exchange="work", routing_key="work", retry=True, retry_policy=retry)
    assert producer.channel is not stale
    assert redis.Redis.from_url(url).llen("work") == 2
    conn.close()


def test_receive_raises_a_connection_error(url: str, server: EmbeddedRedis) -> None:
    consuming = lost(url, server)
    with pytest.raises(consuming.errors, match="connection is closed"):
        consuming.channel.basic_get("work")
    # The broadcast (LISTEN) side opens its own client.
    with pytest.raises(consuming.errors, match="connection is closed"):
        consuming.channel._receive()


def test_an_event_on_a_detached_channel_is_refused_before_any_dereference(
    url: str, server: EmbeddedRedis, tmp_path: Path
) -> None:
    """Safe without the guard too: an event declares its exchange first, and kombu's
    ``maybe_declare`` refuses a detached channel with a channel error (and Celery's dispatchers
    buffer events on any error anyway)."""
    consuming = lost(url, server)
    app = create_app(unit_settings(url, "http://127.0.0.1:9", tmp_path))
    dispatcher = app.events.Dispatcher(
        connection=consuming.conn, channel=consuming.channel, buffer_while_offline=False
    )
    with pytest.raises(consuming.conn.recoverable_connection_errors):
        dispatcher.send("worker-heartbeat")


def test_install_is_idempotent(url: str) -> None:
    def installed() -> tuple[Any, ...]:
        channel = vars(kombu_redis.Channel)
        return (channel["_connparams"], channel["state"].fget, vars(kombu_redis.QoS)["restore_unacked"])

    before = installed()
    kombu_fixes.install()
    kombu_fixes.install()
    assert installed() == before


def test_an_attached_channel_is_unaffected(url: str) -> None:
    consuming = consume_one(url, idle=False)
    consuming.message.ack()
    assert consuming.unacked() == set()
    consuming.conn.close()


# ----------------------------------------------------------------------------------------------
# Riding over a short outage (the app's settings, worker.app.celery_config)
# ----------------------------------------------------------------------------------------------


def outage(server: EmbeddedRedis, seconds: float) -> threading.Thread:
    """Stop Redis now; start it again (same port, same data) ``seconds`` later, in the background."""
    server.stop()

    def back() -> None:
        time.sleep(seconds)
        server.start()

    thread = threading.Thread(target=back, name="redis-back")
    thread.start()
    return thread


def test_the_result_backend_rides_over_a_restart(url: str, server: EmbeddedRedis, tmp_path: Path) -> None:
    app = create_app(unit_settings(url, "http://127.0.0.1:9", tmp_path))
    task_id = str(uuid.uuid4())
    app.backend.get_task_meta(task_id)  # connected before the outage, as in a running worker
    back = outage(server, 2.0)
    try:
        # Celery's default: the read before the write fails at once (ConnectionError).
        app.backend.store_result(task_id, {"ok": True}, states.SUCCESS)
    finally:
        back.join()
    assert app.backend.get_task_meta(task_id, cache=False)["status"] == states.SUCCESS


def test_publishing_rides_over_a_restart(url: str, server: EmbeddedRedis, tmp_path: Path) -> None:
    app = create_app(unit_settings(url, "http://127.0.0.1:9", tmp_path))
    # No result subscription (ignore_result): only the publish is under test.
    app.send_task("test.noop", queue="work", ignore_result=True)  # connected before the outage
    back = outage(server, 2.0)
    started = time.monotonic()
    try:
        # Celery's default policy gives up after ~0.6 s (then Task.retry drops the message).
        app.send_task("test.noop", queue="work", ignore_result=True)
    finally:
        back.join()
    assert time.monotonic() - started >= 1.5
    assert redis.Redis.from_url(url).llen("work") == 2


def test_a_consumer_channel_reconnects_after_a_restart(url: str, server: EmbeddedRedis) -> None:
    """The whole cycle, as the worker runs it: lose the connection, reconnect on a new one, consume
    again, and give up only the ack of the message held across the restart."""
    consuming = lost(url, server)
    conn = Connection(url)
    received: list[Message] = []
    Consumer(conn.default_channel, [WORK], callbacks=[keep(received)]).consume()
    Producer(conn.default_channel).publish({"step": 3}, exchange=WORK.exchange, routing_key="work")
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1)
    assert [m.payload for m in received] == [{"step": 3}]
    received[0].ack()
    with pytest.raises(consuming.errors):
        consuming.message.ack()
    conn.close()
