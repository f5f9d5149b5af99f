"""LIPSYNC_LOG_JSON=true: one JSON object per line, carrying the job's ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness import make_request
from worker.enqueue import enqueue

pytestmark = pytest.mark.integration


def test_json_logs_carry_job_and_generation_ids(make_cluster: Any, simulator: Any) -> None:
    cluster = make_cluster(LIPSYNC_LOG_JSON="true")
    worker = cluster.start_worker()
    request = make_request()
    result = enqueue(request, app=cluster.app()).get(timeout=60)
    job_id, generation_id = request["job_id"], result["generation_id"]

    lines = [line for line in worker.log().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]  # every structured line parses
    assert entries
    in_tasks = [e for e in entries if e["process"].startswith("ForkPoolWorker")]
    assert in_tasks, "task lines are logged"
    assert all(e["job_id"] == job_id for e in in_tasks), [e for e in in_tasks if e["job_id"] != job_id]
    ours = [e for e in in_tasks if e["logger"].startswith("lipsync.")]
    assert any("accepted" in e["message"] for e in ours)
    after_submit = [e for e in ours if "completed, output at" in e["message"]]
    assert after_submit and all(e["generation_id"] == generation_id for e in after_submit)
    received = [e for e in entries if e.get("task_id") == job_id]
    assert received, "Celery's own lines about the caller's task carry its id"
