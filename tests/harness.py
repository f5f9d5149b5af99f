"""Running jobs under faults and checking the invariants every scenario must keep.

The invariants (the same for every fault scenario), each counted by the party that would pay for a
violation, never by our own bookkeeping (an Idempotency-Key or a webhook id is one per job by
construction, so counting by them proves nothing):

1. every job reaches exactly one terminal state (one outcome in its record; its AsyncResult ready);
2. GEN created exactly one generation for each job that reached it, counted on GEN's side: every job
   gets a target (sheet, cell, layer) of its own, and the simulator counts the generations created
   on each target (``generations_by_target``);
3. each job's outcome webhook reached the receiver, under exactly one id (the outcome's webhook id
   is ``{job_id}.outcome`` by construction, so that alone proves little), and every delivery of it
   carries the job's recorded outcome: two different outcomes under one id fail. Repeated
   deliveries (the same webhook taken again: at least once, after a worker died mid-POST) are
   counted by the receiver (``deliveries``, :attr:`Callbacks.repeated`), and a test may bound them.

Recovery from a killed worker is measured from the other side too (:func:`recoveries`): what the
killed node held is read from the job records (``held_by``) just before the kill, and each job's
re-drive is the first request the simulator (or the webhook receiver) saw for it after the kill.
"""

from __future__ import annotations

import itertools
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from gensim.stats import target_key
from tests.conftest import WEBHOOK_SECRET, Cluster
from tests.webhook_receiver import WebhookReceiver
from worker.enqueue import enqueue
from worker.errors import LipsyncJobFailed
from worker.jobs.records import JobRecord, JobStore
from worker.names import ACTIVE_JOBS_KEY, JOB_KEY_PREFIX, WEBHOOK_KEY_PREFIX, WEBHOOKS_PENDING_KEY
from worker.settings import Settings

#: The settings the other integration tests shorten (tests/conftest.py worker_environment).
SHORTENED = (
    "recovery_grace",
    "queued_recovery",
    "sweep_interval",
    "poll_initial_delay",
    "poll_max_delay",
    "retry_max_delay",
    "webhook_retry_delays",
    "job_timeout",
)
#: What a test cluster's environment may set besides defaults: where things are, and secrets.
WHERE = frozenset(
    {
        "LIPSYNC_BROKER_URL",
        "LIPSYNC_RESULT_BACKEND",
        "LIPSYNC_REDIS_URL",
        "LIPSYNC_GEN_BASE_URL",
        "LIPSYNC_GEN_API_KEY",
        "LIPSYNC_GEN_AGENT_ID",
        "LIPSYNC_STORAGE_DIR",
        "LIPSYNC_ALLOW_PRIVATE_URLS",
        "LIPSYNC_WEBHOOK_SECRET",
    }
)


def default_timings() -> dict[str, str]:
    """Environment that puts every :data:`SHORTENED` setting back to its default, explicitly
    (``LIPSYNC_RECOVERY_GRACE=60``...). Heartbeat and dead-after are never set by the tests."""
    env = {}
    for name in SHORTENED:
        value = Settings.model_fields[name].get_default(call_default_factory=True)
        text = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
        env[f"LIPSYNC_{name.upper()}"] = text
    return env


def assert_default_timings(env: Mapping[str, str]) -> None:
    """Nothing but where things are differs from a default Settings; heartbeat and dead-after unset."""
    where = {k: v for k, v in env.items() if k in WHERE}
    assert Settings.from_environ(env) == Settings.from_environ(where), "a timing differs from its default"
    assert not {"LIPSYNC_HEARTBEAT_INTERVAL", "LIPSYNC_NODE_DEAD_AFTER"} & env.keys()


#: Every target the simulator's world has: two sheets x cells 3000-3099, on the cell or its layer.
TARGETS: tuple[tuple[int, int, int | None], ...] = tuple(
    (sheet, cell, layer)
    for sheet in (101, 102)
    for cell in range(3000, 3100)
    for layer in (cell + 1000, None)
)
_next_target = itertools.count()


