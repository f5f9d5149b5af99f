"""What an operator sees of our jobs in a real Flower (2.2) watching the real worker.

Flower is started as its own process on the test cluster's broker, before any job runs (it builds
its view from task events, so it only knows what happened while it listened). The jobs of this
module run once, in :func:`history`, while the Flower API is sampled; the tests then read Flower's
HTTP API the way an operator's browser or script would.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import API_KEY, REPO, WEBHOOK_SECRET, Cluster, wait_for
from tests.integration.test_chain import request
from tests.webhook_receiver import WebhookReceiver
from worker.enqueue import enqueue
from worker.errors import LipsyncJobFailed

pytestmark = pytest.mark.integration

OUR_TASKS = {
    "lipsync.run",
    "lipsync.submit",
    "lipsync.poll",
    "lipsync.fetch_output",
    "lipsync.deliver_webhook",
    "lipsync.await_job",
}
#: Fields the custom progress events carry (tasks.lipsync._report).
PROGRESS_FIELDS = {"job_id", "generation_id", "gen_status", "polls", "model"}
RESULT_TIMEOUT = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Flower:
    base: str
    auth: tuple[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, *, auth: bool = True, **params: Any) -> requests.Response:
        return requests.get(self.base + path, params=params, auth=self.auth if auth else None, timeout=10)

    def json(self, path: str, **params: Any) -> Any:
        response = self.get(path, **params)
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(self.base + path, json=body, auth=self.auth, timeout=10)

    def tasks(self, **params: Any) -> dict[str, dict[str, Any]]:
        tasks: dict[str, dict[str, Any]] = self.json("/api/tasks", **params)
        return tasks

    def worker_name(self) -> str | None:
        alive = self.json("/api/workers", status=1)
        return next((name for name, up in alive.items() if name.startswith("w1@") and up), None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def flower(cluster: Cluster) -> Iterator[Flower]:
    """A real Flower on the cluster's broker, behind basic auth, listening on loopback only."""
    port = _free_port()
    log_path = cluster.tmp / "flower.log"
    password = secrets.token_urlsafe(18)
    command = [
        sys.executable,
        "-m",
        "celery",
        "--app=worker",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth=ops:{password}",
        "--persistent=False",
    ]
    env = {**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    flower = Flower(f"http://127.0.0.1:{port}", ("ops", password), process, log_path)
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"flower exited:\n{flower.log()[-3000:]}")
            try:
                return flower.get("/healthcheck", auth=False).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, timeout=20)
        # Listening to events: the worker's heartbeat has reached Flower's event state.
        wait_for(lambda: flower.worker_name() is not None, timeout=20, interval=0.2)
        yield flower
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class History:
    """The module's jobs and what Flower showed while the long one ran."""

    completed: dict[str, str]  # model -> job id; the sync_so one has a (signed) webhook callback
    failed: str
    long: str
    #: Flower's (task name, state) pairs for the long job's tasks, sampled while it ran.
    seen: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    #: The result backend's state of the long job, as Flower's /api/task/result returns it.
    backend_states: set[str] = field(default_factory=set)
    #: /api/task/info of the long job's lipsync.poll, read as soon as it was seen POLLING.
    polling_info: dict[str, Any] | None = None
    #: /api/task/info of the long job's lipsync.poll while it waits for its next poll (RETRY).
    retry_info: dict[str, Any] | None = None


