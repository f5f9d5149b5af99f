"""The metrics server as deployed: ``python -m worker.ops.metrics`` in its own process, scraped over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, wait_for
from worker.dev.embedded_redis import EmbeddedRedis, free_port
from worker.names import ACTIVE_JOBS_KEY, DEAD_LETTERS_KEY, JOB_KEY_PREFIX
from worker.ops.metrics import record_callback, record_gen_call, record_job_finished

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class MetricsServer:
    redis_server: EmbeddedRedis
    process: subprocess.Popen[bytes]
    base: str
    log_path: Path

    def records(self) -> redis.Redis:
        return redis.Redis(port=self.redis_server.port, db=2)

    def broker(self) -> redis.Redis:
        return redis.Redis(port=self.redis_server.port, db=0)

    def scrape(self) -> Samples:
        response = requests.get(f"{self.base}/metrics", timeout=10)
        assert response.status_code == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def metrics_server(tmp_path: Path) -> Iterator[MetricsServer]:
    redis_server = EmbeddedRedis().start()
    port = free_port()
    base_url = redis_server.url.rsplit("/", 1)[0]
    log_path = tmp_path / "metrics.log"
    # Records and broker in different databases, as the test cluster (and some deployments) run them.
    command = [sys.executable, "-m", "worker.ops.metrics", "--redis-url", f"{base_url}/2"]
    command += ["--broker-url", f"{base_url}/0", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = MetricsServer(redis_server, process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for(lambda: _healthy(server), timeout=30)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        redis_server.close()


def _healthy(server: MetricsServer) -> bool:
    if server.process.poll() is not None:
        raise RuntimeError(f"metrics server exited:\n{server.log_path.read_text()}")
    try:
        return requests.get(f"{server.base}/healthz", timeout=1).status_code == 200
    except requests.ConnectionError:
        return False


def test_scrape_shows_what_the_fleet_recorded(metrics_server: MetricsServer) -> None:
    records, broker = metrics_server.records(), metrics_server.broker()
    record_gen_call(records, endpoint="generate", status=202, seconds=0.2)
    record_gen_call(records, endpoint="status", status=None, seconds=5.0)
    record_job_finished(records, model="gen", status="completed", seconds=42.0)
    record_callback(records, kind="webhook", outcome="delivered")
    records.hset(JOB_KEY_PREFIX + "j1", mapping={"created_at": "1.0", "state": "polling"})
    records.zadd(ACTIVE_JOBS_KEY, {"j1": time.time() - 5})
    records.rpush(DEAD_LETTERS_KEY, "{}")
    broker.lpush("lipsync.fetch", "m1")
    broker.lpush("lipsync.fetch\x06\x166", "m2")

    samples = metrics_server.scrape()

    assert sample(samples, "lipsync_gen_requests_total", endpoint="generate", status="202") == 1
    assert sample(samples, "lipsync_gen_requests_total", endpoint="status", status="error") == 1
    assert sample(samples, "lipsync_gen_request_duration_seconds_bucket", endpoint="generate", le="0.25") == 1
    assert sample(samples, "lipsync_gen_request_duration_seconds_bucket", endpoint="generate", le="0.1") == 0
    assert sample(samples, "lipsync_gen_request_duration_seconds_sum", endpoint="status") == 5.0
    assert sample(samples, "lipsync_jobs_finished_total", model="gen", status="completed") == 1
    assert sample(samples, "lipsync_job_duration_seconds_count", model="gen") == 1
    assert sample(samples, "lipsync_callbacks_total", kind="webhook", outcome="delivered") == 1
    assert sample(samples, "lipsync_callbacks_dead_letters") == 1
    assert sample(samples, "lipsync_jobs_in_flight", stage="polling") == 1
    assert sample(samples, "lipsync_jobs_in_flight", stage="fetching") == 0
    assert sample(samples, "lipsync_jobs_overdue") == 1
    assert sample(samples, "lipsync_queue_depth", queue="lipsync.fetch") == 2
    assert sample(samples, "lipsync_queue_depth", queue="lipsync") == 0
    assert sample(samples, "lipsync_metrics_scrape_error") == 0
    assert sample(samples, "process_resident_memory_bytes") is not None

    health = requests.get(f"{metrics_server.base}/healthz", timeout=5)
    assert (health.status_code, health.text) == (200, "ok")

    metrics_server.process.send_signal(signal.SIGTERM)
    assert metrics_server.process.wait(timeout=15) == 0
    log = metrics_server.log_path.read_text()
    assert "Traceback" not in log
    assert "metrics server stopped" in log


def test_redis_outage_is_reported_and_recovered_from(metrics_server: MetricsServer) -> None:
    record_callback(metrics_server.records(), kind="task", outcome="sent")
    metrics_server.redis_server.stop()

    samples = metrics_server.scrape()
    assert sample(samples, "lipsync_metrics_scrape_error") == 1
    assert sample(samples, "lipsync_jobs_in_flight", stage="queued") is None

    metrics_server.redis_server.start()  # same port, empty (not persistent)
    samples = metrics_server.scrape()
    assert sample(samples, "lipsync_metrics_scrape_error") == 0
    assert sample(samples, "lipsync_jobs_in_flight", stage="queued") == 0

    metrics_server.process.send_signal(signal.SIGINT)
    assert metrics_server.process.wait(timeout=15) == 0