def make_request(receiver: WebhookReceiver | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid request on some target (not necessarily its own: see :func:`own_target`)."""
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


def own_target(index: int | None = None) -> dict[str, Any]:
    """Request fields for a target of its own (the next one, or ``TARGETS[index % 400]``): no two
    jobs share one until 400 were handed out in this process."""
    sheet, cell, layer = TARGETS[(next(_next_target) if index is None else index) % len(TARGETS)]
    return {"sheet_id": sheet, "cell_id": cell, "layer_id": layer}


def target_of(request: Mapping[str, Any]) -> str:
    """The simulator's name (``generations_by_target``) for the target a request asks for."""
    return target_key(request["sheet_id"], request["cell_id"], request.get("layer_id"))


def generations_by_job(
    stats: Mapping[str, Any], requests: Mapping[str, Mapping[str, Any]]
) -> dict[str, list[int]]:
    """The generations GEN created on each job's target (from a simulator ``stats()``)."""
    by_target: Mapping[str, list[int]] = stats["generations_by_target"]
    return {job_id: list(by_target.get(target_of(request), [])) for job_id, request in requests.items()}


@dataclass
class Callbacks:
    """What the webhook receiver saw, per job."""

    #: job id -> the distinct webhook ids it received for that job.
    ids: dict[str, set[str]]
    #: job id -> how many times it took the job's outcome webhook.
    deliveries: dict[str, int]
    #: job id -> when it first took the job's outcome webhook (epoch seconds).
    delivered_at: dict[str, float]
    #: job id (from the webhook id ``{job_id}.outcome``) -> the payload of each delivery of it.
    payloads: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def of(cls, receiver: WebhookReceiver) -> Callbacks:
        ids: dict[str, set[str]] = defaultdict(set)
        deliveries: dict[str, int] = defaultdict(int)
        delivered_at: dict[str, float] = {}
        payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for job_id, received in receiver.deliveries().items():
            for item in received:
                ids[job_id].add(item.msg_id)
                if item.msg_id == f"{job_id}.outcome":
                    deliveries[job_id] += 1
                    delivered_at[job_id] = min(delivered_at.get(job_id, item.at), item.at)
                if item.msg_id.endswith(".outcome"):
                    payloads[item.msg_id.removesuffix(".outcome")].append(item.payload)
        return cls(dict(ids), dict(deliveries), delivered_at, dict(payloads))

    @property
    def repeated(self) -> int:
        """Outcome webhooks the receiver took more than once (same id), beyond the first."""
        return sum(max(0, n - 1) for n in self.deliveries.values())

    def conflicting(self, outcomes: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Per job, the deliveries of its outcome webhook whose payload is not its recorded outcome."""
        wrong = {}
        for job_id, outcome in outcomes.items():
            differing = [p for p in self.payloads.get(job_id, []) if p != outcome]
            if differing:
                wrong[job_id] = differing
        return wrong


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
        """Enqueue ``count`` jobs, each on a target of its own (unless ``overrides`` name one)."""
        ids = []
        for _ in range(count):
            request = make_request(self.receiver, **{**own_target(), **overrides})
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

    def check_invariants(
        self,
        outcomes: dict[str, dict[str, Any]],
        *,
        callbacks: bool = True,
        wait: float = 30,
        max_repeated: int | None = None,
    ) -> Callbacks:
        """Assert the three invariants (see the module docstring); return what the receiver saw, so
        a test can assert how often each webhook was delivered (at least once: a worker killed
        mid-POST delivers it again). ``max_repeated``: at most this many repeated deliveries."""
        store = self.store()
        for job_id, outcome in outcomes.items():
            record = store.get(job_id)
            assert record is not None, job_id
            assert record.outcome == outcome, f"{job_id}: recorded {record.outcome} != returned {outcome}"
        stats = self.sim.stats()
        created = generations_by_job(stats, {j: self.requests[j] for j in outcomes})
        for job_id, outcome in outcomes.items():
            wanted = 1 if outcome.get("generation_id") else 0
            assert len(created[job_id]) == wanted, (
                f"{job_id}: GEN created {created[job_id]} on its target {target_of(self.requests[job_id])}"
            )
        reached = [o for o in outcomes.values() if o.get("generation_id")]
        assert stats["generations_created"] == len(reached), (stats["generations_created"], len(reached))
        if not callbacks:
            return Callbacks({}, {}, {})
        wanted_ids = {f"{job_id}.outcome" for job_id in outcomes}
        deadline = time.monotonic() + wait
        while not wanted_ids <= set(self.receiver.ids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(received.verified for received in self.receiver.received)
        seen = Callbacks.of(self.receiver)
        for job_id in outcomes:
            outcome_ids = {i for i in seen.ids.get(job_id, set()) if i.endswith(".outcome")}
            assert outcome_ids == {f"{job_id}.outcome"}, (job_id, seen.ids.get(job_id))
            assert seen.payloads.get(job_id), f"{job_id}: its outcome webhook never reached the receiver"
        # What the receiver took must be what was recorded, every time it took it: a re-sent webhook
        # carrying another outcome (a job ended twice) is a violation, not a harmless repeat.
        conflicting = seen.conflicting(outcomes)
        assert not conflicting, f"deliveries that differ from the recorded outcome: {conflicting}"
        if max_repeated is not None:
            assert seen.repeated <= max_repeated, f"{seen.repeated} repeated deliveries: {seen.deliveries}"
        return seen

    def close(self) -> None:
        self.receiver.close()


# ----------------------------------------------------------------------------------------------
# What a killed node held, and how fast the fleet recovered it
# ----------------------------------------------------------------------------------------------


def node_of(holder: str) -> str:
    """The worker name (``-n NAME@host``) in a holder id ``NAME@host/pid/n-rand``."""
    return holder.split("/", 1)[0].split("@", 1)[0]


@dataclass(frozen=True)
class HeldJob:
    """A job's record as it stood when the node holding it was killed."""

    job_id: str
    state: str
    generation_id: str | None
    next_poll_at: float | None


@dataclass
class Holdings:
    """What one node held (its job records' and outbox entries' ``held_by``) at ``at``."""

    node: str
    at: float = 0.0
    jobs: dict[str, HeldJob] = field(default_factory=dict)
    #: Webhooks it held: message id -> job id.
    webhooks: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.webhooks)


def holdings(client: redis.Redis, nodes: Iterable[str]) -> dict[str, Holdings]:
    """What each of ``nodes`` holds now, read from the job records and the outbox (state Redis)."""
    found = {node: Holdings(node, at=time.time()) for node in nodes}
    job_ids = [_text(m) for m in client.zrange(ACTIVE_JOBS_KEY, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(JOB_KEY_PREFIX + job_id, ["held_by", "state", "generation_id", "next_poll_at", "outcome"])
    for job_id, (held_by, state, generation_id, next_poll_at, outcome) in zip(
        job_ids, pipe.execute(), strict=True
    ):
        node = node_of(_text(held_by)) if held_by else None
        if node in found and outcome is None:
            found[node].jobs[job_id] = HeldJob(
                job_id,
                _text(state) if state else "queued",
                _text(generation_id) if generation_id else None,
                float(next_poll_at) if next_poll_at else None,
            )
    msg_ids = [_text(m) for m in client.zrange(WEBHOOKS_PENDING_KEY, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for msg_id in msg_ids:
        pipe.hget(WEBHOOK_KEY_PREFIX + msg_id, "held_by")
    for msg_id, held_by in zip(msg_ids, pipe.execute(), strict=True):
        node = node_of(_text(held_by)) if held_by else None
        if node in found:
            found[node].webhooks[msg_id] = msg_id.split(".", 1)[0]
    return found


@dataclass(frozen=True)
class Recovered:
    """One job (or one job's webhook) a killed node held, and what became of it."""

    job_id: str
    #: "job" (a step's message) or "webhook" (an outcome webhook's message).
    kind: str
    state: str
    killed_at: float
    #: Seconds from the kill to the first request the simulator (a job) or the receiver (a
    #: webhook) saw for it afterwards: its re-drive. None: never seen again.
    redriven_after: float | None
    #: Seconds between when it finished (outcome recorded / webhook taken by the receiver) and the
    #: earliest it could have finished had its node not died (see :func:`recoveries`). None: never.
    late_by: float | None


def recoveries(
    held: Holdings,
    *,
    sim_stats: Mapping[str, Any],
    sim: Any,
    receiver: WebhookReceiver,
    store: JobStore,
    requests: Mapping[str, Mapping[str, Any]],
) -> list[Recovered]:
    """How each thing ``held`` listed was recovered, measured from the simulator's and the
    receiver's side.

    "When it would have completed" is estimated from below, so the lateness is never flattered: a
    job that had not finished at the kill ``K`` could not have finished before ``K``, nor before
    GEN had its output (its generation's ``ready_at``; ``K`` + the model's duration for a generation
    created after the kill), nor, if it was waiting for its next poll, before that poll was due.
    A webhook could not have been taken before ``K``.
    """
    recovered: list[Recovered] = []
    arrivals: list[dict[str, Any]] = sim_stats["arrivals"]
    for job_id, job in held.jobs.items():
        record = store.get(job_id)
        generation_ids = _generation_ids(record, sim_stats, requests[job_id])
        tokens = {sim.generation(g)["token"] for g in generation_ids}
        match = _job_paths(requests[job_id], generation_ids, tokens)
        after = [a["t"] for a in arrivals if a["t"] > held.at and match(a["path"])]
        earliest = held.at
        for gen_id in generation_ids:
            gen = sim.generation(gen_id)
            if gen["ready_at"] is not None:
                earliest = max(earliest, min(gen["ready_at"], held.at + gen["duration"]))
        if job.state == "polling" and job.next_poll_at:
            earliest = max(earliest, job.next_poll_at)
        finished = (record.outcome or {}).get("timings", {}).get("finished_at") if record else None
        recovered.append(
            Recovered(
                job_id,
                "job",
                job.state,
                held.at,
                min(after) - held.at if after else None,
                finished - earliest if finished is not None else None,
            )
        )
    seen = Callbacks.of(receiver)
    for msg_id, job_id in held.webhooks.items():
        posts = [a.at for a in receiver.arrivals if a.msg_id == msg_id and a.at > held.at]
        delivered = seen.delivered_at.get(job_id)
        recovered.append(
            Recovered(
                job_id,
                "webhook",
                "delivering",
                held.at,
                min(posts) - held.at if posts else None,
                delivered - held.at if delivered is not None else None,
            )
        )
    return recovered


def summary(recovered: Iterable[Recovered]) -> str:
    """``re-drive p50/max, lateness p50/max`` over the recovered jobs, for printing."""
    items = list(recovered)
    redrive = [r.redriven_after for r in items if r.redriven_after is not None]
    late = [r.late_by for r in items if r.late_by is not None]

    def p50_max(values: list[float]) -> str:
        return f"p50 {statistics.median(values):.1f} s, max {max(values):.1f} s" if values else "n/a"

    return (
        f"{len(items)} recovered: re-driven after the kill {p50_max(redrive)}; "
        f"late vs when it would have completed {p50_max(late)}"
    )


def _generation_ids(
    record: JobRecord | None, sim_stats: Mapping[str, Any], request: Mapping[str, Any]
) -> list[int]:
    created: list[int] = list(sim_stats["generations_by_target"].get(target_of(request), []))
    if record is not None and record.generation_id and int(record.generation_id) not in created:
        created.append(int(record.generation_id))
    return created


def _job_paths(
    request: Mapping[str, Any], generation_ids: list[int], tokens: set[str]
) -> Callable[[str], bool]:
    layer = request.get("layer_id")
    target = f"/{request['sheet_id']}/cells/{request['cell_id']}" + (f"/layers/{layer}" if layer else "")
    generations = {f"/v1/generations/{g}" for g in generation_ids}
    outputs = {f"/cdn/outputs/{t}.mp4" for t in tokens}

    def match(path: str) -> bool:
        if path.endswith(target + "/generate") or path in outputs:
            return True
        return any(path == g or path.startswith(g + "/") for g in generations)

    return match


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
