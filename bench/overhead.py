"""Orchestration cost, as ratios measured in one run on this machine (reliability-and-performance.md §B5):

1. overhead vs upstream latency: (T_end_to_end - L - T_download) / L per job, where L is the
   generation's duration on the simulator; the floor from polling alone is about p / (2 L);
2. GEN calls per completed job / the minimum (1 generate + 1 terminal status = 2);
3. in-flight jobs per worker process slot (a sleep-in-task design scores at most 1);
4. peak extra RSS of a process downloading a large output / the output size.

    .venv/bin/python -m bench.overhead [--jobs 40] [--latency 5] [--download-mb 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gensim import GenSimulator
from tests.conftest import API_KEY, REPO, start_celery, worker_environment
from worker.app import create_app
from worker.dev.embedded_redis import EmbeddedRedis
from worker.enqueue import enqueue
from worker.settings import Settings


def measure_jobs(jobs: int, latency: float, poll: float, tmp: Path) -> dict[str, Any]:
    with (
        EmbeddedRedis() as redis_server,
        GenSimulator(
            api_key=API_KEY, agent_ids=("42",), durations={"gen": latency, "sync_so": latency}
        ) as sim,
    ):
        env = worker_environment(
            redis_server.url,
            sim.base_url,
            tmp / "outputs",
            LIPSYNC_POLL_INITIAL_DELAY=str(poll),
            LIPSYNC_POLL_MAX_DELAY=str(poll),
            LIPSYNC_POLL_JITTER="0",
        )
        app = create_app(Settings.from_environ(env))
        concurrency = 2
        args = ["-A", "worker", "worker", "-c", str(concurrency)]
        worker = start_celery("bench", args, env, tmp / "worker.log", loglevel="WARNING")
        try:
            while not app.control.ping(timeout=0.5):
                time.sleep(0.2)
            started = time.monotonic()
            results = [
                enqueue(
                    {
                        "sheet_id": 101,
                        "cell_id": 3000 + i % 100,
                        "video_resource_id": 5001,
                        "audio_resource_id": 6001,
                        "model": "gen",
                    },
                    app=app,
                )
                for i in range(jobs)
            ]
            peak_in_flight = 0
            while not all(r.ready() for r in results):
                in_flight = sum(
                    1
                    for g in sim.stats()["generations_by_key"].values()
                    for gid in g
                    if sim.generation(gid)["status"] in ("pending", "processing")
                )
                peak_in_flight = max(peak_in_flight, in_flight)
                time.sleep(0.1)
            wall = time.monotonic() - started
            outcomes = [r.get() for r in results]
        finally:
            worker.terminate()
            worker.wait(timeout=30)
        stats = sim.stats()["counts"]
        overheads = [
            (o["timings"]["total_seconds"] - latency - (o["timings"]["fetch_seconds"] or 0)) / latency
            for o in outcomes
        ]
        calls = stats["generate"] + stats["get_generation"]
        return {
            "jobs": jobs,
            "latency": latency,
            "poll": poll,
            "wall": wall,
            "overhead_median": statistics.median(overheads),
            "overhead_p95": sorted(overheads)[int(0.95 * (len(overheads) - 1))],
            "floor": poll / (2 * latency),
            "calls_per_job": calls / jobs,
            "calls_ratio": calls / jobs / 2,
            "in_flight_per_slot": peak_in_flight / concurrency,
        }


def measure_download(size_mb: int, tmp: Path) -> dict[str, float]:
    """Download one large output in a fresh process and report its peak RSS against the size."""
    with GenSimulator(
        api_key=API_KEY, agent_ids=("42",), durations={"gen": 0.1}, output_size=size_mb * 1024 * 1024
    ) as sim:
        import requests

        headers = {"X-API-Key": API_KEY}
        created = requests.post(
            f"{sim.base_url}/v1/autocontentengine/101/cells/3000/generate",
            params={"agent_id": "42"},
            headers=headers,
            json={
                "generation_type": "lipsync",
                "data": {"model": "gen", "video_resource_id": "5001", "audio_resource_id": "6001"},
            },
            timeout=10,
        ).json()
        time.sleep(0.3)
        generation = requests.get(
            f"{sim.base_url}/v1/generations/{created['generation_id']}", headers=headers, timeout=10
        ).json()
        url = generation["output_resources"][0]["url"]
        sim.output_bytes(created["generation_id"])  # build it before timing
        code = (
            "import resource,sys,time,requests\n"
            "from pathlib import Path\n"
            "from worker.output.download import download, DownloadLimits\n"
            "before=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "t=time.monotonic()\n"
            "limits=DownloadLimits(max_bytes=10**12, total_timeout=600, allow_private=True)\n"
            f"d=download({url!r}, dest_dir=Path({str(tmp)!r}), limits=limits, session=requests.Session())\n"
            "el=time.monotonic()-t\n"
            "after=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(before, after, d.size_bytes, el)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        before, after, size, elapsed = out.stdout.split()
        extra_mb = (int(after) - int(before)) / 1024
        return {
            "size_mb": int(size) / 2**20,
            "extra_rss_mb": extra_mb,
            "rss_ratio": extra_mb / (int(size) / 2**20),
            "throughput_mb_s": int(size) / 2**20 / float(elapsed),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--latency", type=float, default=5.0)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--download-mb", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        j = measure_jobs(args.jobs, args.latency, args.poll, Path(tmp))
        d = measure_download(args.download_mb, Path(tmp))
    print(
        f"machine: {os.cpu_count()} cores; one worker process, concurrency 2; GEN = the simulator on loopback"
    )
    print(
        f"jobs {j['jobs']} with L = {j['latency']:.1f} s, poll every {j['poll']:.1f} s: "
        f"wall {j['wall']:.1f} s"
    )
    print(
        f"1. overhead / L          median {j['overhead_median']:.3f}, p95 {j['overhead_p95']:.3f} "
        f"(poll-phase floor p/2L = {j['floor']:.3f})"
    )
    print(f"2. GEN calls per job     {j['calls_per_job']:.1f} = {j['calls_ratio']:.1f} x the minimum of 2")
    print(
        f"3. in-flight per slot    {j['in_flight_per_slot']:.1f} generations per worker process slot "
        "(sleeping design: <= 1)"
    )
    print(
        f"4. download {d['size_mb']:.0f} MB       peak extra RSS {d['extra_rss_mb']:.1f} MB "
        f"= {100 * d['rss_ratio']:.2f}% of the size; {d['throughput_mb_s']:.0f} MB/s with sha256"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
