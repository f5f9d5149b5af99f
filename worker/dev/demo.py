"""``lipsync-worker demo``: the whole product on one machine, with nothing installed by hand.

Without ``LIPSYNC_BROKER_URL`` it starts an embedded Redis; without ``LIPSYNC_GEN_BASE_URL`` it
starts the GEN simulator. Then it starts a real worker process, enqueues a few jobs (both models,
layer and cell endpoints), shows their progress and prints where the videos are.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker.dev.demo_cards import run_card_demo
from worker.dev.embedded_redis import EmbeddedRedis
from worker.errors import LipsyncJobFailed

DEMO_API_KEY = "demo-simulator-key"


@contextlib.contextmanager
def _broker() -> Iterator[str]:
    configured = os.environ.get("LIPSYNC_BROKER_URL")
    if configured:
        print(f"broker: {configured} (LIPSYNC_BROKER_URL)")
        yield configured
        return
    with EmbeddedRedis() as server:
        print(f"broker: embedded Redis at {server.url} ({server.binary})")
        yield server.url


@contextlib.contextmanager
def _gen() -> Iterator[dict[str, str]]:
    if os.environ.get("LIPSYNC_GEN_BASE_URL"):
        print(f"GEN: {os.environ['LIPSYNC_GEN_BASE_URL']} (LIPSYNC_GEN_BASE_URL)")
        yield {}
        return
    from gensim import GenSimulator

    with GenSimulator(api_key=DEMO_API_KEY, agent_ids=("42",), durations={"gen": 3.0, "sync_so": 6.0}) as sim:
        print(f"GEN: simulator at {sim.base_url} (gen ~3 s, sync_so ~6 s per generation)")
        yield {
            "LIPSYNC_GEN_BASE_URL": sim.base_url,
            "LIPSYNC_GEN_API_KEY": DEMO_API_KEY,
            "LIPSYNC_GEN_AGENT_ID": "42",
            # The simulator's CDN is on loopback, which the SSRF guard refuses by default.
            "LIPSYNC_ALLOW_PRIVATE_URLS": "true",
            "LIPSYNC_POLL_INITIAL_DELAY": "1",
            "LIPSYNC_POLL_MAX_DELAY": "2",
        }


def _demo_requests(count: int) -> list[dict[str, Any]]:
    shapes: list[dict[str, Any]] = [
        {"model": "gen", "layer_id": None},
        {"model": "sync_so", "layer_id": "layer"},
        {"model": "gen", "layer_id": "layer"},
        {"model": "sync_so", "layer_id": None},
    ]
    stamp = time.strftime("%H%M%S")
    requests = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        cell = 3000 + i % 100
        request: dict[str, Any] = {
            "job_id": f"demo-{stamp}-{i + 1}",
            "sheet_id": 101,
            "cell_id": cell,
            "video_resource_id": 5001 + i % 90,
            "audio_resource_id": 6001 + i % 90,
            "model": shape["model"],
            "metadata": {"demo": True, "n": i + 1},
        }
        if shape["layer_id"]:
            request["layer_id"] = cell + 1000
        requests.append(request)
    return requests


def run_demo(*, jobs: int, out: Path | None) -> int:
    from worker.app import create_app
    from worker.enqueue import enqueue
    from worker.settings import Settings

    with _broker() as broker, _gen() as gen_env:
        base = broker.rsplit("/", 1)[0]
        env = {
            "LIPSYNC_BROKER_URL": broker,
            "LIPSYNC_RESULT_BACKEND": os.environ.get("LIPSYNC_RESULT_BACKEND", f"{base}/1"),
            **gen_env,
        }
        if out is not None:
            env["LIPSYNC_STORAGE_DIR"] = str(out)
        settings = Settings.from_environ({**os.environ, **env})
        app = create_app(settings)
        with _worker_process(env) as worker:
            _wait_for_worker(app, worker)
            results = [enqueue(r, app=app) for r in _demo_requests(jobs)]
            print(f"\nenqueued {len(results)} jobs; progress:")
            _show_progress(results)
            failed = _summary(results)
            return run_card_demo(app) or failed


@contextlib.contextmanager
def _worker_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-l", "WARNING", "-c", "4"]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_for_worker(app: Any, worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            err = worker.stderr.read().decode(errors="replace") if worker.stderr else ""
            raise RuntimeError(f"the worker exited:\n{err[-2000:]}")
        if app.control.ping(timeout=0.5):
            print("worker: 1 process, concurrency 4, ready")
            return
    raise RuntimeError("the worker did not become ready in time")


def _show_progress(results: list[Any]) -> None:
    last: dict[str, str] = {}
    while True:
        for result in results:
            line = _describe(result)
            if last.get(result.id) != line:
                last[result.id] = line
                print(f"  {time.strftime('%H:%M:%S')}  {line}")
        if all(r.ready() for r in results):
            return
        time.sleep(0.2)


def _describe(result: Any) -> str:
    state = result.state
    info = result.info if isinstance(result.info, dict) else {}
    detail = ""
    if info.get("generation_id"):
        detail = f"generation {info['generation_id']}"
        if info.get("gen_status"):
            detail += f", GEN {info['gen_status']}"
    return f"{result.id:<22} {state:<10} {detail}"


def _summary(results: list[Any]) -> int:
    print("\nresults:")
    failures = 0
    for result in results:
        try:
            outcome = result.get(timeout=5)
        except LipsyncJobFailed as exc:
            failures += 1
            f = exc.failure
            print(f"  {result.id:<22} {f['status']}: {f['error_code']}: {f['message']}")
            continue
        output = outcome["output"]
        print(
            f"  {result.id:<22} {outcome['model']:<8} {output['size_bytes']:>8} bytes  "
            f"sha256 {output['sha256'][:12]}…  {output['path']}"
        )
    print(f"\n{len(results) - failures} of {len(results)} jobs completed.")
    return 1 if failures else 0
