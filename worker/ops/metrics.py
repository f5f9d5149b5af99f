"""Prometheus metrics for the whole fleet, kept in Redis and served by one small HTTP server.

Why Redis and not ``prometheus_client``'s in-process metrics: a job's steps run in many processes on
many nodes (prefork children come and go, a poll may run on a different node than its submit). An
in-process counter would be split across all of them and lost with each child; a counter in Redis is
incremented by every process alike, survives restarts, and one scrape target sees fleet totals.

**Recording** (:func:`record_gen_call`, :func:`record_job_finished`, :func:`record_callback`) is a
:mod:`worker.ops.deferred` write on the caller's Redis client and never raises: a metric must never
fail a job. Outside a worker task it costs one MULTI/EXEC round trip at once; inside one it rides
along the task's next job-record write, or goes out with the task's other observations in one
MULTI/EXEC when the task ends. Redis errors are logged at DEBUG and the observation is dropped.
(The round trip still follows the client's own retry policy, so a dead Redis delays the caller as
much as any other command would.)

**Reading** (:class:`MetricsCollector`) happens at scrape time. Cost per scrape: one pipeline on the
records Redis (sorted-set reads, the dead-letter length, one HGETALL per metric hash), one pipeline
of HMGETs over the active jobs (at most ``max_scan`` of them, default :data:`MAX_ACTIVE_SCAN`; at
50k jobs that is ~50k O(1) commands, tens of milliseconds of Redis time and a few MB of reply, so
beyond that the in-flight gauges are computed from the ``max_scan`` soonest-due jobs and
``lipsync_jobs_active`` shows the true size), and one pipeline of LLENs on the broker.

**Serving**: ``python -m worker.ops.metrics --redis-url URL --port 9808`` (:func:`main`) serves
``/metrics`` and ``/healthz`` until SIGTERM or SIGINT. Run one per fleet (or one per Prometheus
replica); the numbers are the same whichever instance is scraped.

Redis layout, every key under :data:`METRICS_PREFIX` (the queue lists, the active set and the
dead-letter list are read, never written):

* a counter family is one hash; field = JSON list of label values, value = count (HINCRBY);
* a histogram family is one hash; field ``[*labels, le]`` = observations that fell into that bucket
  alone (not cumulative, so an observation is one HINCRBY), ``[*labels, "sum"]`` = their sum
  (HINCRBYFLOAT). Cumulative buckets and ``_count`` are computed at scrape time, which also keeps
  old data meaningful if the bucket bounds change.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from types import FrameType
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import redis
from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.names import (
    ACTIVE_BATCHES_KEY,
    ACTIVE_JOBS_KEY,
    ALL_QUEUES,
    BATCH_KEY_PREFIX,
    DEAD_LETTERS_KEY,
    HOLDERS_KEY,
    IN_FLIGHT_STAGES,
    JOB_KEY_PREFIX,
    METRICS_PREFIX,
    WEBHOOKS_PENDING_KEY,
    Stage,
)
from worker.ops import deferred
from worker.ops.broker import queue_lists
from worker.ops.misrouted import count_misrouted
from worker.ops.replies import as_text

__all__ = [
    "CALLBACKS_KEY",
    "GEN_DURATION_BUCKETS",
    "GEN_REQUESTS_KEY",
    "GEN_REQUEST_DURATION_KEY",
    "JOBS_FINISHED_KEY",
    "JOB_DURATION_BUCKETS",
    "JOB_DURATION_KEY",
    "MAX_ACTIVE_SCAN",
    "METRICS_KEYS",
    "METRICS_PREFIX",
    "MetricsCollector",
    "main",
    "record_callback",
    "record_event_nudges",
    "record_gen_call",
    "record_gen_event",
    "record_job_finished",
    "record_misrouted",
    "record_recoveries",
    "serve",
]

logger = logging.getLogger("lipsync.metrics")

#: Counter hash, labels (endpoint, status).
GEN_REQUESTS_KEY = METRICS_PREFIX + "gen_requests"
#: Histogram hash, labels (endpoint,).
GEN_REQUEST_DURATION_KEY = METRICS_PREFIX + "gen_request_duration"
#: Counter hash, labels (model, status).
JOBS_FINISHED_KEY = METRICS_PREFIX + "jobs_finished"
#: Histogram hash, labels (model,).
JOB_DURATION_KEY = METRICS_PREFIX + "job_duration"
#: Counter hash, labels (kind, outcome).
CALLBACKS_KEY = METRICS_PREFIX + "callbacks"
#: Counter hash, labels (queue,): lipsync messages moved out of a queue we do not consume.
MISROUTED_KEY = METRICS_PREFIX + "misrouted"
#: Counter hash, labels (cause,): jobs and webhooks the sweeper re-drove, by why.
RECOVERIES_KEY = METRICS_PREFIX + "recoveries"
#: Counter hash, labels (outcome,): POSTs to the GEN event receiver (lipsync-worker events).
GEN_EVENTS_KEY = METRICS_PREFIX + "gen_events"
#: Counter hash, labels (result,): jobs GEN's events named, by what the nudge did.
EVENT_NUDGES_KEY = METRICS_PREFIX + "event_nudges"
#: Counter hash, labels (action,): source changes of Lipsync card targets, by what they led to.
CARD_CHANGES_KEY = METRICS_PREFIX + "card_changes"
METRICS_KEYS = (
    GEN_REQUESTS_KEY,
    GEN_REQUEST_DURATION_KEY,
    JOBS_FINISHED_KEY,
    JOB_DURATION_KEY,
    CALLBACKS_KEY,
    MISROUTED_KEY,
    RECOVERIES_KEY,
    GEN_EVENTS_KEY,
    EVENT_NUDGES_KEY,
    CARD_CHANGES_KEY,
)

INF = math.inf
#: GEN answers in milliseconds to a few seconds; the read timeout is 30 s by default.
GEN_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, INF)
#: A job takes seconds to minutes; LIPSYNC_JOB_TIMEOUT is 30 min by default.
JOB_DURATION_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, INF)

#: Most active jobs whose records are read per scrape (see the module docstring for the cost).
MAX_ACTIVE_SCAN = 50_000
#: The states ``lipsync_batch_items`` counts a batch's items in.
BATCH_ITEM_STATES = ("waiting", "in_flight", "ended")


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Observation:
    key: str
    buckets: tuple[float, ...]
    labels: tuple[str, ...]
    seconds: float


def record_gen_call(r: redis.Redis, *, endpoint: str, status: int | None, seconds: float) -> None:
    """Count one GEN call (``status`` None = no HTTP answer: timeout, connection error)."""
    status_label = "error" if status is None else str(status)
    _record(
        r,
        "GEN call",
        counters=[(GEN_REQUESTS_KEY, (endpoint, status_label))],
        observation=_Observation(GEN_REQUEST_DURATION_KEY, GEN_DURATION_BUCKETS, (endpoint,), seconds),
    )


def record_job_finished(r: redis.Redis, *, model: str, status: str, seconds: float) -> None:
    """Count one finished job (``status`` is its outcome: completed, failed, timeout...)."""
    _record(
        r,
        "finished job",
        counters=[(JOBS_FINISHED_KEY, (model, status))],
        observation=_Observation(JOB_DURATION_KEY, JOB_DURATION_BUCKETS, (model,), seconds),
    )


def record_callback(r: redis.Redis, *, kind: str, outcome: str) -> None:
    """Count one callback event: kind task|webhook, outcome sent|delivered|failed_attempt|dead_lettered."""
    _record(r, "callback", counters=[(CALLBACKS_KEY, (kind, outcome))])


def record_misrouted(r: redis.Redis, *, queue: str, count: int) -> None:
    """Count lipsync messages moved out of ``queue`` (see worker.ops.misrouted)."""
    _record(r, "misrouted", counters=[(MISROUTED_KEY, (queue,))], amount=count)


def record_recoveries(r: redis.Redis, *, cause: str, count: int) -> None:
    """Count jobs or webhooks re-driven by the sweeper. ``cause``: ``dead_worker`` or
    ``released_on_reconnect`` (liveness), ``overdue`` (a job past its due time),
    ``webhook_overdue``, ``callbacks_redispatched``."""
    _record(r, "recovery", counters=[(RECOVERIES_KEY, (cause,))], amount=count)


def record_gen_event(r: redis.Redis, *, outcome: str) -> None:
    """Count one POST to the GEN event receiver: ``matched`` (it named a job we wait on),
    ``unmatched`` (it named none of ours), ``unreadable`` (not JSON, or naming no generation, cell
    or layer), ``refused`` (wrong token, method or size)."""
    _record(r, "GEN event", counters=[(GEN_EVENTS_KEY, (outcome,))])


def record_event_nudges(r: redis.Redis, *, result: str, count: int = 1) -> None:
    """Count jobs GEN's events named, by ``result``: ``sent`` (polled now), or why not (a
    :data:`worker.jobs.records.NudgeVerdict`: ``poll_due``, ``recently_nudged``, ``not_polling``...)."""
    _record(r, "event nudge", counters=[(EVENT_NUDGES_KEY, (result,))], amount=count)


def record_card_change(r: redis.Redis, *, action: str) -> None:
    """Count one source change of a card's target by what it led to (worker.cards): ``scheduled``,
    ``stale`` (no auto_generate: recorded only), ``own_output`` (the loop guard), and, when settled,
    ``unchanged`` (no generation needed) or ``generation_started``."""
    _record(r, "card change", counters=[(CARD_CHANGES_KEY, (action,))])


def _record(
    r: redis.Redis,
    what: str,
    *,
    counters: Iterable[tuple[str, tuple[str, ...]]],
    observation: _Observation | None = None,
    amount: int = 1,
) -> None:
    increments = [(key, _field(labels)) for key, labels in counters]

    def fill(pipe: Any) -> None:
        for key, name in increments:
            pipe.hincrby(key, name, amount)
        if observation is not None:
            _observe(pipe, observation)

    # Inside a worker task it goes out with the task's next job-record write, or at the task's end.
    deferred.write(r, f"metrics: {what}", fill)


def _observe(pipe: Any, obs: _Observation) -> None:
    if not math.isfinite(obs.seconds):
        # Redis refuses a NaN/inf increment, and inside MULTI that would not undo the other
        # commands: drop the duration, keep the count.
        logger.debug("metrics: non-finite duration %r for %s dropped", obs.seconds, obs.key)
        return
    # Durations from wall clocks of different nodes can come out slightly negative.
    seconds = max(0.0, obs.seconds)
    bound = obs.buckets[bisect.bisect_left(obs.buckets, seconds)]
    pipe.hincrby(obs.key, _field((*obs.labels, _le(bound))), 1)
    pipe.hincrbyfloat(obs.key, _field((*obs.labels, "sum")), seconds)


def _le(bound: float) -> str:
    # Prometheus' spelling of a bucket bound; float() reads it back.
    return "+Inf" if bound == INF else repr(float(bound))


def _field(values: Sequence[str]) -> str:
    # JSON, so that label values may hold any character (no separator to escape).
    return json.dumps([str(v) for v in values], separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class _Snapshot:
    """Everything one scrape read from Redis, before any of it is turned into metrics."""

    in_flight: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IN_FLIGHT_STAGES, 0))
    active: int = 0
    overdue: int = 0
    dead_letters: int = 0
    webhooks_pending: int = 0
    queue_depth: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALL_QUEUES, 0))
    #: Lipsync messages waiting now in queues we do not consume.
    misrouted: dict[str, int] = field(default_factory=dict)
    #: Worker consumers with a recent heartbeat, and those gone silent (not yet recovered).
    workers_alive: int = 0
    workers_silent: int = 0
    #: Batches not yet done, and their items by state (see BATCH_ITEM_STATES).
    batches_in_flight: int = 0
    batch_items: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BATCH_ITEM_STATES, 0))
    #: Metric hash key -> its raw fields and values.
    hashes: dict[str, Mapping[Any, Any]] = field(default_factory=dict)


class MetricsCollector:
    """A ``prometheus_client`` collector that reads the fleet's metrics from Redis at scrape time.

    ``r`` holds the job records and the metric hashes; ``broker`` the Celery queues (the same Redis
    unless LIPSYNC_BROKER_URL and LIPSYNC_REDIS_URL differ).
    """

    def __init__(
        self,
        r: redis.Redis,
        *,
        broker: redis.Redis | None = None,
        max_scan: int = MAX_ACTIVE_SCAN,
        misroute_queues: Sequence[str] = ("celery",),
        dead_after: float = 20.0,
    ) -> None:
        self.redis = r
        self.broker = broker if broker is not None else r
        self.max_scan = max_scan
        self.misroute_queues = tuple(misroute_queues)
        self.dead_after = dead_after

    def describe(self) -> Iterator[Metric]:
        # Names only, without touching Redis: the registry calls this at register time.
        yield from _families(_Snapshot())
        yield _scrape_error(0)

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot = self._read()
        except redis.RedisError as exc:
            # Half a set of numbers would mislead; report the failure instead of failing the response.
            logger.warning("metrics scrape: could not read Redis: %s", exc)
            yield _scrape_error(1)
            return
        yield from _families(snapshot)
        yield _scrape_error(0)

    def _read(self) -> _Snapshot:
        snapshot = _Snapshot()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(ACTIVE_JOBS_KEY, 0, self.max_scan - 1)
        pipe.zcard(ACTIVE_JOBS_KEY)
        # The sweeper's own test for "overdue" (JobStore.overdue): score at or before now.
        pipe.zcount(ACTIVE_JOBS_KEY, "-inf", time.time())
        pipe.llen(DEAD_LETTERS_KEY)
        pipe.zcard(WEBHOOKS_PENDING_KEY)
        pipe.time()
        pipe.zrange(HOLDERS_KEY, 0, -1, withscores=True)
        for key in METRICS_KEYS:
            pipe.hgetall(key)
        (
            job_ids,
            snapshot.active,
            snapshot.overdue,
            snapshot.dead_letters,
            snapshot.webhooks_pending,
            (seconds, micros),
            holders,
            *hashes,
        ) = pipe.execute()
        # Heartbeats are stamped with Redis's clock (worker.jobs.liveness); score 0 = released.
        live_since = seconds + micros / 1e6 - self.dead_after
        snapshot.workers_alive = sum(1 for _, beat in holders if beat >= live_since)
        snapshot.workers_silent = sum(1 for _, beat in holders if 0 < beat < live_since)
        snapshot.hashes = dict(zip(METRICS_KEYS, hashes, strict=True))
        snapshot.in_flight = self._in_flight([as_text(job_id) for job_id in job_ids])
        snapshot.queue_depth = self._queue_depths()
        snapshot.misrouted = count_misrouted(self.broker, self.misroute_queues)
        snapshot.batches_in_flight, snapshot.batch_items = self._batches()
        return snapshot

    def _in_flight(self, job_ids: Sequence[str]) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(IN_FLIGHT_STAGES, 0)
        if not job_ids:
            return counts
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(JOB_KEY_PREFIX + job_id, ["state", "outcome", "created_at"])
        for state, outcome, created_at in pipe.execute():
            # Same reading as JobStore.get: no created_at = no record (expired); "" = cleared;
            # a record without a state is queued. A job with an outcome is finished, even while it
            # stays in the active set until its callbacks are dispatched.
            if created_at is None or _present(outcome):
                continue
            stage = as_text(state) if _present(state) else Stage.QUEUED.value
            if stage in counts:
                counts[stage] += 1
        return counts

    def _batches(self) -> tuple[int, dict[str, int]]:
        """Batches whose result is not recorded yet, and their items: not started yet (``waiting``),
        started and not ended (``in_flight``), ``ended`` (worker.batches.store's layout)."""
        items = dict.fromkeys(BATCH_ITEM_STATES, 0)
        batch_ids = self.redis.zrange(ACTIVE_BATCHES_KEY, 0, self.max_scan - 1)
        if not batch_ids:
            return 0, items
        pipe = self.redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            key = BATCH_KEY_PREFIX + as_text(batch_id)
            pipe.hmget(key, ["total", "admitted", "outcome"])
            pipe.hlen(key + ":results")
        replies = pipe.execute()
        running = 0
        for (total, admitted, outcome), ended in zip(replies[::2], replies[1::2], strict=True):
            if total is None or _present(outcome):
                continue
            running += 1
            items["waiting"] += int(total) - int(admitted or 0)
            items["in_flight"] += max(0, int(admitted or 0) - int(ended))
            items["ended"] += int(ended)
        return running, items

    def _queue_depths(self) -> dict[str, int]:
        pipe = self.broker.pipeline(transaction=False)
        for queue in ALL_QUEUES:
            for name in queue_lists(queue):
                pipe.llen(name)
        lengths = iter(pipe.execute())
        return {queue: sum(next(lengths) for _ in queue_lists(queue)) for queue in ALL_QUEUES}


def _present(value: bytes | str | None) -> bool:
    return value is not None and value not in (b"", "")


# --------------------------------------------------------------------------------------------
# Turning a snapshot into metric families
# --------------------------------------------------------------------------------------------


def _families(s: _Snapshot) -> Iterator[Metric]:
    yield from _gauges(s)
    yield from _histories(s)


def _gauges(s: _Snapshot) -> Iterator[Metric]:
    """What is happening now: jobs by stage, overdue jobs, queue backlogs, dead letters."""
    in_flight = GaugeMetricFamily(
        "lipsync_jobs_in_flight", "Unfinished jobs by the stage their record is in.", labels=["stage"]
    )
    for stage in IN_FLIGHT_STAGES:
        in_flight.add_metric([stage], s.in_flight.get(stage, 0))
    yield in_flight
    yield GaugeMetricFamily(
        "lipsync_jobs_active",
        "Jobs in the active set (unfinished, or finished with callbacks not yet dispatched).",
        value=s.active,
    )
    yield GaugeMetricFamily(
        "lipsync_jobs_overdue",
        "Active jobs past their overdue_at: what the sweeper will re-drive.",
        value=s.overdue,
    )
    depth = GaugeMetricFamily(
        "lipsync_queue_depth", "Messages waiting in each Celery queue (all priorities).", labels=["queue"]
    )
    for queue in ALL_QUEUES:
        depth.add_metric([queue], s.queue_depth.get(queue, 0))
    yield depth
    misrouted = GaugeMetricFamily(
        "lipsync_misrouted_waiting",
        "Lipsync messages waiting now in a queue lipsync workers do not consume (moved at the next sweep).",
        labels=["queue"],
    )
    for queue, count in sorted(s.misrouted.items()):
        misrouted.add_metric([queue], count)
    yield misrouted
    workers = GaugeMetricFamily(
        "lipsync_workers",
        "Worker consumers by heartbeat: alive, or silent past LIPSYNC_NODE_DEAD_AFTER and not yet recovered.",
        labels=["state"],
    )
    workers.add_metric(["alive"], s.workers_alive)
    workers.add_metric(["silent"], s.workers_silent)
    yield workers
    yield GaugeMetricFamily(
        "lipsync_callbacks_dead_letters",
        "Callbacks given up on, waiting in the dead-letter list.",
        value=s.dead_letters,
    )
    yield GaugeMetricFamily(
        "lipsync_webhooks_pending",
        "Webhooks not yet delivered (in an attempt, or waiting for the next one).",
        value=s.webhooks_pending,
    )
    yield GaugeMetricFamily(
        "lipsync_batches_in_flight",
        "Batches with items not yet ended (lipsync.run_batch).",
        value=s.batches_in_flight,
    )
    batch_items = GaugeMetricFamily(
        "lipsync_batch_items",
        "Items of the batches in flight: waiting (not started), in_flight (started, not ended), ended.",
        labels=["state"],
    )
    for state in BATCH_ITEM_STATES:
        batch_items.add_metric([state], s.batch_items.get(state, 0))
    yield batch_items


def _histories(s: _Snapshot) -> Iterator[Metric]:
    """What has happened since the metric hashes were created: the recorded counters and histograms."""
    yield _counter(
        "lipsync_gen_requests",
        "GEN API calls by endpoint and HTTP status ('error': no answer).",
        ["endpoint", "status"],
        s.hashes.get(GEN_REQUESTS_KEY, {}),
    )
    yield _histogram(
        "lipsync_gen_request_duration_seconds",
        "GEN API call duration.",
        ["endpoint"],
        GEN_DURATION_BUCKETS,
        s.hashes.get(GEN_REQUEST_DURATION_KEY, {}),
    )
    yield _histogram(
        "lipsync_job_duration_seconds",
        "Time from a job's creation to its outcome.",
        ["model"],
        JOB_DURATION_BUCKETS,
        s.hashes.get(JOB_DURATION_KEY, {}),
    )
    yield _counter(
        "lipsync_jobs_finished",
        "Finished jobs by model and outcome status.",
        ["model", "status"],
        s.hashes.get(JOBS_FINISHED_KEY, {}),
    )
    yield _counter(
        "lipsync_callbacks",
        "Callback events by kind (task|webhook) and outcome.",
        ["kind", "outcome"],
        s.hashes.get(CALLBACKS_KEY, {}),
    )
    yield _counter(
        "lipsync_misrouted_messages",
        "Lipsync messages found in a queue lipsync workers do not consume (LIPSYNC_MISROUTE_QUEUES) and "
        "moved to their own; the producer should be fixed.",
        ["queue"],
        s.hashes.get(MISROUTED_KEY, {}),
    )
    yield _counter(
        "lipsync_recoveries",
        "Jobs and webhooks the sweeper re-drove, by cause (dead_worker, released_on_reconnect, overdue, "
        "webhook_overdue, callbacks_redispatched).",
        ["cause"],
        s.hashes.get(RECOVERIES_KEY, {}),
    )
    yield _counter(
        "lipsync_gen_events",
        "POSTs to the GEN event receiver by outcome (matched, unmatched, unreadable, refused).",
        ["outcome"],
        s.hashes.get(GEN_EVENTS_KEY, {}),
    )
    yield _counter(
        "lipsync_event_nudges",
        "Jobs GEN's events named, by what was done: sent (polled now) or why not "
        "(poll_due, recently_nudged, not_polling, finished, cancelled, unknown).",
        ["result"],
        s.hashes.get(EVENT_NUDGES_KEY, {}),
    )
    yield _counter(
        "lipsync_card_changes",
        "Source changes of Lipsync card targets by what they led to (scheduled, stale, own_output, "
        "unchanged, generation_started).",
        ["action"],
        s.hashes.get(CARD_CHANGES_KEY, {}),
    )


def _scrape_error(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "lipsync_metrics_scrape_error", "1 when Redis could not be read for this scrape.", value=value
    )


def _counter(name: str, doc: str, labelnames: list[str], raw: Mapping[Any, Any]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labelnames)
    for key, value in sorted(_parse(raw, len(labelnames)).items()):
        family.add_metric(list(key), value)
    return family


@dataclass
class _Series:
    counts: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0


def _histogram(
    name: str, doc: str, labelnames: list[str], buckets: Sequence[float], raw: Mapping[Any, Any]
) -> HistogramMetricFamily:
    series: dict[tuple[str, ...], _Series] = {}
    for (*label_values, tail), value in _parse(raw, len(labelnames) + 1).items():
        one = series.setdefault(tuple(label_values), _Series())
        if tail == "sum":
            one.sum = value
            continue
        try:
            bound = float(tail)
        except ValueError:
            continue
        one.counts[bound] = one.counts.get(bound, 0.0) + value
    family = HistogramMetricFamily(name, doc, labels=labelnames)
    for labels, one in sorted(series.items()):
        cumulative = [(_le(b), sum(n for stored, n in one.counts.items() if stored <= b)) for b in buckets]
        family.add_metric(list(labels), cumulative, sum_value=one.sum)
    return family


def _parse(raw: Mapping[Any, Any], arity: int) -> dict[tuple[str, ...], float]:
    """Hash fields -> {label values: number}, skipping anything malformed (a scrape must not fail)."""
    parsed: dict[tuple[str, ...], float] = {}
    for raw_field, raw_value in raw.items():
        try:
            labels = json.loads(raw_field)
            value = float(raw_value)
        except (ValueError, TypeError):
            continue
        if isinstance(labels, list) and len(labels) == arity and all(isinstance(v, str) for v in labels):
            parsed[tuple(labels)] = value
    return parsed


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # Daemon threads: a stuck scrape must not keep the process alive after SIGTERM.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # A line per scrape every 15 s would drown the log.
        logger.debug("metrics http: " + format, *args)


def _wsgi_app(registry: CollectorRegistry) -> WSGIApplication:
    metrics_app = cast(WSGIApplication, make_wsgi_app(registry))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Liveness of this server only, not of Redis: restarting the server would not fix Redis,
        # and lipsync_metrics_scrape_error already reports it.
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok"]
        return metrics_app(environ, start_response)

    return app


def _make_server(host: str, port: int, app: WSGIApplication) -> WSGIServer:
    # WSGIServer is AF_INET only; pick the family from the address so "::" works too.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingServer):
        address_family = family

    return make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)


