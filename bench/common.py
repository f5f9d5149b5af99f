"""The parts every benchmark starts: an embedded Redis, the GEN simulator, real worker processes.

A :class:`Stack` is one deployment on loopback: a Redis of its own (broker, results, job records),
a GEN simulator (its own, or one shared with other stacks), worker processes started the way the
integration tests start them (``tests/conftest.py``: ``start_celery``, ``worker_environment``), and
a producer app that enqueues jobs through :func:`worker.enqueue.enqueue`. Every timing setting is at
its default (``tests.harness.default_timings``) unless a benchmark names an override.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import redis
from celery import Celery
from celery.result import AsyncResult

from bench.proc import CLOCK_TICKS, tree, tree_cpu_seconds, tree_rss_by_pid, tree_rss_bytes
from gensim import GenSimulator
from tests.conftest import AGENT_ID, API_KEY, REPO, start_celery, worker_environment
from tests.harness import default_timings
from worker.dev.embedded_redis import EmbeddedRedis
from worker.enqueue import enqueue
from worker.gen.client import idempotency_key_for
from worker.names import QUEUE_JOBS, TASK_RUN
from worker.settings import Settings

#: Workers log at this level, ours and the plain reference alike, so log formatting weighs the same
#: in both CPU figures (and a 10,000-job run does not write a gigabyte of INFO lines).
WORKER_LOGLEVEL = "WARNING"
#: The simulator's world: sheets 101-102, cells 3000-3099, videos 5001-5099, audios 6001-6099.
CELLS = 100
RESOURCES = 90


def simulator(durations: Mapping[str, float], *, output_size: int = 48_000) -> GenSimulator:
    """A started GEN simulator with our API key and agent, generations taking ``durations``."""
    return GenSimulator(
        api_key=API_KEY, agent_ids=(AGENT_ID,), durations=durations, output_size=output_size
    ).start()


def request_for(index: int, model: str = "gen") -> dict[str, Any]:
    """A valid lipsync request; ``index`` spreads jobs over the simulator's cells and resources."""
    return {
        "job_id": f"bench-{uuid.uuid4().hex[:16]}",
        "sheet_id": 101 + (index // CELLS) % 2,
        "cell_id": 3000 + index % CELLS,
        "video_resource_id": 5001 + index % RESOURCES,
        "audio_resource_id": 6001 + index % RESOURCES,
        "model": model,
    }


@dataclass
class Worker:
    """A worker process we started (its own process group: the main process and its pool)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_seconds(self) -> float:
        """CPU the worker's process tree has used so far (bench.proc)."""
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        """(CPU seconds of the main process, sum over its pool children, reaped ones included)."""
        stats = tree(self.pid)
        total = sum(stat.ticks for stat in stats)
        # The main process's own time; its cutime/cstime are children it reaped (pool processes).
        main = sum(stat.utime + stat.stime for stat in stats if stat.pid == self.pid)
        return main / CLOCK_TICKS, (total - main) / CLOCK_TICKS

    def rss_split(self) -> tuple[int, int]:
        """(RSS of the main process, sum over its pool children), bytes."""
        sizes = tree_rss_by_pid(self.pid)
        main = sizes.pop(self.pid, 0)
        return main, sum(sizes.values())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL the whole tree: the benchmarks throw their Redis away, nothing needs restoring."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@dataclass
class Job:
    """A job we enqueued: its id, its result, and when we asked (wall clock)."""

    job_id: str
    result: AsyncResult[Any]
    started_at: float

    @property
    def key(self) -> str:
        """The Idempotency-Key GEN sees on its generate request (how gen_seen finds it)."""
        return idempotency_key_for(self.job_id)


@dataclass
class Stack:
    """One deployment on loopback; see the module docstring. Use as a context manager."""

    name: str
    tmp: Path
    sim: GenSimulator
    #: Settings that differ from the defaults (LIPSYNC_POLL_LEARN=false for the "before" reference).
    overrides: Mapping[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    _redis: EmbeddedRedis | None = None
    _app: Celery | None = None
    _enqueued: int = 0

    def __enter__(self) -> Stack:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._redis = EmbeddedRedis().start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        assert self._redis is not None, "the stack is not started"
        return worker_environment(
            self._redis.url,
            self.sim.base_url,
            self.tmp / "outputs",
            **{**default_timings(), **self.overrides},
        )

    @property
    def app(self) -> Celery:
        """A producer's app on this stack's broker (worker.app.create_app with its settings)."""
        if self._app is None:
            from worker.app import create_app

            self._app = create_app(Settings.from_environ(self.env))
        return self._app

    def redis(self, db: int) -> redis.Redis:
        assert self._redis is not None
        return redis.Redis.from_url(self._redis.url.rsplit("/", 1)[0] + f"/{db}")

    def start_worker(
        self, *, concurrency: int = 2, app_module: str = "worker", name: str | None = None
    ) -> Worker:
        """A real ``celery worker`` (prefork, ``-c concurrency``); does not wait for it (see
        :meth:`wait_ready`), so several stacks can start their workers at once."""
        name = name or f"{self.name}-w{len(self.workers) + 1}"
        args = ["-A", app_module, "worker", "-c", str(concurrency)]
        log_path = self.tmp / f"{name}.log"
        process = start_celery(name, args, self.env, log_path, loglevel=WORKER_LOGLEVEL)
        worker = Worker(name, process, log_path)
        self.workers.append(worker)
        return worker

    def wait_ready(self, worker: Worker, timeout: float = 120) -> None:
        """Until the worker answers a ping on this stack's broker (its consumer is up)."""
        node = f"{worker.name}@{socket.gethostname()}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not worker.alive():
                raise RuntimeError(f"worker {worker.name} exited:\n{worker.log_tail()}")
            if self.app.control.ping(destination=[node], timeout=1.0):
                return
        raise TimeoutError(f"worker {worker.name} not ready after {timeout:.0f} s:\n{worker.log_tail()}")

    def enqueue(self, model: str = "gen") -> Job:
        """Enqueue one job through the producer helper, as a service would."""
        request = request_for(self._enqueued, model)
        self._enqueued += 1
        started_at = time.time()
        return Job(request["job_id"], enqueue(request, app=self.app), started_at)

    def send_by_hand(self, model: str = "gen") -> Job:
        """Send one job as a producer that does not import our code does: ``lipsync.run`` with
        the request (the worker opens the record, then replaces the task with the chain)."""
        request = request_for(self._enqueued, model)
        self._enqueued += 1
        started_at = time.time()
        sent = self.app.send_task(
            TASK_RUN, kwargs={"request": request}, task_id=request["job_id"], queue=QUEUE_JOBS
        )
        return Job(request["job_id"], sent, started_at)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        if self._redis is not None:
            self._redis.close()
            self._redis = None


def wait_ready_all(stacks_and_workers: Iterable[tuple[Stack, Worker]]) -> None:
    for stack, worker in stacks_and_workers:
        stack.wait_ready(worker)


def wait_results(results: Iterable[AsyncResult[Any]], timeout: float) -> tuple[int, int]:
    """Wait for every result, one after the other (one Redis read per check, so the waiting costs
    the machine little); return (succeeded, not succeeded: failed or still running at the timeout)."""
    deadline = time.monotonic() + timeout
    succeeded = failed = 0
    for result in results:
        while not result.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        if result.ready() and result.successful():
            succeeded += 1
        else:
            failed += 1
    return succeeded, failed


def machine() -> str:
    """One line: cores, Python, Celery, Redis server, the commit, and the date."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        ).stdout
        commit += " (with uncommitted changes)" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    with EmbeddedRedis() as server:
        redis_version = redis.Redis.from_url(server.url).info("server")["redis_version"]
    return (
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, Celery {celery.__version__}, "
        f"Redis {redis_version}; commit {commit}; {time.strftime('%Y-%m-%d %H:%M')}"
    )
