"""docs/metrics.md against the real metrics endpoint: what is exported is documented, and nothing else.

The endpoint runs as deployed (``python -m worker.ops.metrics`` in its own process, scraped over HTTP)
on the fast tier's Redis, after :func:`record_everything` has recorded a value for every family
through the code that records them in production. A metric added to the code without a row in the
docs fails here, as does a name in the docs that the endpoint does not export (``lipsync_gen_requests``
for ``lipsync_gen_requests_total``). :func:`metrics_endpoint` and :func:`record_everything` are shared
with tests/unit/test_dashboard.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import pytest
import redis
import requests
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from worker.callbacks.outbox import Outbox
from worker.dev.embedded_redis import free_port
from worker.jobs.liveness import Holders
from worker.jobs.records import JobStore, NudgeVerdict
from worker.names import ALL_QUEUES, HOLDERS_KEY, IN_FLIGHT_STAGES, QUEUE_FETCH, TASK_RUN, Stage
from worker.ops.metrics import (
    record_callback,
    record_card_change,
    record_event_nudges,
    record_gen_call,
    record_gen_event,
    record_job_finished,
    record_misrouted,
    record_recoveries,
)

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "metrics.md"

#: A metric name as it may appear on the page (the exporter's own and the process collector's).
NAME = re.compile(r"\b(?:lipsync|process)_[a-z0-9_]*[a-z0-9]")


@dataclass(frozen=True)
class Family:
    """One metric family of a scrape: its type and its samples (whose names PromQL sees)."""

    name: str
    type: str
    samples: tuple[Sample, ...]


@dataclass
class Endpoint:
    base: str
    process: subprocess.Popen[bytes]

    def text(self) -> str:
        response = requests.get(f"{self.base}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        return response.text

    def scrape(self) -> list[Family]:
        return [
            Family(family.name, family.type, tuple(family.samples))
            for family in text_string_to_metric_families(self.text())
        ]


@contextmanager
def metrics_endpoint(redis_url: str) -> Iterator[Endpoint]:
    """``python -m worker.ops.metrics`` on a free loopback port, reading ``redis_url`` (records and
    broker alike), until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "worker.ops.metrics", "--redis-url", redis_url]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    endpoint = Endpoint(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"the metrics server exited:\n{err}")
            try:
                if requests.get(f"{endpoint.base}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the metrics server did not answer in time"
            time.sleep(0.05)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


#: What record_everything records, once per call: every GEN endpoint answering, failing and silent.
GEN_CALLS = [
    ("generate", 202, 0.3),
    ("generate", 429, 0.02),
    ("get_generation", 200, 0.04),
    ("get_generation", 200, 0.06),
    ("get_generation", 503, 0.5),
    ("get_generation", None, 30.0),
    ("stop_generation", 200, 0.1),
    ("get_cell", 200, 0.05),
    ("get_layer", 404, 0.05),
    ("get_content_resource", 200, 0.08),
]
OUTCOMES = [
    ("gen", "completed", 42.0),
    ("gen", "completed", 75.0),
    ("sync_so", "completed", 130.0),
    ("gen", "failed", 12.0),
    ("sync_so", "timeout", 1800.0),
    ("gen", "rejected", 0.5),
    ("gen", "stopped", 300.0),
    ("sync_so", "cancelled", 20.0),
]
CALLBACKS = [
    ("task", "sent"),
    ("webhook", "delivered"),
    ("webhook", "failed_attempt"),
    ("webhook", "failed_attempt"),
    ("webhook", "dead_lettered"),
]


RECOVERIES = ["dead_worker", "released_on_reconnect", "overdue", "webhook_overdue", "callbacks_redispatched"]
EVENT_OUTCOMES = ["matched", "matched", "unmatched", "unreadable", "refused"]
#: What worker.jobs.nudge records: sent, send_failed, or the record's verdict why not.
NUDGE_RESULTS = ["sent", "send_failed", *(v for v in get_args(NudgeVerdict) if v != "nudged")]
#: What worker.cards.flow records for a change of a card's target.
CARD_ACTIONS = ["scheduled", "stale", "own_output", "unchanged", "generation_started"]


def record_everything(redis_url: str, *, round_no: int = 0) -> None:
    """Give every family a value, through the production code: GEN calls, outcomes, callbacks,
    misrouted messages moved, recoveries, GEN's events and their nudges (counters, histograms); a
    job in every stage, one of them overdue (records); a message in every queue, and a
    ``lipsync.run`` sent by a plain Celery app to its default queue (misrouted); a pending webhook
    and a dead-lettered one (the outbox); a live worker consumer and a silent one (heartbeats). Call
    again with another ``round_no`` to make the counters grow (the gauges grow too)."""
    r = redis.Redis.from_url(redis_url)
    for endpoint, code, seconds in GEN_CALLS:
        record_gen_call(r, endpoint=endpoint, status=code, seconds=seconds)
    for model, status, seconds in OUTCOMES:
        record_job_finished(r, model=model, status=status, seconds=seconds)
    for kind, outcome in CALLBACKS:
        record_callback(r, kind=kind, outcome=outcome)
    record_misrouted(r, queue="celery", count=2)
    for n, cause in enumerate(RECOVERIES):
        record_recoveries(r, cause=cause, count=n + 1)
    for outcome in EVENT_OUTCOMES:
        record_gen_event(r, outcome=outcome)
    for n, result in enumerate(NUDGE_RESULTS):
        record_event_nudges(r, result=result, count=n + 1)
    for action in CARD_ACTIONS:
        record_card_change(r, action=action)

    jobs = JobStore(r, ttl=3600)
    now = time.time()
    for n, stage in enumerate(IN_FLIGHT_STAGES):
        job_id = f"r{round_no}-{stage}"
        # The polling job is overdue: its next poll was due more than the grace ago.
        overdue_at = now - 5 if stage is Stage.POLLING else now + 600
        jobs.claim(job_id, task_id=job_id, model="gen", job=None, overdue_at=overdue_at + n)
        jobs.update(job_id, state=stage.value)
    for queue in ALL_QUEUES:
        r.rpush(queue, "{}")
    r.rpush(f"{QUEUE_FETCH}\x06\x166", "{}")  # a priority sub-list counts too
    plain = Celery(broker=redis_url)  # a producer without our routes: its default queue, "celery"
    plain.send_task(TASK_RUN, kwargs={"request": {"job_id": f"r{round_no}-misrouted"}})
    plain.close()

    outbox = Outbox(r, ttl=3600)
    outbox.put(f"r{round_no}-pending.outcome", "https://receiver.example/hook", {"n": 1}, due_at=now + 30)
    dead = f"r{round_no}-dead.outcome"
    drive = outbox.put(dead, "https://receiver.example/gone", {"n": 2}, due_at=now)
    attempt = outbox.claim(dead, drive, due_at=now + 30)
    assert attempt is not None
    assert outbox.give_up(attempt, error="410 Gone")

    holders = Holders(r)
    assert holders.beat(f"alive@host:{round_no}:1")
    seconds, _ = r.time()
    r.zadd(HOLDERS_KEY, {f"silent@host:{round_no}:1": seconds - 3600})  # its last beat, an hour ago
    r.close()


# -- the page ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of a reference table: the names in its first cell, its type and labels."""

    names: tuple[str, ...]
    type: str
    labels: frozenset[str]
    line: str


def documented_rows(text: str) -> list[Row]:
    """The rows of the tables headed ``| metric | type | labels | …``."""
    rows: list[Row] = []
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[:3] == ["metric", "type", "labels"]:
            in_table = True
            continue
        if not in_table or set(cells[0]) <= {"-", ":"}:
            continue
        names = tuple(re.findall(r"`([^`]+)`", cells[0]))
        labels = frozenset(re.findall(r"`([^`]+)`", cells[2]))
        rows.append(Row(names, cells[1], labels, line))
    return rows


@pytest.fixture
def exported(redis_url: str) -> list[Family]:
    record_everything(redis_url)
    with metrics_endpoint(redis_url) as endpoint:
        return endpoint.scrape()


def sample_names(families: list[Family]) -> dict[str, Family]:
    return {sample.name: family for family in families for sample in family.samples}


def test_every_exported_name_is_documented_and_every_documented_one_exported(
    exported: list[Family],
) -> None:
    rows = documented_rows(DOC.read_text())
    assert len(rows) >= 10, "the reference tables moved or changed shape"
    in_tables = [name for row in rows for name in row.names]
    assert len(in_tables) == len(set(in_tables)), "a metric is documented twice"
    names = sample_names(exported)
    assert sorted(set(names) - set(in_tables)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(in_tables) - set(names)) == [], "in docs/metrics.md but not exported"


def test_every_metric_name_on_the_page_is_exported(exported: list[Family]) -> None:
    # Prose and example queries included: no name without its _total, no retired name.
    names = sample_names(exported)
    mentioned = set(NAME.findall(DOC.read_text()))
    assert sorted(mentioned - set(names)) == []


def test_documented_types_and_labels_are_the_exported_ones(exported: list[Family]) -> None:
    names = sample_names(exported)
    for row in documented_rows(DOC.read_text()):
        assert len({names[name].name for name in row.names}) == 1, f"one row, one family: {row.line}"
        family = names[row.names[0]]
        assert row.type == family.type, row.line
        labels = {label for s in family.samples if s.name in row.names for label in s.labels}
        assert row.labels == labels, row.line


def test_documented_label_values_are_the_ones_the_code_writes() -> None:
    text = DOC.read_text()
    jobs = next(row.line for row in documented_rows(text) if row.names == ("lipsync_jobs_in_flight",))
    queues = next(row.line for row in documented_rows(text) if row.names == ("lipsync_queue_depth",))
    for stage in IN_FLIGHT_STAGES:
        assert f"`{stage.value}`" in jobs
    for queue in ALL_QUEUES:
        assert f"`{queue}`" in queues
    gen = next(row.line for row in documented_rows(text) if row.names == ("lipsync_gen_requests_total",))
    for endpoint, _, _ in GEN_CALLS:
        assert f"`{endpoint}`" in gen
    callbacks = next(row.line for row in documented_rows(text) if row.names == ("lipsync_callbacks_total",))
    for _, outcome in CALLBACKS:
        assert f"`{outcome}`" in callbacks
    causes = next(row.line for row in documented_rows(text) if row.names == ("lipsync_recoveries_total",))
    for cause in RECOVERIES:
        assert f"`{cause}`" in causes
    events = next(row.line for row in documented_rows(text) if row.names == ("lipsync_gen_events_total",))
    for outcome in EVENT_OUTCOMES:
        assert f"`{outcome}`" in events
    nudges = next(row.line for row in documented_rows(text) if row.names == ("lipsync_event_nudges_total",))
    for result in NUDGE_RESULTS:
        assert f"`{result}`" in nudges
    cards = next(row.line for row in documented_rows(text) if row.names == ("lipsync_card_changes_total",))
    for action in CARD_ACTIONS:
        assert f"`{action}`" in cards


def test_the_old_metrics_list_points_here() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert "(metrics.md)" in operations
    # Any metric named there is an exported name (checked against the docs' own tables).
    documented = {name for row in documented_rows(DOC.read_text()) for name in row.names}
    for path in (ROOT / "docs" / "operations.md", ROOT / "README.md", ROOT / "deploy" / "README.md"):
        mentioned = set(NAME.findall(path.read_text()))
        assert sorted(mentioned - documented) == [], path.name


def test_the_example_queries_parse_and_name_exported_metrics(exported: list[Family]) -> None:
    # The page's "questions operators ask" table, read with the dashboard's PromQL subset.
    from deploy.grafana.promql_subset import parse, selectors

    labels: dict[str, set[str]] = {}
    for family in exported:
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    text = DOC.read_text()
    table = text[text.index("| question | query |") : text.index("Alerts worth having")]
    # The question column holds no code: every code span of a row is a query.
    queries = [
        q for line in table.splitlines()[2:] if line.startswith("| ") for q in re.findall(r"`([^`]+)`", line)
    ]
    assert len(queries) >= 10
    for query in queries:
        for selector in selectors(parse(query)):
            assert selector.name in labels, query
            assert {m.label for m in selector.matchers} <= labels[selector.name], query
