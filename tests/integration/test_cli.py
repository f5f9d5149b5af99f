"""The lipsync-worker command, run as a user runs it: as a subprocess."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests
from celery import Celery

from tests.conftest import API_KEY, REPO, Cluster
from worker.dev.embedded_redis import free_port

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "worker.cli"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_simulator_command_serves_gen(tmp_path: Path) -> None:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    process = subprocess.Popen(
        [*CLI, "simulator", "--port", str(port), "--api-key", "cli-key"],
        cwd=REPO,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        # What a person pastes into a worker's shell: read from the output, up to the seeded data.
        printed: list[str] = []
        while not printed or not printed[-1].startswith("Seeded:"):
            printed.append(lines.get(timeout=30).rstrip("\n"))
        assert printed[0] == base  # the first stdout line, for programs that start it
        exports = [line.strip() for line in printed if line.strip().startswith("export ")]
        assert exports[:4] == [
            f"export LIPSYNC_GEN_BASE_URL={base}",
            "export LIPSYNC_GEN_API_KEY=cli-key",
            "export LIPSYNC_GEN_AGENT_ID=42",
            "export LIPSYNC_ALLOW_PRIVATE_URLS=true   # its outputs are served from this loopback address",
        ]
        env = dict(line.split("#")[0].removeprefix("export ").strip().split("=", 1) for line in exports)

        # ...and the printed environment is the one the simulator accepts.
        response = requests.get(
            f"{env['LIPSYNC_GEN_BASE_URL']}/v1/autocontentengine/101/cells/3000",
            params={"agent_id": env["LIPSYNC_GEN_AGENT_ID"]},
            headers={"X-API-Key": env["LIPSYNC_GEN_API_KEY"]},
            timeout=5,
        )
        assert response.status_code == 200
        assert response.json()["id"] == 3000
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_submit_wait_and_status(cluster: Cluster, simulator: object) -> None:
    job_id = f"cli-{uuid.uuid4().hex[:8]}"
    submitted = run_cli(
        "submit",
        "--job-id",
        job_id,
        "--sheet",
        "101",
        "--cell",
        "3005",
        "--layer",
        "4005",
        "--video",
        "5001",
        "--audio",
        "6001",
        "--model",
        "gen",
        "--metadata",
        '{"from": "cli"}',
        "--wait",
        env=cluster.env,
    )
    assert submitted.returncode == 0, submitted.stderr
    result = json.loads(submitted.stdout)
    assert result["job_id"] == job_id and result["status"] == "completed"
    assert result["metadata"] == {"from": "cli"}
    assert "POLLING" in submitted.stderr or "SUCCESS" in submitted.stderr

    status = run_cli("status", job_id, env=cluster.env)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["job"]["state"] == "completed"
    assert shown["job"]["generation_id"] == result["generation_id"]
    assert shown["celery"]["state"] == "SUCCESS"
    assert API_KEY not in submitted.stdout + submitted.stderr + status.stdout + status.stderr


def test_a_raw_send_task_without_a_job_id_is_found_by_its_task_id(
    cluster: Cluster, simulator: object
) -> None:
    producer = Celery(
        "producer", broker=cluster.env["LIPSYNC_BROKER_URL"], backend=cluster.env["LIPSYNC_RESULT_BACKEND"]
    )
    request = {"sheet_id": 101, "cell_id": 3006, "video_resource_id": 5001, "audio_resource_id": 6001}
    sent = producer.send_task("lipsync.run", kwargs={"request": request}, queue="lipsync")
    assert sent.get(timeout=60)["job_id"] == sent.id
    status = run_cli("status", sent.id, env=cluster.env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["job"]["state"] == "completed"
    producer.close()


def test_submit_refuses_a_bad_request_naming_the_field(cluster: Cluster) -> None:
    bad = run_cli("submit", "--sheet", "101", "--cell", "3000", "--video", "5001", env=cluster.env)
    assert bad.returncode == 2
    assert "audio_resource_id" in bad.stderr


def test_demo_runs_on_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    demo = subprocess.run(
        [*CLI, "demo", "--jobs", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "2 of 2 jobs completed." in demo.stdout
    # The two jobs, and the Lipsync card's one generation for the latest of its three speech changes.
    assert "generations started: 1 (job card.102.3099.4099~3), for audio 6053" in demo.stdout
    outputs = sorted((tmp_path / "lipsync-output").glob("*.mp4"))
    assert len(outputs) == 3
    assert all(str(path) in demo.stdout for path in outputs)
    assert outputs[0].read_bytes()[4:8] == b"ftyp"
