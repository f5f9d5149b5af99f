"""A misconfigured worker refuses to start instead of failing every job it takes: real worker
processes, the GEN simulator over HTTP."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from gensim import GenSimulator
from tests.conftest import AGENT_ID, API_KEY, Cluster, start_celery, wait_for
from worker.dev.embedded_redis import free_port

pytestmark = pytest.mark.integration


def start(cluster: Cluster, tmp_path: Path, name: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    process = start_celery(name, ["-A", "worker", "worker", "-c", "1"], {**cluster.env, **env}, log)
    return process, log


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"LIPSYNC_GEN_API_KEY": ""}, "refusing to start: LIPSYNC_GEN_API_KEY is not set"),
        ({"LIPSYNC_GEN_API_KEY": "sk-revoked"}, "refusing to start: GEN refused LIPSYNC_GEN_API_KEY (401)"),
        (
            {"LIPSYNC_GEN_AGENT_ID": "777"},
            "refusing to start: GEN does not know agent LIPSYNC_GEN_AGENT_ID=777",
        ),
    ],
    ids=["no key", "key refused", "unknown agent"],
)
def test_a_worker_gen_would_not_serve_refuses_to_start(
    make_cluster: Any, simulator: Any, tmp_path: Path, env: dict[str, str], line: str
) -> None:
    cluster: Cluster = make_cluster()
    process, log = start(cluster, tmp_path, "refused", **env)
    assert process.wait(timeout=60) == 78
    text = log.read_text()
    assert line in text, text[-2000:]
    assert "Traceback" not in text and "ready." not in text
    assert API_KEY not in text


def test_a_worker_waits_for_an_unreachable_gen_then_starts(make_cluster: Any, tmp_path: Path) -> None:
    port = free_port()
    cluster: Cluster = make_cluster(
        LIPSYNC_GEN_BASE_URL=f"http://127.0.0.1:{port}", LIPSYNC_GEN_CONNECT_TIMEOUT="0.5"
    )
    process, log = start(cluster, tmp_path, "patient")
    try:
        wait_for(lambda: "waiting for GEN at" in log.read_text(), timeout=30)
        assert process.poll() is None, "a GEN outage must not stop (or crash-loop) a worker"
        with GenSimulator(port=port, api_key=API_KEY, agent_ids=(AGENT_ID,)):
            wait_for(lambda: "ready." in log.read_text(), timeout=90)
    finally:
        process.terminate()
        process.wait(timeout=30)
