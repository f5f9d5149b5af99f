"""A job sent the way a producer that does not use our Celery config sends it — a plain app, no
``queue="lipsync"``, no routes — lands in Celery's default queue. It must not wait there silently:
a real worker's sweep moves it to its own queue, warns naming the queue and the fix, counts it in
the metrics, and the job completes."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from celery import Celery

from gensim.stats import target_key
from tests.conftest import Cluster, wait_for
from worker.ops.metrics import MetricsCollector

pytestmark = pytest.mark.integration


def test_a_job_sent_to_celerys_default_queue_still_completes_and_is_reported(
    make_cluster: Any, simulator: Any
) -> None:
    cluster: Cluster = make_cluster(LIPSYNC_SWEEP_INTERVAL="1")
    worker = cluster.start_worker(concurrency=2)
    producer = Celery(
        "producer", broker=cluster.env["LIPSYNC_BROKER_URL"], backend=cluster.env["LIPSYNC_RESULT_BACKEND"]
    )
    request = {
        "job_id": "misrouted-1",
        "sheet_id": 101,
        "cell_id": 3001,
        "layer_id": 4001,
        "video_resource_id": 5001,
        "audio_resource_id": 6001,
    }
    result = producer.send_task("lipsync.run", kwargs={"request": request})
    outcome = result.get(timeout=60)
    assert outcome["status"] == "completed" and outcome["job_id"] == "misrouted-1"
    wait_for(lambda: "sent to queue 'celery'" in worker.log(), timeout=10)
    assert "queue='lipsync'" in worker.log()
    broker = redis.Redis.from_url(cluster.env["LIPSYNC_BROKER_URL"])
    collector = MetricsCollector(cluster.redis(), broker=broker)
    samples = {s.name: s for family in collector.collect() for s in family.samples if "misrouted" in s.name}
    assert samples["lipsync_misrouted_messages_total"].value == 1
    assert samples["lipsync_misrouted_messages_total"].labels == {"queue": "celery"}
    # Moved, not copied: GEN made (and charged) exactly one generation for the target.
    stats = simulator.stats()
    assert stats["generations_by_target"] == {target_key(101, 3001, 4001): [int(outcome["generation_id"])]}
    assert (stats["generations_created"], stats["charges"]) == (1, 1)
    producer.close()
