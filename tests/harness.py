"""Running jobs under faults and checking the invariants every scenario must keep.

The invariants (the same for every fault scenario):
1. every job reaches exactly one terminal state (one outcome in its record; its AsyncResult ready);
2. the simulator saw exactly one generation per job that reached GEN (per Idempotency-Key);
3. each job's outcome callback carries exactly one id, however often it was delivered.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.conftest import WEBHOOK_SECRET, Cluster
from tests.webhook_receiver import WebhookReceiver
from worker.enqueue import enqueue
from worker.errors import LipsyncJobFailed
from worker.jobs.records import JobRecord, JobStore


def make_request(receiver: WebhookReceiver | None = None, **overrides: Any) -> dict[str, Any]:
    n = uuid.uuid4().int
    cell = 3000 + n % 90
    request: dict[str, Any] = {
        "job_id": f"job-{uuid.uuid4().hex[:12]}",
        "sheet_id": 101,
        "cell_id": cell,
        "layer_id": cell + 1000,
        "video_resource_id": 5001 + n % 90,
        "audio_resource_id": 6001 + n % 90,
        "model": "gen",
    }
    if receiver is not None:
        request["callback"] = {"webhook_url": receiver.url}
    request.update(overrides)
    return {k: v for k, v in request.items() if v is not None}


@dataclass
class Run:
    cluster: Cluster
    sim: Any
    receiver: WebhookReceiver = field(default_factory=lambda: WebhookReceiver(secret=WEBHOOK_SECRET))
    results: dict[str, Any] = field(default_factory=dict)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def store(self) -> JobStore:
        return JobStore(self.cluster.redis(), ttl=3600)

    def submit(self, count: int = 1, **overrides: Any) -> list[str]:
        ids = []
        for _ in range(count):
            request = make_request(self.receiver, **overrides)
            self.requests[request["job_id"]] = request
            self.results[request["job_id"]] = enqueue(request, app=self.cluster.app())
            ids.append(request["job_id"])
        return ids

    def record(self, job_id: str) -> JobRecord | None:
        return self.store().get(job_id)

    def wait_state(self, job_id: str, *states: str, timeout: float = 30, min_polls: int = 0) -> JobRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.record(job_id)
            if record is not None and record.state in states and record.polls >= min_polls:
                return record
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} never reached {states}: {self.record(job_id)}")

    def outcomes(self, timeout: float = 90) -> dict[str, dict[str, Any]]:
        """Wait for every job's AsyncResult; return the outcome JSON per job id."""
        outcomes = {}
        deadline = time.monotonic() + timeout
        for job_id, result in self.results.items():
            try:
                outcomes[job_id] = result.get(timeout=max(1.0, deadline - time.monotonic()))
            except LipsyncJobFailed as exc:
                outcomes[job_id] = exc.failure
        return outcomes

    def check_invariants(self, outcomes: dict[str, dict[str, Any]], *, callbacks: bool = True) -> None:
        store = self.store()
        for job_id, outcome in outcomes.items():
            record = store.get(job_id)
            assert record is not None, job_id
            assert record.outcome == outcome, f"{job_id}: recorded {record.outcome} != returned {outcome}"
        stats = self.sim.stats()
        for key, generations in stats["generations_by_key"].items():
            assert len(generations) == 1, f"{key} created {len(generations)} generations"
        reached = [o for o in outcomes.values() if o.get("generation_id")]
        assert stats["generations_created"] == len(reached), (stats["generations_created"], len(reached))
        if callbacks:
            wanted = {f"{job_id}.outcome" for job_id in outcomes}
            deadline = time.monotonic() + 30
            while not wanted <= set(self.receiver.ids()) and time.monotonic() < deadline:
                time.sleep(0.1)
            by_job: dict[str, set[str]] = defaultdict(set)
            for received in self.receiver.received:
                assert received.verified
                by_job[received.payload["job_id"]].add(received.msg_id)
            for job_id in outcomes:
                outcome_ids = {i for i in by_job[job_id] if i.endswith(".outcome")}
                assert outcome_ids == {f"{job_id}.outcome"}, (job_id, by_job[job_id])

    def close(self) -> None:
        self.receiver.close()