@pytest.fixture(scope="module")
def history(cluster: Cluster, flower: Flower, _simulator_session: Any) -> Iterator[History]:
    sim = _simulator_session
    sim.reset()
    app = cluster.app()
    receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
    try:
        # Long enough (~8 polls at LIPSYNC_POLL_MAX_DELAY=0.5 s) to be watched mid-poll; a sync_so
        # job with a webhook and a failing one (video 5099: GEN fails the generation) run beside it.
        sim.durations = {"gen": 3.0, "sync_so": 1.2}
        long_job = enqueue(request(model="gen"), app=app)
        sync_so = enqueue(request(model="sync_so", callback={"webhook_url": receiver.url}), app=app)
        failing = enqueue(request(video_resource_id=5099), app=app)
        h = History(completed={"sync_so": sync_so.id}, failed=failing.id, long=long_job.id)
        _watch(flower, h, long_job)
        assert long_job.get(timeout=RESULT_TIMEOUT)["status"] == "completed"
        sim.durations = {"gen": 0.6, "sync_so": 1.2}
        gen = enqueue(request(model="gen"), app=app)
        h.completed["gen"] = gen.id
        for result in (sync_so, gen):
            assert result.get(timeout=RESULT_TIMEOUT)["status"] == "completed"
        with pytest.raises(LipsyncJobFailed, match="No face detected"):
            failing.get(timeout=RESULT_TIMEOUT)
        # Flower hears the last events a moment after the result backend has the result.
        wait_for(lambda: bool(receiver.received), timeout=10)
        wait_for(lambda: _chains_ended(flower, h), timeout=10, interval=0.2)
        yield h
    finally:
        sim.durations = {"gen": 0.6, "sync_so": 1.2}
        receiver.close()


def _watch(flower: Flower, h: History, result: Any) -> None:
    """Sample Flower as fast as it answers until the long job ends (every sample is one request)."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    n = 0
    while not result.ready() and time.monotonic() < deadline:
        n += 1
        if n % 10 == 0:
            h.backend_states.add(flower.json(f"/api/task/result/{h.long}")["state"])
            continue
        for task_id, task in flower.tasks(search=h.long).items():
            h.seen[(task["name"], task["state"])] += 1
            # lipsync.submit reports POLLING too (the job's stage once GEN accepted it): the info
            # under test is the poll task's.
            if task["name"] == "lipsync.poll" and task["state"] == "POLLING" and h.polling_info is None:
                h.polling_info = flower.json(f"/api/task/info/{task_id}")
            if (
                task["name"] == "lipsync.poll"
                and task["state"] == "RETRY"
                and (task.get("retries") or 0) >= 2
            ):
                h.retry_info = flower.json(f"/api/task/info/{task_id}")


def _chains_ended(flower: Flower, h: History) -> bool:
    """Flower has seen every task of the module's jobs end."""
    expected = {"lipsync.submit", "lipsync.poll", "lipsync.fetch_output"}
    wanted = {job_id: expected for job_id in (h.long, h.completed["gen"])}
    wanted[h.completed["sync_so"]] = expected | {"lipsync.deliver_webhook"}
    wanted[h.failed] = {"lipsync.submit", "lipsync.poll"}
    for job_id, names in wanted.items():
        states = {t["name"]: t["state"] for t in flower.tasks(search=job_id).values()}
        if not all(states.get(name) in ("SUCCESS", "FAILURE") for name in names):
            return False
    return True


# --------------------------------------------------------------------------------------------


