"""The reference client: GEN's TypeScript SDK polling loop, in plain Python.

The SDK's ``waitForGeneration`` gets the generation, returns when it is ``completed``, and otherwise
sleeps ``pollIntervalMs`` (2000 by default, fixed, no backoff) and asks again. This client does the
same for many jobs at once against the simulator: ``POST .../generate`` (the current vidsheet body,
with the video and audio URLs the caller already has, so no resource lookups), ``GET`` the status
at once and then 2 s after each answer, then ``GET`` the output (read and discarded).

One job is one Python "client"; they share a few threads (a due-time heap and a thread pool), so a
thousand of them do not need a thousand threads. Each job sends an ``Idempotency-Key`` of its own,
only so that what GEN saw can be attributed to it (:mod:`bench.gen_seen`); the SDK sends none.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

#: The SDK's default ``pollIntervalMs``.
SDK_INTERVAL = 2.0


@dataclass
class ReferenceJob:
    """One generation driven by the reference client."""

    key: str
    #: Wall-clock time just before its generate request.
    started_at: float
    generation_id: str | None = None
    done: bool = False
    error: str | None = None


class FixedIntervalPoller:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        agent_id: str,
        *,
        interval: float = SDK_INTERVAL,
        threads: int = 8,
        model: str = "gen",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.interval = interval
        self.model = model
        self._headers = {"X-API-Key": api_key}
        self._agent = agent_id
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdk-poller")
        self._due: list[tuple[float, int, ReferenceJob, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._local = threading.local()
        self._scheduler = threading.Thread(target=self._run, name="sdk-poller-clock", daemon=True)
        self._scheduler.start()

    # ------------------------------------------------------------------ the SDK loop, per job

    def start(self, target: tuple[int, int], resources: tuple[int, int]) -> ReferenceJob:
        """Start one job now on ``target`` (sheet, cell) with ``resources`` (video, audio ids)."""
        job = ReferenceJob(key=f"sdk-{uuid.uuid4().hex}", started_at=time.time())
        self._at(time.monotonic(), job, lambda: self._generate(job, target, resources))
        return job

    def _generate(self, job: ReferenceJob, target: tuple[int, int], resources: tuple[int, int]) -> None:
        sheet, cell = target
        video, audio = resources
        body = {
            "generation_type": "lipsync",
            "data": {
                "talking_avatar_video_data": {
                    "video": {"value": f"{self.base_url}/cdn/uploads/{video}.mp4"},
                    "audio": {"value": f"{self.base_url}/cdn/uploads/{audio}.mp3"},
                },
                "lip_sync_model": "sync.so" if self.model == "sync_so" else self.model,
            },
        }
        response = self._session().post(
            f"{self.base_url}/v1/vidsheet/{sheet}/cells/{cell}/generate",
            params={"agent_id": self._agent},
            headers={**self._headers, "Idempotency-Key": job.key},
            json=body,
            timeout=30,
        )
        if not response.ok:
            self._fail(job, f"generate answered {response.status_code}")
            return
        job.generation_id = str(response.json()["generation_id"])
        self._status(job)

    def _status(self, job: ReferenceJob) -> None:
        response = self._session().get(
            f"{self.base_url}/v1/generations/{job.generation_id}", headers=self._headers, timeout=30
        )
        if not response.ok:
            self._fail(job, f"status answered {response.status_code}")  # the SDK throws, no retry
            return
        generation = response.json()
        status = generation["status"]
        if status == "completed":
            self._download(job, generation["output_resources"][0]["url"])
        elif status in ("failed", "stopped"):
            self._fail(job, f"generation {status}")
        else:
            self._at(time.monotonic() + self.interval, job, lambda: self._status(job))

    def _download(self, job: ReferenceJob, url: str) -> None:
        with self._session().get(url, stream=True, timeout=30) as response:
            if not response.ok:
                self._fail(job, f"output answered {response.status_code}")
                return
            for _chunk in response.iter_content(256 * 1024):
                pass
        job.done = True

    def _fail(self, job: ReferenceJob, error: str) -> None:
        job.error = error
        job.done = True

    # ------------------------------------------------------------------ plumbing

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _at(self, due: float, job: ReferenceJob, action: Callable[[], None]) -> None:
        with self._wake:
            heapq.heappush(self._due, (due, next(self._seq), job, action))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (not self._due or self._due[0][0] > time.monotonic()):
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._wake.wait(timeout)
                if self._stopping:
                    return
                _, _, job, action = heapq.heappop(self._due)
            self._pool.submit(self._guarded, job, action)

    def _guarded(self, job: ReferenceJob, action: Callable[[], None]) -> None:
        try:
            action()
        except requests.RequestException as exc:
            self._fail(job, type(exc).__name__)  # the SDK throws: the job ends without its output

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._scheduler.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> FixedIntervalPoller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