def _connect(url: str) -> redis.Redis:
    # Fail a scrape fast (Prometheus times out after 10 s by default) rather than retry for seconds.
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=5,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    )


def serve(redis_url: str, host: str, port: int, *, broker_url: str | None = None) -> None:
    """Serve ``/metrics`` and ``/healthz`` on host:port until SIGTERM or SIGINT (main thread only)."""
    client = _connect(redis_url)
    broker = _connect(broker_url) if broker_url and broker_url != redis_url else client
    registry = CollectorRegistry()
    from worker.settings import get_settings

    settings = get_settings()
    collector = MetricsCollector(
        client, broker=broker, misroute_queues=settings.misroute_queues, dead_after=settings.node_dead_after
    )
    registry.register(collector)
    ProcessCollector(registry=registry)  # this server's own CPU/memory; reads /proc, cheap
    server = _make_server(host, port, _wsgi_app(registry))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    logger.info("serving metrics on http://%s:%d/metrics", host, server.server_port)
    try:
        # A timeout, so the wait returns promptly whatever the platform does with signals and locks.
        while not stop.wait(timeout=1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for c in {id(client): client, id(broker): broker}.values():
            c.close()
    logger.info("metrics server stopped")


def _urls(args: argparse.Namespace) -> tuple[str, str]:
    if args.redis_url is not None:
        return args.redis_url, args.broker_url or args.redis_url
    from worker.settings import get_settings

    settings = get_settings()
    return settings.effective_redis_url, args.broker_url or settings.broker_url


def main(argv: Sequence[str] | None = None) -> int:
    """``lipsync-worker metrics``: serve the fleet's Prometheus metrics from Redis."""
    parser = argparse.ArgumentParser(
        prog="lipsync-worker metrics",
        description="Serve the fleet's Prometheus metrics, read from Redis, on /metrics (and /healthz).",
    )
    parser.add_argument(
        "--redis-url",
        help="Redis with the job records and metrics (default: LIPSYNC_REDIS_URL or the broker)",
    )
    parser.add_argument(
        "--broker-url",
        help="Redis broker whose queues are measured (default: --redis-url, else LIPSYNC_BROKER_URL)",
    )
    # All interfaces by default: Prometheus scrapes from another host or pod. Nothing secret is exposed.
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")  # noqa: S104
    parser.add_argument("--port", type=int, default=9808, help="port to listen on (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redis_url, broker_url = _urls(args)
    try:
        serve(redis_url, args.host, args.port, broker_url=broker_url)
    except OSError as exc:  # the port is taken, the host does not resolve
        logger.error("metrics server could not start on %s:%d: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
