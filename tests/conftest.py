"""Fixtures that start real parts: a throwaway Redis, the GEN simulator, real Celery worker processes.

Nothing here talks to a service the machine happens to run: every server is started by the tests on
a free loopback port and stopped afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.dev.embedded_redis import EmbeddedRedis

API_KEY = "sk-test-SECRET-4f9a2c"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-webhook-secret-0123456789ab").decode()
AGENT_ID = "42"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def _simulator_session() -> Iterator[Any]:
    from gensim import GenSimulator

    sim = GenSimulator(api_key=API_KEY, agent_ids=(AGENT_ID,), durations={"gen": 0.6, "sync_so": 1.2})
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def simulator(_simulator_session: Any) -> Iterator[Any]:
    """The GEN simulator, with generations, faults and counters reset for each test."""
    _simulator_session.reset()
    _simulator_session.strict_dialect = False
    _simulator_session.output_size = 48_000
    _simulator_session.durations = {"gen": 0.6, "sync_so": 1.2}
    yield _simulator_session
    _simulator_session.clear_faults()


def worker_environment(redis_url: str, sim_url: str, storage: Path, **overrides: str) -> dict[str, str]:
    """Environment for worker processes (and for Settings in the test process)."""
    base = redis_url.rsplit("/", 1)[0]
    env = {
        "LIPSYNC_BROKER_URL": f"{base}/0",
        "LIPSYNC_RESULT_BACKEND": f"{base}/1",
        "LIPSYNC_REDIS_URL": f"{base}/2",
        "LIPSYNC_GEN_BASE_URL": sim_url,
        "LIPSYNC_GEN_API_KEY": API_KEY,
        "LIPSYNC_GEN_AGENT_ID": AGENT_ID,
        "LIPSYNC_STORAGE_DIR": str(storage),
        "LIPSYNC_ALLOW_PRIVATE_URLS": "true",
        "LIPSYNC_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "LIPSYNC_POLL_INITIAL_DELAY": "0.2",
        "LIPSYNC_POLL_MAX_DELAY": "0.5",
        "LIPSYNC_RETRY_MAX_DELAY": "0.5",
        "LIPSYNC_WEBHOOK_RETRY_DELAYS": "0.3,0.5,1",
        "LIPSYNC_JOB_TIMEOUT": "60",
        "LIPSYNC_RECOVERY_GRACE": "2",
        "LIPSYNC_QUEUED_RECOVERY": "20",
        "LIPSYNC_SWEEP_INTERVAL": "0.5",
    }
    env.update(overrides)
    return env


def start_celery(
    name: str, celery_args: list[str], env: dict[str, str], log_path: Path, *, loglevel: str = "INFO"
) -> subprocess.Popen[bytes]:
    """``python -m celery <args>`` as node ``name``, in its own process group (so a test can kill
    the whole worker), logging to ``log_path`` (appended)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        *celery_args,
        "-l",
        loglevel,
        "-n",
        f"{name}@%h",
        "--without-mingle",
    ]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL the whole worker: the main process and its pool children."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Cluster:
    """Everything one integration test needs: env, worker processes, and an app for enqueuing."""

    env: dict[str, str]
    tmp: Path
    redis_server: EmbeddedRedis
    workers: list[WorkerProcess] = field(default_factory=list)
    _app: Any = None

    @property
    def storage(self) -> Path:
        return Path(self.env["LIPSYNC_STORAGE_DIR"])

    def start_worker(
        self, name: str | None = None, *, concurrency: int = 2, queues: str | None = None, **env: str
    ) -> WorkerProcess:
        """A real ``celery worker`` process for our app, with this cluster's settings."""
        name = name or f"w{len(self.workers) + 1}"
        args = ["-A", "worker", "worker", "-c", str(concurrency)] + (["-Q", queues] if queues else [])
        worker = self._spawn(name, args, {**self.env, **env})
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker {name} exited:\n{worker.log()[-3000:]}")
        return worker

    def _spawn(self, name: str, celery_args: list[str], env: dict[str, str]) -> WorkerProcess:
        """Start ``celery <args>`` in its own process group and wait until it says it is ready."""
        log_path = self.tmp / f"{name}.log"
        process = start_celery(name, celery_args, env, log_path)
        spawned = WorkerProcess(name, process, log_path)
        self.workers.append(spawned)
        _wait_for(lambda: "ready." in spawned.log() or process.poll() is not None, timeout=60)
        return spawned

    def app(self) -> Any:
        """A Celery app on this cluster's broker, as a producing service would have."""
        if self._app is None:
            from worker.app import create_app

            self._app = create_app(self.settings())
        return self._app

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["LIPSYNC_REDIS_URL"])

    def start_consumer(self, queue: str = "media") -> WorkerProcess:
        """The downstream pipeline's own worker, consuming callbacks from its own queue."""
        args = ["-A", "tests.pipeline_consumer", "worker", "-c", "1", "-Q", queue]
        return self._spawn(f"pipeline-{queue}", args, {"PIPELINE_BROKER_URL": self.env["LIPSYNC_BROKER_URL"]})

    def received_callbacks(self) -> list[dict[str, Any]]:
        client = redis.Redis.from_url(self.env["LIPSYNC_BROKER_URL"])
        return [json.loads(item) for item in client.lrange("pipeline:received", 0, -1)]

    def settings(self) -> Any:
        from worker.settings import Settings

        return Settings.from_environ(self.env)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.redis_server.close()


def _wait_for(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def _new_cluster(sim: Any, tmp: Path, *, persistent: bool = False, **overrides: str) -> Cluster:
    tmp.mkdir(parents=True, exist_ok=True)
    server = EmbeddedRedis(persistent=persistent).start()
    env = worker_environment(server.url, sim.base_url, tmp / "outputs", **overrides)
    return Cluster(env=env, tmp=tmp, redis_server=server)


@pytest.fixture(scope="module")
def cluster(_simulator_session: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis of its own and one worker process, shared by the tests of a module."""
    c = _new_cluster(_simulator_session, tmp_path_factory.mktemp("cluster"))
    try:
        c.start_worker(concurrency=4)
        yield c
    finally:
        c.close()


@pytest.fixture
def make_cluster(_simulator_session: Any, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build a cluster with its own settings (and its own Redis, so workers never mix)."""
    made: list[Cluster] = []

    def factory(*, persistent: bool = False, **overrides: str) -> Cluster:
        c = _new_cluster(_simulator_session, tmp_path / f"c{len(made)}", persistent=persistent, **overrides)
        made.append(c)
        return c

    try:
        yield factory
    finally:
        for c in made:
            c.close()


wait_for = _wait_for
