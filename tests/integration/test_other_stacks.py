"""The enqueue examples for services that do not use this package: raw Redis, and Node.js.

Each runs as its own process against the module's cluster (throwaway Redis, real worker, GEN
simulator), exactly as the example READMEs tell a user to run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Cluster

pytestmark = pytest.mark.integration

EXAMPLES = REPO / "examples"
NODE_EXAMPLE = EXAMPLES / "node"
RESULT_TIMEOUT = 60
# The subprocess gets a little longer than the job, so the example's own timeout fires first.
PROCESS_TIMEOUT = RESULT_TIMEOUT + 15
NPM_TIMEOUT = 300


def request(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": f"other-{uuid.uuid4().hex[:12]}",
        "sheet_id": 101,
        "cell_id": 3010,
        "layer_id": 4010,
        "video_resource_id": 5010,
        "audio_resource_id": 6010,
        "model": "gen",
        "metadata": {"stack": "other"},
    }
    base.update(overrides)
    return base


def last_json_line(stdout: str) -> dict[str, Any]:
    """The examples print exactly one JSON document on stdout (progress goes to stderr)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "nothing on stdout"
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def test_raw_redis_example_enqueues_a_job_that_completes(
    cluster: Cluster, simulator: Any, tmp_path: Path
) -> None:
    req = request()
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(req))
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "raw_redis_enqueue.py"),
            "--broker",
            cluster.env["LIPSYNC_BROKER_URL"],
            "--backend",
            cluster.env["LIPSYNC_RESULT_BACKEND"],
            "--timeout",
            str(RESULT_TIMEOUT),
            str(request_file),
        ],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = last_json_line(proc.stdout)
    assert result["status"] == "completed", proc.stdout + proc.stderr
    assert result["job_id"] == req["job_id"]
    assert result["metadata"] == req["metadata"]
    # The job id doubled as the task id, so Celery's own client finds the same result.
    assert cluster.app().AsyncResult(req["job_id"]).get(timeout=5) == result


def test_example_request_file_is_a_valid_request() -> None:
    from worker.jobs.models import LipsyncRequest

    LipsyncRequest.parse(json.loads((EXAMPLES / "request.json").read_text()))


@pytest.fixture(scope="module")
def node_example() -> Path:
    """The Node example with its dependencies installed (once: kept in its git-ignored node_modules)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the Node.js example (not on PATH)")
    # npm writes the package's manifest last-ish; its presence means a finished install.
    if not (NODE_EXAMPLE / "node_modules" / "celery-node" / "package.json").exists():
        lock = (NODE_EXAMPLE / "package-lock.json").exists()
        command = [npm, "ci" if lock else "install", "--no-audit", "--no-fund"]
        proc = subprocess.run(
            command, cwd=NODE_EXAMPLE, capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False
        )
        assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
    return NODE_EXAMPLE


def run_node(example: Path, cluster: Cluster, req: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BROKER_URL": cluster.env["LIPSYNC_BROKER_URL"],
        "RESULT_BACKEND": cluster.env["LIPSYNC_RESULT_BACKEND"],
        "RESULT_TIMEOUT": str(RESULT_TIMEOUT),
    }
    return subprocess.run(
        [shutil.which("node") or "node", "enqueue.js", json.dumps(req)],
        cwd=example,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def test_node_example_enqueues_a_job_and_prints_its_result(
    node_example: Path, cluster: Cluster, simulator: Any
) -> None:
    req = request(cell_id=3011, layer_id=4011, model="sync_so")
    proc = run_node(node_example, cluster, req)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = last_json_line(proc.stdout)
    assert result["status"] == "completed", proc.stdout + proc.stderr
    assert result["job_id"] == req["job_id"]
    assert result["model"] == "sync_so"
    assert result["metadata"] == req["metadata"]
    assert Path(result["output"]["path"]).read_bytes() == simulator.output_bytes(result["generation_id"])


def test_node_example_reports_a_bad_request_and_exits_non_zero(
    node_example: Path, cluster: Cluster, simulator: Any
) -> None:
    req = request(model="wav2lip")
    proc = run_node(node_example, cluster, req)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    failure = last_json_line(proc.stdout)
    assert failure["status"] == "rejected", proc.stdout + proc.stderr
    assert failure["error_code"] == "validation_error"
    assert failure["job_id"] == req["job_id"]
    assert [e["field"] for e in failure["errors"]] == ["model"]
    assert "validation_error" in proc.stderr and "model" in proc.stderr
    assert simulator.stats()["generations_created"] == 0, "nothing reached GEN"
