"""LIPSYNC_LOG_JSON=true: one JSON object per line, carrying the job's ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.harness import make_request
from worker.enqueue import enqueue
from worker.errors import LipsyncJobFailed

pytestmark = pytest.mark.integration


def test_json_logs_carry_job_and_generation_ids(make_cluster: Any, simulator: Any) -> None:
    cluster = make_cluster(LIPSYNC_LOG_JSON="true")
    worker = cluster.start_worker()
    request = make_request()
    result = enqueue(request, app=cluster.app()).get(timeout=60)
    job_id, generation_id = request["job_id"], result["generation_id"]
    # The caller's result resolves as the outcome is recorded, a moment before the step logs it.
    wait_for(lambda: "completed, output at" in worker.log(), timeout=10)

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


def test_info_lines_are_short_and_carry_no_url_query(make_cluster: Any, simulator: Any) -> None:
    # A webhook URL with a receiver's token, and a failing job too: both outcomes' lines are checked.
    cluster = make_cluster(LIPSYNC_WEBHOOK_RETRY_DELAYS="0.2")
    worker = cluster.start_worker()
    token = "tok-5e3c9a-receiver-secret"
    hook: dict[str, Any] = {"callback": {"webhook_url": f"http://127.0.0.1:9/hook?token={token}"}}
    done = enqueue(make_request(None, **hook, metadata={"note": "x" * 500}), app=cluster.app())
    assert done.get(timeout=60)["status"] == "completed"
    simulator.fail_next(1)
    failed = enqueue(make_request(None, **hook), app=cluster.app())
    with pytest.raises(LipsyncJobFailed):
        failed.get(timeout=60)
    log = worker.log()
    assert token not in log
    task_lines = [line for line in log.splitlines() if "] succeeded in " in line or "raised expected" in line]
    assert any("job_id=" in line for line in task_lines), task_lines
    long_lines = [line for line in log.splitlines() if len(line) > 400]
    assert not long_lines, long_lines[:3]