def test_api_needs_credentials_and_lists_the_worker_with_our_tasks(flower: Flower) -> None:
    assert flower.get("/api/workers", auth=False).status_code == 401
    assert flower.get("/api/tasks", auth=False).status_code == 401
    assert requests.get(flower.base + "/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401

    workers = flower.json("/api/workers", refresh=1)
    name = flower.worker_name()
    assert name in workers
    assert set(workers[name]["registered"]) >= OUR_TASKS
    queues = {q["name"] for q in workers[name]["active_queues"]}
    assert queues == {"lipsync", "lipsync.fetch", "lipsync.callbacks"}


def test_tasks_have_readable_names_and_final_states(flower: Flower, history: History) -> None:
    for model, job_id in history.completed.items():
        # Flower's search box matches task ids, args, kwargs and results: the job id finds its tasks.
        tasks = flower.tasks(search=job_id)
        by_name = {t["name"]: t for t in tasks.values()}
        webhook = {"lipsync.deliver_webhook"} if model == "sync_so" else set()
        assert set(by_name) == {"lipsync.submit", "lipsync.poll", "lipsync.fetch_output", *webhook}
        assert {t["state"] for t in by_name.values()} == {"SUCCESS"}
        # The job id is the chain's last task: the helper sent the chain under it.
        assert tasks[job_id]["name"] == "lipsync.fetch_output"
        assert f"'job_id': '{job_id}'" in tasks[job_id]["result"]
        assert "'status': 'completed'" in tasks[job_id]["result"]

    failed = {t["name"]: t for t in flower.tasks(search=history.failed).values()}
    poll = failed["lipsync.poll"]
    assert poll["state"] == "FAILURE"
    assert poll["exception"].startswith("LipsyncJobFailed(")
    assert "No face detected in the source video" in poll["exception"]
    assert "generation_failed" in poll["exception"]
    assert failed["lipsync.submit"]["state"] == "SUCCESS"
    assert "lipsync.fetch_output" not in failed
    # The job id is the chain's last task, which never runs when the chain fails before it: the
    # worker sends a task-failed event for the job id, so the caller's row shows the failure too.
    # (Unnamed: no task of that name ran or was sent under it.)
    caller = flower.tasks(search=history.failed)[history.failed]
    assert caller["state"] == "FAILURE" and caller["name"] is None
    assert "No face detected in the source video" in caller["exception"]
    # ... while the result backend, which Flower's result endpoint reads, has the job's failure.
    answer = flower.json(f"/api/task/result/{history.failed}")
    assert answer["state"] == "FAILURE"
    assert "No face detected in the source video" in answer["result"]

    # The filters operators use.
    assert {t["name"] for t in flower.tasks(state="FAILURE").values()} == {"lipsync.poll", None}
    assert {t["state"] for t in flower.tasks(taskname="lipsync.submit").values()} == {"SUCCESS"}


def test_progress_of_a_running_job(flower: Flower, history: History) -> None:
    seen = history.seen
    # Our task-polling events reach Flower and set the poll task's state, but only for the moment
    # between the event and the task-retried event that follows it (milliseconds: a sample catches
    # it now and then, not every run), so what Flower counted is the proof that they arrive; while
    # GEN works the poll task is RETRY.
    assert _event_counts(flower)[("lipsync.poll", "task-polling")] >= 1
    assert seen[("lipsync.poll", "RETRY")] > seen[("lipsync.poll", "POLLING")], seen
    assert ("lipsync.submit", "STARTED") in seen, seen
    # The result backend holds the caller-level progress state, and Flower's result endpoint shows it.
    assert "POLLING" in history.backend_states, history.backend_states

    # The poll's row as Flower shows it: read while POLLING if a sample caught it, else now (the
    # event's fields, merged into Flower's task when it arrived, stay merged).
    info = history.polling_info
    if info is None:
        (poll_id,) = [i for i, t in flower.tasks(search=history.long).items() if t["name"] == "lipsync.poll"]
        info = flower.json(f"/api/task/info/{poll_id}")
    assert info["name"] == "lipsync.poll"
    assert isinstance(info["retries"], int)
    assert history.long in info["args"]
    # Visible for the whole wait: the retry's reason (generation id, GEN status, polls) and a short
    # argsrepr on re-queued polls, without the callback URL or metadata.
    waiting = history.retry_info
    assert waiting is not None
    assert waiting["exception"].startswith("StillRunning(")
    assert f"job={history.long}" in waiting["exception"]
    assert re.search(r"generation=\d+ gen_status=(pending|processing) polls=\d+", waiting["exception"])
    assert waiting["args"].startswith(f"(job={history.long} generation=")
    assert "webhook" not in waiting["args"]
    # Not visible: the event's own fields. Celery merges them into Flower's in-memory task, but
    # Task.as_dict() (task info, task list, task page) only serialises Task._fields.
    assert not PROGRESS_FIELDS & set(info), sorted(info)


def test_no_secret_reaches_flower(flower: Flower, history: History) -> None:
    pages = {
        "/api/tasks": flower.get("/api/tasks").text,
        "/api/workers": flower.get("/api/workers", refresh=1).text,
        "/metrics": flower.get("/metrics", auth=False).text,
    }
    for task_id in flower.tasks():
        pages[f"/api/task/info/{task_id}"] = flower.get(f"/api/task/info/{task_id}").text
    for job_id in (history.long, history.failed, *history.completed.values()):
        pages[f"/api/task/result/{job_id}"] = flower.get(f"/api/task/result/{job_id}").text
    assert len(pages) > 10
    for path, text in pages.items():
        assert API_KEY not in text, path
        assert WEBHOOK_SECRET not in text, path
        assert WEBHOOK_SECRET.removeprefix("whsec_") not in text, path


def test_metrics_are_unauthenticated_and_name_our_tasks(flower: Flower, history: History) -> None:
    response = flower.get("/metrics", auth=False)
    assert response.status_code == 200
    counts = _event_counts(flower)
    tasks = {task for task, _ in counts}
    assert {"lipsync.submit", "lipsync.poll", "lipsync.fetch_output"} <= tasks
    assert counts[("lipsync.submit", "task-polling")] >= 3
    assert counts[("lipsync.poll", "task-polling")] >= 3
    assert counts[("lipsync.fetch_output", "task-fetching")] >= 3
    assert counts[("lipsync.poll", "task-failed")] >= 1
    assert re.search(
        rf'^flower_worker_online\{{worker="{flower.worker_name()}"\}} 1\.0$', response.text, re.M
    )


def test_enqueue_through_flowers_rest_api(cluster: Cluster, flower: Flower, history: History) -> None:
    req = request(model="gen")
    body = {"kwargs": {"request": req}, "task_id": req["job_id"]}
    response = flower.post("/api/task/async-apply/lipsync.run", body)
    assert response.status_code == 200, response.text
    assert response.json()["task-id"] == req["job_id"]

    # With ?timeout= Flower waits for the result, but its "state" is the one read before waiting.
    waited = flower.json(f"/api/task/result/{req['job_id']}", timeout=RESULT_TIMEOUT)
    assert waited["result"]["status"] == "completed", waited
    answer = flower.json(f"/api/task/result/{req['job_id']}")
    assert answer["state"] == "SUCCESS", answer
    assert answer["result"] == waited["result"]
    assert answer["result"]["job_id"] == req["job_id"]
    assert cluster.app().AsyncResult(req["job_id"]).get(timeout=5) == answer["result"]

    # Without a task_id the task id is Flower's uuid4; the job id (from the request) is what
    # `lipsync-worker status` takes.
    req = request(model="sync_so")
    response = flower.post("/api/task/async-apply/lipsync.run", {"kwargs": {"request": req}})
    task_id = response.json()["task-id"]
    uuid.UUID(task_id)
    result = cluster.app().AsyncResult(task_id).get(timeout=RESULT_TIMEOUT)
    assert result["job_id"] == req["job_id"]


def test_the_compose_healthcheck_of_flower_passes_on_a_real_flower(flower: Flower) -> None:
    import yaml

    test = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["flower"]["healthcheck"][
        "test"
    ]
    assert test[:3] == ["CMD", "python", "-c"]
    port = flower.base.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-c", test[3].replace("5555", port)], timeout=30, capture_output=True
    )
    assert done.returncode == 0, done.stderr


def _event_counts(flower: Flower) -> dict[tuple[str, str], float]:
    """Flower's ``flower_events_total`` by (task name, event type)."""
    response = flower.get("/metrics", auth=False)
    assert response.status_code == 200
    counts: dict[tuple[str, str], float] = collections.defaultdict(float)
    for m in re.finditer(r"^flower_events_total\{(.*)\} (\S+)$", response.text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        counts[(labels["task"], labels["type"])] += float(m.group(2))
    return counts
