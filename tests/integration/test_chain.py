"""The job end to end: real Redis, real worker processes, the GEN simulator over HTTP."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from gensim import Fault
from tests.conftest import API_KEY, WEBHOOK_SECRET, Cluster, wait_for
from tests.webhook_receiver import WebhookReceiver
from worker.enqueue import enqueue, job_status
from worker.errors import LipsyncJobFailed, RequestInvalid
from worker.jobs.records import JobStore
from worker.names import PRIORITIES, QUEUE_JOBS, TASK_POLL
from worker.ops.broker import queue_lists

pytestmark = pytest.mark.integration

RESULT_TIMEOUT = 60


def request(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": f"job-{uuid.uuid4().hex[:12]}",
        "sheet_id": 101,
        "cell_id": 3000,
        "layer_id": 4000,
        "video_resource_id": 5001,
        "audio_resource_id": 6001,
        "model": "gen",
        "metadata": {"trace": "abc", "n": 1},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def failure_of(exc_info: pytest.ExceptionInfo[BaseException]) -> dict[str, Any]:
    exc = exc_info.value
    assert isinstance(exc, LipsyncJobFailed), repr(exc)
    return exc.failure


def failure_of_result(async_result: Any) -> dict[str, Any]:
    """The failure JSON of a job's FAILURE result."""
    exc = async_result.result
    assert isinstance(exc, LipsyncJobFailed), repr(exc)
    return exc.failure


def generate_requests(sim: Any) -> list[dict[str, Any]]:
    return [r for r in sim.stats()["requests"] if r["endpoint"] == "generate"]


@pytest.mark.parametrize("model", ["gen", "sync_so"])
def test_completes_with_the_video_in_storage(cluster: Cluster, simulator: Any, model: str) -> None:
    result = enqueue(request(model=model), app=cluster.app()).get(timeout=RESULT_TIMEOUT)

    assert result["status"] == "completed"
    assert result["model"] == model
    assert result["metadata"] == {"trace": "abc", "n": 1}
    output = result["output"]
    served = simulator.output_bytes(result["generation_id"])
    assert output["sha256"] == hashlib.sha256(served).hexdigest()
    assert output["size_bytes"] == len(served)
    assert output["content_type"] == "video/mp4"
    assert output["url"].startswith(simulator.base_url + "/cdn/outputs/")
    assert output["thumbnail_url"] and output["id"]
    path = Path(output["path"])
    assert path.read_bytes() == served
    assert output["uri"] == path.as_uri()
    assert result["execution_cost"] is not None
    assert result["timings"]["total_seconds"] > 0
    assert result["polls"] >= 1
    # One paid generation, created with the job's Idempotency-Key.
    stats = simulator.stats()
    assert stats["generations_created"] == 1
    assert simulator.generation(result["generation_id"])["model"] == model
    assert not list(path.parent.glob(".partial/*")), "no temp file left behind"


