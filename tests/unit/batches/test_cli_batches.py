"""``lipsync-worker submit --batch``, ``status BATCH_ID`` and ``cancel BATCH_ID``, run as a user runs
them (a subprocess), against a real Redis and no worker: the batch is recorded and its first items
sent; status shows counts, items in flight and failures; cancel ends every unfinished item."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from tests.unit.test_cli import one_line_error, run_cli
from worker.batches.store import BatchStore
from worker.cli import EXIT_OK, EXIT_STILL_RUNNING, EXIT_USAGE
from worker.jobs.models import LipsyncFailure
from worker.names import QUEUE_JOBS


def write_items(path: Path, count: int, *, broken: int | None = None) -> Path:
    lines = []
    for n in range(count):
        item = {"sheet_id": 101, "cell_id": 3000 + n, "video_resource_id": 5001, "audio_resource_id": 6001}
        if n == broken:
            del item["cell_id"]
        lines.append(json.dumps(item))
    path.write_text("\n".join(lines) + "\n")
    return path


def env_of(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {"LIPSYNC_BROKER_URL": redis_url, "LIPSYNC_STORAGE_DIR": str(tmp_path)}


def test_submit_batch_records_it_and_status_and_cancel_show_it(redis_url: str, tmp_path: Path) -> None:
    env = env_of(redis_url, tmp_path)
    items = write_items(tmp_path / "items.jsonl", 5)
    done = run_cli("submit", "--batch", str(items), "--batch-id", "ep-9", "--max-parallel", "2", env=env)
    assert done.returncode == EXIT_OK, done.stderr
    assert json.loads(done.stdout) == {"batch_id": "ep-9"}
    r = redis.Redis.from_url(redis_url)
    assert r.llen(QUEUE_JOBS) == 1  # lipsync.run_batch(batch_id="ep-9"); no worker here
    store = BatchStore(r, ttl=3600)
    assert store.admit("ep-9") == range(0, 2)  # what the worker would do first
    failure = LipsyncFailure(
        job_id="ep-9.0", status="failed", error_code="generation_failed", message="no face"
    )
    store.item_ended("ep-9", 0, failure.model_dump(mode="json"))

    status = run_cli("status", "ep-9", env=env)
    assert status.returncode == EXIT_OK, status.stderr
    shown = json.loads(status.stdout)
    assert shown["batch"]["counts"] == {"failed": 1}
    assert (shown["batch"]["in_flight"], shown["batch"]["waiting"]) == (1, 3)
    assert [item["job_id"] for item in shown["in_flight"]] == ["ep-9.1"]
    assert shown["failures"] == [
        {
            "index": 0,
            "job_id": "ep-9.0",
            "status": "failed",
            "error_code": "generation_failed",
            "message": "no face",
        }
    ]

    cancelled = run_cli("cancel", "ep-9", "--reason", "wrong audio", env=env)
    assert cancelled.returncode == EXIT_OK, cancelled.stderr
    result = json.loads(cancelled.stdout)
    assert result["status"] == "cancelled"
    assert result["counts"] == {"failed": 1, "cancelled": 4}


def test_submit_batch_refuses_an_invalid_item_by_index_and_sends_nothing(
    redis_url: str, tmp_path: Path
) -> None:
    items = write_items(tmp_path / "items.jsonl", 3, broken=1)
    done = run_cli("submit", "--batch", str(items), env=env_of(redis_url, tmp_path))
    assert done.returncode == EXIT_USAGE
    assert "items[1].cell_id: Field required" in one_line_error(done)
    assert redis.Redis.from_url(redis_url).llen(QUEUE_JOBS) == 0


def test_submit_batch_wait_past_its_timeout_says_the_batch_goes_on(redis_url: str, tmp_path: Path) -> None:
    items = write_items(tmp_path / "items.jsonl", 2)
    done = run_cli(
        "submit",
        "--batch",
        str(items),
        "--batch-id",
        "b-slow",
        "--wait",
        "--timeout",
        "1",
        env=env_of(redis_url, tmp_path),
    )
    assert done.returncode == EXIT_STILL_RUNNING
    lines = done.stderr.strip().splitlines()
    assert "0/2 ended" in lines[1]  # the progress display
    assert lines[-1] == "batch b-slow still running after 1 s; see `lipsync-worker status b-slow`"
