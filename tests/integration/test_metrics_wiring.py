"""What the workers record shows up on `lipsync-worker metrics`, as an autoscaler would read it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gensim import Fault
from tests.conftest import API_KEY, REPO, Cluster, wait_for
from tests.harness import make_request
from worker.dev.embedded_redis import free_port
from worker.enqueue import enqueue
from worker.errors import LipsyncJobFailed

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_reflect_real_jobs(cluster: Cluster, simulator: Any) -> None:
    simulator.add_fault(Fault(endpoint="get_generation", status=503, times=1))
    enqueue(make_request(model="gen"), app=cluster.app()).get(timeout=60)
    with pytest.raises(LipsyncJobFailed):
        enqueue(make_request(video_resource_id=5099), app=cluster.app()).get(timeout=60)
    simulator.durations = {"gen": 5.0}
    running = make_request(model="gen")
    enqueue(running, app=cluster.app())

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "metrics", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **cluster.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def up() -> bool:
            try:
                return requests.get(url, timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_for(up, timeout=30)

        def polling_seen() -> bool:
            return (
                samples(requests.get(url, timeout=5).text)[
                    ("lipsync_jobs_in_flight", (("stage", "polling"),))
                ]
                >= 1
            )

        wait_for(polling_seen, timeout=30)
        text = requests.get(url, timeout=5).text
        values = samples(text)
        assert values[("lipsync_jobs_finished_total", (("model", "gen"), ("status", "completed")))] >= 1
        assert values[("lipsync_jobs_finished_total", (("model", "gen"), ("status", "failed")))] >= 1
        assert values[("lipsync_gen_requests_total", (("endpoint", "generate"), ("status", "201")))] >= 3
        assert (
            values[("lipsync_gen_requests_total", (("endpoint", "get_generation"), ("status", "503")))] >= 1
        )
        assert ("lipsync_queue_depth", (("queue", "lipsync.fetch"),)) in values
        assert API_KEY not in text
    finally:
        server.terminate()
        server.wait(timeout=10)
        simulator.durations = {"gen": 0.6}