@pytest.mark.parametrize(
    ("layer_id", "suffix"), [(4001, "/cells/3001/layers/4001/generate"), (None, "/cells/3001/generate")]
)
def test_layer_and_cell_endpoints(
    cluster: Cluster, simulator: Any, layer_id: int | None, suffix: str
) -> None:
    enqueue(request(cell_id=3001, layer_id=layer_id), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    (call,) = generate_requests(simulator)
    assert call["path"] == f"/v1/vidsheet/101{suffix}"  # the default dialect
    assert call["idempotency_key"]


def test_default_model_is_used_when_the_request_names_none(cluster: Cluster, simulator: Any) -> None:
    result = enqueue(request(model=None), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    assert result["model"] == "gen"


def test_signature_callback_reaches_the_pipeline_on_its_own_queue(cluster: Cluster, simulator: Any) -> None:
    if not any(w.name == "pipeline-media" for w in cluster.workers):
        cluster.start_consumer("media")
    req = request(callback={"task": "pipeline.on_lipsync", "queue": "media"})
    result = enqueue(req, app=cluster.app()).get(timeout=RESULT_TIMEOUT)

    def mine() -> list[dict[str, Any]]:
        return [c for c in cluster.received_callbacks() if c["payload"]["job_id"] == req["job_id"]]

    wait_for(lambda: bool(mine()), timeout=20)
    (received,) = mine()
    assert received["queue"] == "media"
    assert received["task_id"] == f"{req['job_id']}.outcome"
    assert received["payload"] == result


def test_webhook_callback_is_signed_and_carries_stage_events(cluster: Cluster, simulator: Any) -> None:
    receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
    try:
        events = ["submitted", "generation_completed", "output_fetched"]
        req = request(callback={"webhook_url": receiver.url, "events": events})
        result = enqueue(req, app=cluster.app()).get(timeout=RESULT_TIMEOUT)
        job_id = req["job_id"]
        wanted = {f"{job_id}.outcome", *(f"{job_id}.event.{e}" for e in events)}
        wait_for(lambda: wanted <= set(receiver.ids()), timeout=20)
        assert all(r.verified for r in receiver.received)
        outcome = next(r for r in receiver.received if r.msg_id == f"{job_id}.outcome")
        assert outcome.payload == result
        submitted = next(r for r in receiver.received if r.msg_id.endswith(".event.submitted"))
        assert submitted.payload["generation_id"] == result["generation_id"]
        assert submitted.payload["metadata"] == req["metadata"]
    finally:
        receiver.close()


def test_webhook_endpoint_down_then_back_gets_the_same_id(cluster: Cluster, simulator: Any) -> None:
    receiver = WebhookReceiver(secret=WEBHOOK_SECRET, fail_next=2)
    try:
        req = request(callback={"webhook_url": receiver.url})
        enqueue(req, app=cluster.app()).get(timeout=RESULT_TIMEOUT)
        wait_for(lambda: bool(receiver.received), timeout=20)
        assert receiver.attempts == 3
        assert receiver.ids() == [f"{req['job_id']}.outcome"]
    finally:
        receiver.close()


def test_failed_generation_delivers_gens_reason(cluster: Cluster, simulator: Any) -> None:
    receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
    try:
        req = request(video_resource_id=5099, callback={"webhook_url": receiver.url})
        with pytest.raises(LipsyncJobFailed) as exc_info:
            enqueue(req, app=cluster.app()).get(timeout=RESULT_TIMEOUT)
        failure = failure_of(exc_info)
        assert failure["status"] == "failed"
        assert failure["error_code"] == "generation_failed"
        assert failure["message"] == "No face detected in the source video"
        assert failure["generation_id"]
        assert failure["metadata"] == req["metadata"]
        wait_for(lambda: bool(receiver.received), timeout=20)
        assert receiver.received[0].payload == failure
    finally:
        receiver.close()


@pytest.mark.parametrize(
    ("overrides", "endpoint", "status_code", "error_code"),
    [
        ({"sheet_id": 999}, "generate", 404, "not_found"),
        # The default dialect (vidsheet) looks the resources up first: GEN refuses there, and
        # nothing is generated.
        ({"video_resource_id": "no_such_video"}, "content_resource", 404, "content_resource_not_found"),
    ],
)
def test_gen_refusal_fails_at_once_without_retries(
    cluster: Cluster,
    simulator: Any,
    overrides: dict[str, Any],
    endpoint: str,
    status_code: int,
    error_code: str,
) -> None:
    with pytest.raises(LipsyncJobFailed) as exc_info:
        enqueue(request(**overrides), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    failure = failure_of(exc_info)
    assert failure["status"] == "rejected"
    assert failure["error_code"] == error_code
    assert str(status_code) in failure["message"]
    refused = [r["status"] for r in simulator.stats()["requests"] if r["endpoint"] == endpoint]
    assert refused[-1] == status_code and refused.count(status_code) == 1  # no retry
    if endpoint != "generate":
        assert generate_requests(simulator) == []


def test_the_older_dialect_is_refused_at_generate_without_retries(make_cluster: Any, simulator: Any) -> None:
    cluster = make_cluster(LIPSYNC_GEN_DIALECT="autocontentengine")
    cluster.start_worker()
    with pytest.raises(LipsyncJobFailed) as exc_info:
        enqueue(request(video_resource_id="no_such_video"), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    failure = failure_of(exc_info)
    assert (failure["status"], failure["error_code"]) == ("rejected", "validation_error")
    assert [r["status"] for r in generate_requests(simulator)] == [422]


@pytest.mark.parametrize(
    "fault",
    [
        Fault(endpoint="generate", status=429, times=2),
        Fault(endpoint="generate", status=429, retry_after=0.5, times=1),
        Fault(endpoint="generate", status=503, times=3),
        Fault(endpoint="get_generation", status=502, times=3),
        Fault(endpoint="get_generation", status=429, retry_after=0.3, times=2),
    ],
    ids=["429", "429-retry-after", "503-on-submit", "502-on-poll", "429-on-poll"],
)
def test_transient_errors_are_retried_and_complete(cluster: Cluster, simulator: Any, fault: Fault) -> None:
    simulator.add_fault(fault)
    result = enqueue(request(), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    assert result["status"] == "completed"
    stats = simulator.stats()
    assert stats["generations_created"] == 1
    keys = {r["idempotency_key"] for r in generate_requests(simulator)}
    assert len(keys) == 1, "every submit attempt carries the same Idempotency-Key"


def test_retry_after_is_honoured(cluster: Cluster, simulator: Any) -> None:
    simulator.add_fault(Fault(endpoint="generate", status=429, retry_after=1.5, times=1))
    enqueue(request(), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    first, second = generate_requests(simulator)
    assert second["t"] - first["t"] >= 1.5


def test_deadline_stops_the_generation_and_fails_with_timeout(make_cluster: Any, simulator: Any) -> None:
    cluster = make_cluster(LIPSYNC_JOB_TIMEOUT="2")
    cluster.start_worker()
    with pytest.raises(LipsyncJobFailed) as exc_info:
        enqueue(request(video_resource_id=5098), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    failure = failure_of(exc_info)
    assert failure["status"] == "timeout"
    assert failure["error_code"] == "timeout"
    assert simulator.stats()["stops"] == [int(failure["generation_id"])] or simulator.stats()["stops"] == [
        failure["generation_id"]
    ]
    assert simulator.generation(failure["generation_id"])["status"] == "stopped"


def test_vidsheet_dialect_sends_gens_newer_body(make_cluster: Any, simulator: Any) -> None:
    simulator.strict_dialect = True
    cluster = make_cluster(LIPSYNC_GEN_DIALECT="vidsheet")
    cluster.start_worker()
    for model in ("sync_so", "gen"):
        result = enqueue(request(model=model), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
        assert result["status"] == "completed"
        assert simulator.generation(result["generation_id"])["model"] == model
    assert {r["path"] for r in generate_requests(simulator)} == {
        "/v1/vidsheet/101/cells/3000/layers/4000/generate"
    }


class VidsheetOnlyGen:
    """GEN after the ``/autocontentengine`` → ``/vidsheet`` migration, in front of the simulator: the
    old path prefix is served by the ``/vidsheet`` handlers (with the simulator's strict dialect,
    they take only the newer body). Everything else is passed through as is, over HTTP."""

    OLD, NEW = "/v1/autocontentengine/", "/v1/vidsheet/"

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the worker's pooled session expects

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front.forward(self)

            def do_POST(self) -> None:
                front.forward(self)

        self.target = (target.hostname or "127.0.0.1", target.port or 80)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path
        if path.startswith(self.OLD):
            path = self.NEW + path.removeprefix(self.OLD)
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        upstream = http.client.HTTPConnection(*self.target, timeout=10)
        try:
            upstream.request(handler.command, path, body=body or None, headers=headers)
            reply = upstream.getresponse()
            payload = reply.read()
            handler.send_response(reply.status)
            for name, value in reply.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        finally:
            upstream.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_autocontentengine_dialect_is_refused_by_a_strict_vidsheet_only_gen(
    make_cluster: Any, simulator: Any
) -> None:
    """No fallback by design: the dialect is configured (README: vidsheet is the default). A GEN that
    takes only the newer body refuses the older one with 422, and the job fails at once with GEN's
    reason, typed as a refusal: not retried, nothing charged."""
    simulator.strict_dialect = True
    gen = VidsheetOnlyGen(simulator.base_url)
    try:
        cluster = make_cluster(LIPSYNC_GEN_BASE_URL=gen.url, LIPSYNC_GEN_DIALECT="autocontentengine")
        cluster.start_worker()
        with pytest.raises(LipsyncJobFailed) as exc_info:
            enqueue(request(), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    finally:
        gen.close()
    failure = failure_of(exc_info)
    assert (failure["status"], failure["error_code"]) == ("rejected", "validation_error"), failure
    assert "expects the lipsync body with talking_avatar_video_data" in failure["message"], failure
    assert failure["generation_id"] is None
    # The older body reached GEN's /vidsheet handler once and was refused; no retry, no generation.
    assert [(r["path"], r["status"]) for r in generate_requests(simulator)] == [
        ("/v1/vidsheet/101/cells/3000/layers/4000/generate", 422)
    ]
    assert simulator.stats()["generations_created"] == 0


def test_autocontentengine_dialect_is_accepted_on_its_own_prefix_under_strict_rules(
    make_cluster: Any, simulator: Any
) -> None:
    simulator.strict_dialect = True
    cluster = make_cluster(LIPSYNC_GEN_DIALECT="autocontentengine")
    cluster.start_worker()
    result = enqueue(request(), app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    assert result["status"] == "completed"
    generation = simulator.generation(result["generation_id"])
    assert (generation["prefix"], generation["dialect"]) == ("autocontentengine", "old")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"cell_id": None}, "cell_id"),
        ({"model": "wav2lip"}, "model"),
        ({"video_resource_id": "../../etc"}, "video_resource_id"),
        ({"colour": "blue"}, "colour"),
        ({"callback": {"queue": "media"}}, "callback"),
    ],
)
def test_bad_request_is_refused_at_enqueue_by_the_helper(
    cluster: Cluster, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(RequestInvalid) as exc_info:
        enqueue(request(**overrides), app=cluster.app())
    assert any(e["field"].startswith(field) for e in exc_info.value.errors), exc_info.value.errors
    assert field in str(exc_info.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"cell_id": None}, "cell_id"), ({"model": "wav2lip"}, "model"), ({"sheet_id": True}, "sheet_id")],
)
def test_bad_request_sent_raw_fails_at_task_start_naming_the_field(
    cluster: Cluster, simulator: Any, overrides: dict[str, Any], field: str
) -> None:
    receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
    try:
        raw = request(**overrides, callback={"webhook_url": receiver.url})
        async_result = cluster.app().send_task("lipsync.run", kwargs={"request": raw})
        with pytest.raises(LipsyncJobFailed) as exc_info:
            async_result.get(timeout=RESULT_TIMEOUT)
        failure = failure_of(exc_info)
        assert failure["status"] == "rejected"
        assert failure["error_code"] == "validation_error"
        assert failure["job_id"] == raw["job_id"]
        assert any(e["field"] == field for e in failure["errors"]), failure["errors"]
        wait_for(lambda: bool(receiver.received), timeout=20)
        assert receiver.received[0].payload["error_code"] == "validation_error"
        assert generate_requests(simulator) == []
    finally:
        receiver.close()


def test_raw_send_task_with_plain_json_completes(cluster: Cluster, simulator: Any) -> None:
    raw = {
        "sheet_id": "101",
        "cell_id": "3002",
        "video_resource_id": "video_res_123",
        "audio_resource_id": "audio_res_456",
    }
    result = cluster.app().send_task("lipsync.run", kwargs={"request": raw}).get(timeout=RESULT_TIMEOUT)
    assert result["status"] == "completed"
    assert result["job_id"]


def test_caller_link_and_link_error_keep_working(cluster: Cluster, simulator: Any) -> None:
    app = cluster.app()
    if not any(w.name == "pipeline-media" for w in cluster.workers):
        cluster.start_consumer("media")
    ok = request()
    bad = request(video_resource_id=5099)
    link = app.signature("pipeline.on_lipsync", queue="media")
    link_error = app.signature("pipeline.on_lipsync_error", queue="media")
    enqueue(ok, app=app, link=link, link_error=link_error).get(timeout=RESULT_TIMEOUT)
    failed = enqueue(bad, app=app, link=link, link_error=link_error)
    with pytest.raises(LipsyncJobFailed):
        failed.get(timeout=RESULT_TIMEOUT)

    def calls(task: str) -> list[Any]:
        return [c["payload"] for c in cluster.received_callbacks() if c.get("task") == task]

    def linked() -> list[Any]:
        mine = (ok["job_id"], bad["job_id"])
        return [p for p in calls("pipeline.on_lipsync") if isinstance(p, dict) and p.get("job_id") in mine]

    with contextlib.suppress(TimeoutError):  # the assertions below say what is missing
        wait_for(lambda: bool(linked()) and bool(calls("pipeline.on_lipsync_error")), timeout=20)
    time.sleep(1)  # room for a wrong extra call: a link for the failure, an errback for the success
    # link: the ok job's result, once. link_error: once, with the id of the step task that failed
    # (Celery hands an errback the failed task's id); that task's result is the bad job's failure.
    assert [(p["job_id"], p["status"]) for p in linked()] == [(ok["job_id"], "completed")]
    errbacks = calls("pipeline.on_lipsync_error")
    assert len(errbacks) == 1, f"the caller's link_error ran {len(errbacks)} times: {errbacks}"
    step = app.AsyncResult(errbacks[0])
    assert step.state == "FAILURE"
    assert isinstance(step.result, LipsyncJobFailed), step.result
    assert step.result.failure == failure_of_result(failed)
    assert step.result.failure["job_id"] == bad["job_id"]


def test_progress_states_and_job_record(cluster: Cluster, simulator: Any) -> None:
    req = request(model="sync_so")
    async_result = enqueue(req, app=cluster.app())
    seen: set[str] = set()

    def observe() -> bool:
        seen.add(async_result.state)
        return async_result.ready()

    wait_for(observe, timeout=RESULT_TIMEOUT, interval=0.05)
    assert "POLLING" in seen, seen
    assert async_result.state == "SUCCESS"
    store = JobStore(cluster.redis(), ttl=60)
    record = job_status(req["job_id"], store=store)
    assert record is not None
    assert record.state == "completed"
    outcome = async_result.result  # typed Any | BaseException: a SUCCESS result is the result dict
    assert isinstance(outcome, dict), outcome
    assert record.generation_id == outcome["generation_id"]
    assert record.outcome == outcome
    assert record.callbacks_dispatched


def test_the_callers_result_is_stored_once_with_the_last_steps_metadata(
    cluster: Cluster, simulator: Any
) -> None:
    """The outcome is stored under the caller's id when the job ends (before its callbacks go out),
    with the last step's request; that step then returns the same outcome, and Celery's own store
    of it would be a second round trip: Celery reads the stored state first and writes nothing
    over a SUCCESS, so that store shows as a read of the result key without a write. Counted in
    the result backend's command stream (MONITOR); nothing here waits on the result itself, so
    every command on the key is the worker's."""
    req = request()
    backend = redis.Redis.from_url(cluster.env["LIPSYNC_RESULT_BACKEND"])
    key = f"celery-task-meta-{req['job_id']}"
    on_key: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        with backend.monitor() as stream:  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            while not stop.is_set():
                command = str(stream.next_command()["command"])
                if key in command:
                    on_key.append(command.split()[0].upper())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.3)  # MONITOR is on before the job starts
    try:
        enqueue(req, app=cluster.app())
        store = JobStore(cluster.redis(), ttl=60)

        def ended() -> bool:
            record = store.get(req["job_id"])
            return record is not None and record.outcome is not None

        wait_for(ended, timeout=RESULT_TIMEOUT)
        time.sleep(1.5)  # the last step returns after the outcome is recorded: let its store happen
    finally:
        stop.set()
        backend.ping()  # something for the watcher to read, so it sees the stop
        watcher.join(timeout=5)
        backend.close()
    reads, writes = on_key.count("GET"), on_key.count("SETEX") + on_key.count("SET")
    assert writes >= 3, on_key  # POLLING, FETCHING, the result
    assert reads == writes, f"a store that found the result already there: {on_key}"
    final = json.loads(redis.Redis.from_url(cluster.env["LIPSYNC_RESULT_BACKEND"]).get(key) or b"{}")
    assert final["status"] == "SUCCESS" and final["result"]["job_id"] == req["job_id"], final
    assert final["name"] == "lipsync.fetch_output" and final["worker"], final


def test_result_is_reachable_by_job_id(cluster: Cluster, simulator: Any) -> None:
    req = request()
    enqueue(req, app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    assert cluster.app().AsyncResult(req["job_id"]).get(timeout=1)["job_id"] == req["job_id"]


def test_no_secret_reaches_logs_results_or_the_broker(cluster: Cluster, simulator: Any) -> None:
    """Runs last in this module: everything the worker wrote so far must be free of secrets."""
    req = request(callback={"webhook_url": "http://127.0.0.1:9/unreachable"})
    enqueue(req, app=cluster.app()).get(timeout=RESULT_TIMEOUT)
    secrets = [API_KEY, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_")]
    logs = "".join(w.log() for w in cluster.workers)
    assert "lipsync.poll" in logs
    stored = b"".join(
        redis_contents(redis.Redis.from_url(cluster.env[name]))
        for name in ("LIPSYNC_BROKER_URL", "LIPSYNC_RESULT_BACKEND", "LIPSYNC_REDIS_URL")
    )
    assert req["job_id"].encode() in stored
    for secret in secrets:
        assert secret not in logs
        assert secret.encode() not in stored


def as_bytes(reply: object) -> bytes:
    """A reply item of a client without ``decode_responses``: redis-py types it ``bytes | str``."""
    assert isinstance(reply, bytes), reply
    return reply


def redis_contents(client: redis.Redis) -> bytes:
    """Every key and value in a Redis database, as bytes (DUMP would compress them)."""
    parts: list[bytes] = []
    for key in client.scan_iter():
        kind = client.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(as_bytes(client.get(key) or b""))
        elif kind == b"hash":
            parts.extend(b"%s=%s" % (as_bytes(k), as_bytes(v)) for k, v in client.hgetall(key).items())
        elif kind == b"list":
            parts.extend(map(as_bytes, client.lrange(key, 0, -1)))
        elif kind == b"set":
            parts.extend(map(as_bytes, client.smembers(key)))
        elif kind == b"zset":
            parts.extend(map(as_bytes, client.zrange(key, 0, -1)))
    client.close()
    return b"\n".join(parts)


def test_a_real_workers_polls_and_their_retries_go_behind_new_jobs(cluster: Cluster, simulator: Any) -> None:
    """The poll's priority (worker.names.PRIORITIES) survives a real worker's retries: Celery copies
    it from the message it received into the retry it sends (tests/unit/jobs/test_priorities.py
    shows what the priority does to the order)."""
    simulator.durations = {"gen": 8.0}
    req = request()
    async_result = enqueue(req, app=cluster.app())
    broker = redis.Redis.from_url(cluster.env["LIPSYNC_BROKER_URL"])
    seen: list[dict[str, Any]] = []

    def a_retried_poll() -> bool:
        raws = [json.loads(raw)[0] for raw in broker.hvals("unacked")]
        raws += [json.loads(raw) for name in queue_lists(QUEUE_JOBS) for raw in broker.lrange(name, 0, -1)]
        seen.extend(m for m in raws if m["headers"]["task"] == TASK_POLL and m["headers"]["retries"] >= 1)
        return bool(seen)

    wait_for(a_retried_poll, timeout=RESULT_TIMEOUT, interval=0.05)
    assert {m["properties"].get("priority") for m in seen} == {PRIORITIES[TASK_POLL]}
    assert async_result.get(timeout=RESULT_TIMEOUT)["status"] == "completed"
