"""worker.ops.metrics against a real throwaway Redis: what is recorded is exactly what a scrape exports."""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.dev.embedded_redis import EmbeddedRedis, free_port
from worker.names import (
    ACTIVE_JOBS_KEY,
    ALL_QUEUES,
    DEAD_LETTERS_KEY,
    IN_FLIGHT_STAGES,
    JOB_KEY_PREFIX,
    WEBHOOKS_PENDING_KEY,
)
from worker.ops import metrics
from worker.ops.metrics import (
    METRICS_PREFIX,
    MetricsCollector,
    record_callback,
    record_gen_call,
    record_job_finished,
)


def registry_for(collector: MetricsCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


@pytest.fixture
def registry(r: redis.Redis) -> CollectorRegistry:
    return registry_for(MetricsCollector(r))


def down_client() -> redis.Redis:
    """A client for a port nobody listens on, failing at once (no retries)."""
    return redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def add_job(r: redis.Redis, job_id: str, *, overdue_at: float, **fields: str) -> None:
    mapping: dict[Any, Any] = {"created_at": "1.0", **fields}
    r.hset(JOB_KEY_PREFIX + job_id, mapping=mapping)
    r.zadd(ACTIVE_JOBS_KEY, {job_id: overdue_at})


# -- counters and histograms -------------------------------------------------------------------


def test_gen_calls_are_counted_by_endpoint_and_status(r: redis.Redis, registry: CollectorRegistry) -> None:
    record_gen_call(r, endpoint="generate", status=202, seconds=0.03)
    record_gen_call(r, endpoint="generate", status=202, seconds=0.2)
    record_gen_call(r, endpoint="generate", status=429, seconds=0.01)
    record_gen_call(r, endpoint="status", status=None, seconds=31.0)

    total = "lipsync_gen_requests_total"
    assert value(registry, total, endpoint="generate", status="202") == 2
    assert value(registry, total, endpoint="generate", status="429") == 1
    assert value(registry, total, endpoint="status", status="error") == 1
    assert value(registry, total, endpoint="status", status="200") is None


def test_gen_call_durations_form_a_cumulative_histogram(r: redis.Redis, registry: CollectorRegistry) -> None:
    for seconds in (0.03, 0.2, 0.01):  # 0.01 is exactly a bound: le means <=
        record_gen_call(r, endpoint="generate", status=202, seconds=seconds)
    record_gen_call(r, endpoint="status", status=200, seconds=31.0)

    bucket = "lipsync_gen_request_duration_seconds_bucket"
    expected = {"0.01": 1, "0.025": 1, "0.05": 2, "0.1": 2, "0.25": 3, "30.0": 3, "+Inf": 3}
    for le, count in expected.items():
        assert value(registry, bucket, endpoint="generate", le=le) == count, le
    assert value(registry, "lipsync_gen_request_duration_seconds_count", endpoint="generate") == 3
    assert value(registry, "lipsync_gen_request_duration_seconds_sum", endpoint="generate") == pytest.approx(
        0.24
    )
    assert value(registry, bucket, endpoint="status", le="30.0") == 0
    assert value(registry, bucket, endpoint="status", le="+Inf") == 1
    assert value(registry, "lipsync_gen_request_duration_seconds_sum", endpoint="status") == 31.0


def test_finished_jobs_by_model_and_status(r: redis.Redis, registry: CollectorRegistry) -> None:
    record_job_finished(r, model="gen", status="completed", seconds=42.0)
    record_job_finished(r, model="gen", status="completed", seconds=7.5)
    record_job_finished(r, model="gen", status="failed", seconds=4000.0)
    record_job_finished(r, model="sync_so", status="timeout", seconds=1800.0)

    total = "lipsync_jobs_finished_total"
    assert value(registry, total, model="gen", status="completed") == 2
    assert value(registry, total, model="gen", status="failed") == 1
    assert value(registry, total, model="sync_so", status="timeout") == 1
    bucket = "lipsync_job_duration_seconds_bucket"
    assert value(registry, bucket, model="gen", le="5.0") == 0
    assert value(registry, bucket, model="gen", le="10.0") == 1
    assert value(registry, bucket, model="gen", le="60.0") == 2
    assert value(registry, bucket, model="gen", le="3600.0") == 2
    assert value(registry, bucket, model="gen", le="+Inf") == 3
    assert value(registry, "lipsync_job_duration_seconds_sum", model="gen") == 4049.5
    assert value(registry, bucket, model="sync_so", le="1800.0") == 1
    assert value(registry, "lipsync_job_duration_seconds_count", model="sync_so") == 1


def test_callbacks_by_kind_and_outcome(r: redis.Redis, registry: CollectorRegistry) -> None:
    for outcome in ("sent", "failed_attempt", "failed_attempt", "delivered"):
        record_callback(r, kind="webhook", outcome=outcome)
    record_callback(r, kind="task", outcome="sent")
    record_callback(r, kind="webhook", outcome="dead_lettered")

    total = "lipsync_callbacks_total"
    assert value(registry, total, kind="webhook", outcome="failed_attempt") == 2
    assert value(registry, total, kind="webhook", outcome="delivered") == 1
    assert value(registry, total, kind="webhook", outcome="dead_lettered") == 1
    assert value(registry, total, kind="task", outcome="sent") == 1


def test_odd_durations_count_without_breaking_the_histogram(
    r: redis.Redis, registry: CollectorRegistry
) -> None:
    record_gen_call(r, endpoint="generate", status=202, seconds=float("nan"))
    record_gen_call(r, endpoint="generate", status=202, seconds=-0.5)  # clock skew: clamped to 0

    assert value(registry, "lipsync_gen_requests_total", endpoint="generate", status="202") == 2
    assert value(registry, "lipsync_gen_request_duration_seconds_bucket", endpoint="generate", le="0.01") == 1
    assert value(registry, "lipsync_gen_request_duration_seconds_count", endpoint="generate") == 1
    assert value(registry, "lipsync_gen_request_duration_seconds_sum", endpoint="generate") == 0


def test_label_values_with_any_characters_round_trip(r: redis.Redis, registry: CollectorRegistry) -> None:
    odd = 'a,b|c"d\\e\n'
    record_job_finished(r, model=odd, status="completed", seconds=1.0)
    assert value(registry, "lipsync_jobs_finished_total", model=odd, status="completed") == 1
    assert b"lipsync_jobs_finished_total" in generate_latest(registry)


def test_every_key_written_is_under_the_metrics_prefix(r: redis.Redis) -> None:
    record_gen_call(r, endpoint="generate", status=202, seconds=0.1)
    record_job_finished(r, model="gen", status="completed", seconds=10.0)
    record_callback(r, kind="task", outcome="sent")
    metrics.record_misrouted(r, queue="celery", count=2)
    metrics.record_recoveries(r, cause="dead_worker", count=3)
    metrics.record_gen_event(r, outcome="matched")
    metrics.record_event_nudges(r, result="sent", count=2)
    metrics.record_card_change(r, action="stale")
    keys = sorted(k.decode() for k in cast(list[bytes], r.keys("*")))
    assert keys == sorted(metrics.METRICS_KEYS)
    assert all(k.startswith(METRICS_PREFIX) for k in keys)


def test_malformed_hash_fields_are_skipped(r: redis.Redis, registry: CollectorRegistry) -> None:
    record_callback(r, kind="task", outcome="sent")
    r.hset(
        metrics.CALLBACKS_KEY, mapping={"not json": "1", '["too","many","labels"]': "1", '["x","y"]': "NaNx"}
    )
    r.hset(metrics.JOB_DURATION_KEY, mapping={'["gen","soon"]': "1", '["gen","sum"]': "3.5"})

    assert value(registry, "lipsync_callbacks_total", kind="task", outcome="sent") == 1
    assert value(registry, "lipsync_callbacks_total", kind="x", outcome="y") is None
    assert value(registry, "lipsync_job_duration_seconds_count", model="gen") == 0
    assert value(registry, "lipsync_metrics_scrape_error") == 0


# -- gauges read from the job records and the queues -------------------------------------------


def test_in_flight_jobs_by_stage_and_overdue(r: redis.Redis, registry: CollectorRegistry) -> None:
    past, future = time.time() - 10, time.time() + 600
    add_job(r, "j1", overdue_at=future, state="queued")
    add_job(r, "j2", overdue_at=past, state="polling")
    add_job(r, "j3", overdue_at=future, state="polling")
    add_job(r, "j4", overdue_at=future, state="fetching")
    add_job(r, "j5", overdue_at=future)  # no state yet: queued, as JobStore.get reads it
    # Finished, callbacks not yet dispatched: still active (and overdue) but not in flight.
    add_job(r, "j6", overdue_at=past, state="completed", outcome='{"status":"completed"}')
    add_job(r, "j7", overdue_at=future, state="polling", outcome='{"status":"stopped"}')
    r.zadd(ACTIVE_JOBS_KEY, {"expired": future})  # its record is gone
    r.hset(JOB_KEY_PREFIX + "not-active", mapping={"created_at": "1.0", "state": "polling"})

    gauge = "lipsync_jobs_in_flight"
    assert value(registry, gauge, stage="queued") == 2
    assert value(registry, gauge, stage="submitting") == 0
    assert value(registry, gauge, stage="polling") == 2
    assert value(registry, gauge, stage="fetching") == 1
    assert value(registry, "lipsync_jobs_overdue") == 2
    assert value(registry, "lipsync_jobs_active") == 8


def test_in_flight_scan_is_capped(r: redis.Redis) -> None:
    for n in range(5):
        add_job(r, f"j{n}", overdue_at=time.time() + n, state="polling")
    registry = registry_for(MetricsCollector(r, max_scan=3))
    assert value(registry, "lipsync_jobs_in_flight", stage="polling") == 3
    assert value(registry, "lipsync_jobs_active") == 5


def test_everything_is_exported_as_zero_when_empty(registry: CollectorRegistry) -> None:
    for stage in IN_FLIGHT_STAGES:
        assert value(registry, "lipsync_jobs_in_flight", stage=stage) == 0
    for queue in ("lipsync", "lipsync.fetch", "lipsync.callbacks"):
        assert value(registry, "lipsync_queue_depth", queue=queue) == 0
    for name in (
        "lipsync_jobs_overdue",
        "lipsync_jobs_active",
        "lipsync_callbacks_dead_letters",
        "lipsync_webhooks_pending",
    ):
        assert value(registry, name) == 0
    assert value(registry, "lipsync_metrics_scrape_error") == 0
    text = generate_latest(registry).decode()
    for family in ("lipsync_gen_requests_total", "lipsync_job_duration_seconds", "lipsync_callbacks_total"):
        assert f"# TYPE {family} " in text


def test_queue_depth_counts_priority_sub_lists_on_the_broker(r: redis.Redis, server: EmbeddedRedis) -> None:
    broker = redis.Redis(port=server.port, db=1)
    broker.lpush("lipsync", "m1", "m2", "m3")
    broker.lpush("lipsync\x06\x163", "m4", "m5")
    broker.lpush("lipsync.fetch\x06\x169", "m6")
    r.lpush("lipsync.callbacks", "in the records db, not the broker")
    registry = registry_for(MetricsCollector(r, broker=broker))

    assert value(registry, "lipsync_queue_depth", queue="lipsync") == 5
    assert value(registry, "lipsync_queue_depth", queue="lipsync.fetch") == 1
    assert value(registry, "lipsync_queue_depth", queue="lipsync.callbacks") == 0


def test_dead_letters(r: redis.Redis, registry: CollectorRegistry) -> None:
    r.rpush(DEAD_LETTERS_KEY, '{"job_id":"j1"}', '{"job_id":"j2"}')
    assert value(registry, "lipsync_callbacks_dead_letters") == 2


def test_webhooks_pending(r: redis.Redis, registry: CollectorRegistry) -> None:
    r.zadd(WEBHOOKS_PENDING_KEY, {"j1.outcome": time.time(), "j2.outcome": time.time()})
    assert value(registry, "lipsync_webhooks_pending") == 2


def test_decoding_clients_work_too(server: EmbeddedRedis) -> None:
    r = redis.Redis(port=server.port, db=3, decode_responses=True)
    r.flushdb()
    add_job(r, "j1", overdue_at=time.time() + 60, state="submitting")
    record_callback(r, kind="task", outcome="sent")
    registry = registry_for(MetricsCollector(r))
    assert value(registry, "lipsync_jobs_in_flight", stage="submitting") == 1
    assert value(registry, "lipsync_callbacks_total", kind="task", outcome="sent") == 1


def test_queue_names_match_the_app_and_kombu() -> None:
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    from worker.app import app
    from worker.ops import broker

    assert tuple(queue.name for queue in app.conf.task_queues) == ALL_QUEUES
    assert Channel.sep == broker.PRIORITY_SEPARATOR
    assert tuple(step for step in PRIORITY_STEPS if step) == broker.PRIORITY_STEPS


# -- Redis unreachable --------------------------------------------------------------------------


def test_scrape_reports_an_unreadable_redis_instead_of_failing() -> None:
    registry = registry_for(MetricsCollector(down_client()))
    assert value(registry, "lipsync_metrics_scrape_error") == 1
    assert value(registry, "lipsync_jobs_in_flight", stage="queued") is None
    assert b"lipsync_metrics_scrape_error 1.0" in generate_latest(registry)


def test_recording_never_raises_when_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    client = down_client()
    with caplog.at_level(logging.DEBUG, logger="lipsync.deferred"):
        record_gen_call(client, endpoint="generate", status=202, seconds=0.1)
        record_job_finished(client, model="gen", status="completed", seconds=10.0)
        record_callback(client, kind="webhook", outcome="delivered")
    assert [rec.levelno for rec in caplog.records] == [logging.DEBUG] * 3
    assert all("not recorded" in rec.getMessage() for rec in caplog.records)
