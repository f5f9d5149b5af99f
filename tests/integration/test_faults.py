"""The fault matrix: one test per scenario, the same invariants for all (see tests/harness.py).

Real Redis, real worker processes (killed for real), the GEN simulator over HTTP. Timings are
shortened through settings (recovery grace 2 s, sweep every 0.5 s, GEN read timeout 3 s), never by
mocking the clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from gensim import Fault
from tests.conftest import REPO, Cluster, wait_for
from tests.harness import Run
from worker.ops.broker import queue_lists

pytestmark = pytest.mark.integration

FAST = {
    "LIPSYNC_GEN_CONNECT_TIMEOUT": "1",
    "LIPSYNC_GEN_READ_TIMEOUT": "3",
    "LIPSYNC_DOWNLOAD_TIMEOUT": "10",
}


@pytest.fixture
def fault_cluster(make_cluster: Callable[..., Cluster]) -> Callable[..., Cluster]:
    def build(*, persistent: bool = False, **env: str) -> Cluster:
        return make_cluster(persistent=persistent, **{**FAST, **env})

    return build


@pytest.fixture
def run_on(simulator: Any) -> Iterator[Callable[[Cluster], Run]]:
    runs: list[Run] = []

    def factory(cluster: Cluster) -> Run:
        run = Run(cluster, simulator)
        runs.append(run)
        return run

    yield factory
    for run in runs:
        run.close()


def kill_worker(cluster: Cluster, index: int = 0) -> None:
    cluster.workers[index].kill()


# ----------------------------------------------------------------------------------------------
# Worker deaths
# ----------------------------------------------------------------------------------------------


def test_sigkill_during_submit(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    simulator.add_fault(Fault(endpoint="generate", delay=1.5, times=1))
    (job_id,) = run.submit()
    run.wait_state(job_id, "submitting")
    kill_worker(cluster)
    cluster.start_worker()
    outcomes = run.outcomes()
    assert outcomes[job_id]["status"] == "completed"
    run.check_invariants(outcomes)


def test_sigkill_after_gen_accepted_before_recording(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    """The narrowest window: GEN created the generation, we had not written its id yet."""
    cluster = fault_cluster()
    cluster.start_worker(LIPSYNC_FAILPOINTS="submit.after_generate")
    run = run_on(cluster)
    (job_id,) = run.submit()
    wait_for(lambda: cluster.workers[0].process.poll() is not None, timeout=30)
    assert simulator.stats()["generations_created"] == 1
    cluster.start_worker()
    outcomes = run.outcomes()
    assert outcomes[job_id]["status"] == "completed"
    run.check_invariants(outcomes)
    assert len(simulator.stats()["generations_by_key"]) == 1


def test_sigkill_during_poll_wait(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    simulator.durations = {"gen": 4.0}
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    job_ids = run.submit(3)
    for job_id in job_ids:
        run.wait_state(job_id, "polling", min_polls=1)
    kill_worker(cluster)
    killed_at = time.monotonic()
    cluster.start_worker()
    outcomes = run.outcomes()
    assert {o["status"] for o in outcomes.values()} == {"completed"}
    run.check_invariants(outcomes)
    # Recovered by the sweeper, not by Redis's visibility timeout (7200 s here).
    assert time.monotonic() - killed_at < 60


def test_sigkill_during_download(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    simulator.add_fault(Fault(endpoint="cdn", trickle=0.05, times=1))
    (job_id,) = run.submit()
    run.wait_state(job_id, "fetching")
    time.sleep(0.5)
    kill_worker(cluster)
    final = cluster.storage / f"{job_id}.mp4"
    assert not final.exists(), "a killed download must not leave a file under the final name"
    cluster.start_worker()
    outcomes = run.outcomes()
    result = outcomes[job_id]
    assert result["status"] == "completed"
    served = simulator.output_bytes(result["generation_id"])
    assert final.read_bytes() == served
    assert result["output"]["sha256"] == hashlib.sha256(served).hexdigest()
    run.check_invariants(outcomes)


def test_sigkill_after_callback_before_ack(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster()
    cluster.start_worker(LIPSYNC_FAILPOINTS="finish.after_dispatch")
    run = run_on(cluster)
    (job_id,) = run.submit()
    wait_for(lambda: cluster.workers[0].process.poll() is not None, timeout=30)
    record = run.record(job_id)
    assert record is not None and record.outcome is not None and not record.callbacks_dispatched
    cluster.start_worker()
    outcomes = run.outcomes()
    assert outcomes[job_id]["status"] == "completed"
    run.check_invariants(outcomes)
    record = run.record(job_id)
    assert record is not None and record.callbacks_dispatched


def test_sigterm_warm_shutdown_mid_job(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    simulator.durations = {"gen": 6.0}
    # Polls 2 s apart, so the SIGTERM lands while every job's next poll is a countdown message held
    # by the worker (not while a retry is being published).
    cluster = fault_cluster(
        LIPSYNC_POLL_INITIAL_DELAY="2", LIPSYNC_POLL_MAX_DELAY="2", LIPSYNC_POLL_JITTER="0"
    )
    cluster.start_worker()
    run = run_on(cluster)
    job_ids = run.submit(4)
    for job_id in job_ids:
        run.wait_state(job_id, "polling", min_polls=1)
    time.sleep(0.5)
    assert cluster.workers[0].stop(signal.SIGTERM, timeout=60) == 0
    assert "Restoring 4 unacknowledged message(s)" in cluster.workers[0].log()
    cluster.start_worker()
    outcomes = run.outcomes()
    assert {o["status"] for o in outcomes.values()} == {"completed"}
    run.check_invariants(outcomes)


# ----------------------------------------------------------------------------------------------
# Broker faults
# ----------------------------------------------------------------------------------------------


def test_redis_restarted_mid_run(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    simulator.durations = {"gen": 3.0}
    cluster = fault_cluster(persistent=True)
    cluster.start_worker()
    run = run_on(cluster)
    job_ids = run.submit(4)
    for job_id in job_ids:
        run.wait_state(job_id, "polling", min_polls=1)
    cluster.redis_server.restart()
    # Nothing restarts a worker here: the one that was running rides the restart out (reconnects)
    # and finishes the jobs itself. A worker that exits fails the test at once.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(r.ready() for r in run.results.values()):
        if any(w.process.poll() is not None for w in cluster.workers):
            break
        time.sleep(0.5)
    exited = {w.name: w.process.returncode for w in cluster.workers if w.process.poll() is not None}
    assert not exited, (
        f"worker(s) exited across the Redis restart: {exited}\n{cluster.workers[0].log()[-3000:]}"
    )
    outcomes = run.outcomes(timeout=30)
    assert {o["status"] for o in outcomes.values()} == {"completed"}
    run.check_invariants(outcomes)
    assert len(cluster.workers) == 1
    assert all(w.process.poll() is None for w in cluster.workers), "a worker exited after the jobs ended"


def test_lost_retry_message_is_recovered_by_the_sweeper(
    fault_cluster: Any, simulator: Any, run_on: Any
) -> None:
    simulator.durations = {"gen": 3.0}
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    (job_id,) = run.submit()
    run.wait_state(job_id, "polling", min_polls=1)
    kill_worker(cluster)
    # Lose every message the dead worker held: the countdown poll is gone for good.
    broker = redis.Redis.from_url(cluster.env["LIPSYNC_BROKER_URL"])
    broker.delete("unacked", "unacked_index", *queue_lists("lipsync"), *queue_lists("lipsync.fetch"))
    lost_at = time.monotonic()
    cluster.start_worker()
    outcomes = run.outcomes()
    assert outcomes[job_id]["status"] == "completed"
    run.check_invariants(outcomes)
    record = run.record(job_id)
    assert record is not None and record.redrives >= 1
    assert time.monotonic() - lost_at < 30


# ----------------------------------------------------------------------------------------------
# GEN faults
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "faults",
    [
        [Fault(endpoint="generate", status=429, times=2)],
        [Fault(endpoint="generate", status=429, retry_after=0.5, times=2)],
        [
            Fault(endpoint="get_generation", status=503, times=4),
            Fault(endpoint="generate", status=500, times=2),
        ],
        [Fault(endpoint="generate", accept_then_drop=True, times=1)],
        [Fault(endpoint="get_generation", malformed=True, times=2)],
        [Fault(endpoint="cdn", reset_after_bytes=10_000, times=1)],
        [Fault(endpoint="get_generation", drop=True, times=2)],
        [Fault(endpoint="get_generation", delay=4.0, times=1)],
    ],
    ids=[
        "429",
        "429-retry-after",
        "5xx-bursts",
        "timeout-after-gen-accepted",
        "malformed-json",
        "reset-mid-download",
        "dropped-connections",
        "slow-status-beyond-read-timeout",
    ],
)
def test_transient_gen_faults_complete(
    fault_cluster: Any, simulator: Any, run_on: Any, faults: list[Fault]
) -> None:
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    for fault in faults:
        simulator.add_fault(fault)
    job_ids = run.submit(2)
    outcomes = run.outcomes()
    assert {o["status"] for o in outcomes.values()} == {"completed"}, outcomes
    run.check_invariants(outcomes)
    for job_id in job_ids:
        result = outcomes[job_id]
        assert (
            result["output"]["sha256"]
            == hashlib.sha256(simulator.output_bytes(result["generation_id"])).hexdigest()
        )


@pytest.mark.parametrize(
    ("setup", "status", "error_code"),
    [
        ({"video_resource_id": 5099}, "failed", "generation_failed"),
        (
            {"fault": Fault(endpoint="get_generation", malformed=True, times=None)},
            "failed",
            "bad_upstream_response",
        ),
        (
            {"fault": Fault(endpoint="get_generation", body={"id": 1, "status": "exploded"}, times=None)},
            "failed",
            "unknown_generation_status",
        ),
        ({"fault": Fault(endpoint="generate", status=401, times=None)}, "rejected", "unauthorized"),
        ({"sheet_id": 999}, "rejected", "not_found"),
    ],
    ids=["generation-failed", "always-malformed", "unknown-status", "unauthorized", "unknown-sheet"],
)
def test_terminal_gen_outcomes(
    fault_cluster: Any, simulator: Any, run_on: Any, setup: dict[str, Any], status: str, error_code: str
) -> None:
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    setup = dict(setup)
    fault = setup.pop("fault", None)
    if fault is not None:
        simulator.add_fault(fault)
    (job_id,) = run.submit(**setup)
    outcomes = run.outcomes()
    assert (outcomes[job_id]["status"], outcomes[job_id]["error_code"]) == (status, error_code), outcomes[
        job_id
    ]
    run.check_invariants(outcomes)


def test_generation_stopped_on_gen(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    simulator.durations = {"gen": 5.0}
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    (job_id,) = run.submit()
    record = run.wait_state(job_id, "polling", min_polls=1)
    response = requests.post(
        f"{simulator.base_url}/v1/generations/{record.generation_id}/stop",
        headers={"X-API-Key": cluster.env["LIPSYNC_GEN_API_KEY"]},
        timeout=5,
    )
    assert response.status_code == 200
    outcomes = run.outcomes()
    assert (outcomes[job_id]["status"], outcomes[job_id]["error_code"]) == ("stopped", "generation_stopped")
    run.check_invariants(outcomes)


def test_stuck_pending_past_the_deadline(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster(LIPSYNC_JOB_TIMEOUT="3")
    cluster.start_worker()
    run = run_on(cluster)
    (job_id,) = run.submit(video_resource_id=5098)
    outcomes = run.outcomes()
    failure = outcomes[job_id]
    assert (failure["status"], failure["error_code"]) == ("timeout", "timeout")
    assert simulator.generation(failure["generation_id"])["stopped_by_api"]
    run.check_invariants(outcomes)


def test_output_url_on_a_private_address_is_refused(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster(LIPSYNC_ALLOW_PRIVATE_URLS="false")
    cluster.start_worker()
    run = run_on(cluster)
    metadata_url = "http://169.254.169.254/latest/meta-data/iam"
    body = {
        "id": 1,
        "status": "completed",
        "output_resources": [{"id": 7, "url": metadata_url, "object_type": "video"}],
    }
    simulator.add_fault(Fault(endpoint="get_generation", body=body, times=None))
    (job_id,) = run.submit()
    outcomes = run.outcomes()
    failure = outcomes[job_id]
    assert (failure["status"], failure["error_code"]) == ("failed", "unsafe_url"), failure
    assert "169.254.169.254" in failure["message"]
    run.check_invariants(outcomes, callbacks=False)  # the receiver is on loopback: refused too


# ----------------------------------------------------------------------------------------------
# Callbacks, duplicates, cancellation
# ----------------------------------------------------------------------------------------------


def test_callback_endpoint_down_then_back(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    run.receiver.fail_next = 3
    (job_id,) = run.submit()
    outcomes = run.outcomes()
    run.check_invariants(outcomes)
    assert run.receiver.attempts == 4
    assert run.receiver.ids() == [f"{job_id}.outcome"]


def test_callback_dead_letter_then_replay(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster(LIPSYNC_WEBHOOK_RETRY_DELAYS="0.2,0.2")
    cluster.start_worker()
    run = run_on(cluster)
    run.receiver.fail_next = 3
    (job_id,) = run.submit()
    run.outcomes()

    def listed() -> list[dict[str, Any]]:
        out = _cli(cluster, "callbacks", "list")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    wait_for(lambda: bool(listed()), timeout=20)
    (entry,) = listed()
    assert entry["msg_id"] == f"{job_id}.outcome" and entry["attempts"] == 3
    assert run.receiver.received == []
    _cli(cluster, "callbacks", "replay", "--all")
    wait_for(lambda: bool(run.receiver.received), timeout=20)
    assert run.receiver.ids() == [f"{job_id}.outcome"]
    assert listed() == []


def test_sigkill_while_a_webhook_waits_for_its_retry(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    # The retry is a countdown message held, unacknowledged, by the worker that gets killed: Redis
    # would hand it back only after the two-hour visibility timeout. The outbox entry's due time
    # (the countdown + the recovery grace) lets the sweeper send it again within seconds.
    # Only the retry's due time (4 + 2 s) may bring it back within the 30 s the check waits: the
    # attempt's (60 + 10 + 2 s) and a queued message's (300 s) would be too late.
    cluster = fault_cluster(
        LIPSYNC_WEBHOOK_RETRY_DELAYS="4,0.3", LIPSYNC_WEBHOOK_TIMEOUT="60", LIPSYNC_QUEUED_RECOVERY="300"
    )
    cluster.start_worker()
    run = run_on(cluster)
    run.receiver.fail_next = 1
    (job_id,) = run.submit()
    outcomes = run.outcomes()
    wait_for(lambda: run.receiver.attempts == 1, timeout=20)
    time.sleep(0.5)  # the retry message is published and held by the worker on its countdown
    kill_worker(cluster)
    status = json.loads(_cli(cluster, "status", job_id))
    (owed,) = status["webhooks_pending"]
    assert owed["msg_id"] == f"{job_id}.outcome" and owed["attempts"] == 1
    cluster.start_worker()
    run.check_invariants(outcomes)  # waits up to 30 s for the callback
    assert run.receiver.ids() == [f"{job_id}.outcome"]
    assert cluster.redis().zcard("lipsync:webhooks:pending") == 0


def test_sigkill_during_a_webhook_post(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    # The worker dies with the POST in flight, before it recorded the delivery: the webhook is sent
    # again with the same id (at least once; receivers dedupe on webhook-id).
    # Due again when the attempt's hard time limit (5 + 10 s) and the grace (2 s) are over.
    cluster = fault_cluster(LIPSYNC_WEBHOOK_TIMEOUT="5", LIPSYNC_QUEUED_RECOVERY="300")
    cluster.start_worker()
    run = run_on(cluster)
    run.receiver.hold_next, run.receiver.hold_seconds = 1, 3.0
    (job_id,) = run.submit()
    outcomes = run.outcomes()
    wait_for(lambda: run.receiver.attempts == 1, timeout=20)
    kill_worker(cluster)
    cluster.start_worker()
    run.check_invariants(outcomes)
    wait_for(lambda: len(run.receiver.received) >= 2, timeout=30)
    assert set(run.receiver.ids()) == {f"{job_id}.outcome"}
    assert cluster.redis().zcard("lipsync:webhooks:pending") == 0


def test_a_receiver_answering_byte_by_byte_cannot_hold_a_worker(
    fault_cluster: Any, simulator: Any, run_on: Any
) -> None:
    # Each read is quicker than the 2 s webhook timeout, the whole answer takes 45 s: the attempt
    # must be cut off by its total time limit (3 s) and retried, not wait for the last byte. One
    # process slot, so nothing but that limit can free it (a re-send would queue behind it).
    cluster = fault_cluster(
        LIPSYNC_WEBHOOK_TIMEOUT="2", LIPSYNC_WEBHOOK_RETRY_DELAYS="0.3,0.3", LIPSYNC_QUEUED_RECOVERY="300"
    )
    cluster.start_worker(concurrency=1)
    run = run_on(cluster)
    run.receiver.drip_next, run.receiver.drip_interval = 1, 1.0
    (job_id,) = run.submit()
    outcomes = run.outcomes()
    run.check_invariants(outcomes)  # delivered by the second attempt, within 30 s
    assert run.receiver.drips_completed == 0, "the first attempt waited for the whole drip"
    assert run.receiver.attempts == 2
    assert run.receiver.ids() == [f"{job_id}.outcome"]


def test_a_webhook_message_from_before_the_outbox_is_still_delivered(
    fault_cluster: Any, simulator: Any, run_on: Any
) -> None:
    # Releases before the outbox sent url and payload in the message; during an upgrade such
    # messages may still be queued (or come back after the visibility timeout).
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    payload = {"job_id": "old-release-job", "status": "completed"}
    cluster.app().send_task(
        "lipsync.deliver_webhook",
        kwargs={"url": run.receiver.url, "payload": payload, "msg_id": "old-release-job.outcome"},
    )
    wait_for(lambda: bool(run.receiver.received), timeout=20)
    (received,) = run.receiver.received
    assert received.verified and received.msg_id == "old-release-job.outcome" and received.payload == payload
    wait_for(lambda: cluster.redis().zcard("lipsync:webhooks:pending") == 0, timeout=10)


def _cli(cluster: Cluster, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO,
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_duplicate_enqueue_joins_the_running_job(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    cluster = fault_cluster()
    cluster.start_worker()
    run = run_on(cluster)
    (job_id,) = run.submit()
    # The same job sent again: by a raw send_task (another task id) and by the helper's id.
    request = run.requests[job_id]
    raw = cluster.app().send_task("lipsync.run", kwargs={"request": request})
    again = cluster.app().send_task("lipsync.run", kwargs={"request": request}, task_id=job_id)
    outcomes = run.outcomes()
    assert raw.get(timeout=60) == outcomes[job_id] == again.get(timeout=60)
    run.check_invariants(outcomes)
    assert simulator.stats()["generations_created"] == 1


def test_cancel_stops_the_generation_and_fires_the_failure_callback_once(
    fault_cluster: Any, simulator: Any, run_on: Any
) -> None:
    simulator.durations = {"gen": 8.0}
    # Polls 1.5 s apart: the cancel lands while the next poll waits on its countdown (a message the
    # worker holds), not while a poll is on its way to GEN.
    cluster = fault_cluster(
        LIPSYNC_POLL_INITIAL_DELAY="1.5", LIPSYNC_POLL_MAX_DELAY="1.5", LIPSYNC_POLL_JITTER="0"
    )
    cluster.start_worker()
    run = run_on(cluster)
    (job_id,) = run.submit()
    record = run.wait_state(job_id, "polling", min_polls=1)
    poll_task = f"lipsync.poll[{record.step_task_id}]"  # its countdown retries keep this task id
    cancelled = json.loads(_cli(cluster, "cancel", job_id))
    assert (cancelled["status"], cancelled["error_code"]) == ("cancelled", "cancelled")
    outcomes = run.outcomes()
    assert outcomes[job_id] == cancelled
    assert simulator.generation(record.generation_id)["status"] == "stopped"
    assert str(record.generation_id) in [str(g) for g in simulator.stats()["stops"]]

    # The poll message that waited on its countdown comes due after the cancel, stale: the worker
    # ends it without a retry (drops it as revoked, or the guard ignores it) ...
    def stale_poll_ended() -> bool:
        lines = [line for line in cluster.workers[0].log().splitlines() if poll_task in line]
        return any(" received" not in line and " retry: " not in line for line in lines)

    wait_for(stale_poll_ended, timeout=20)
    # ... and it does nothing: after the stop, GEN hears nothing more of the job (no status poll,
    # no download).
    seen = simulator.stats()["requests"]
    stopped_at = min(r["t"] for r in seen if r["endpoint"] == "stop")
    late = [(r["method"], r["path"]) for r in seen if r["t"] > stopped_at and r["endpoint"] != "stop"]
    assert late == [], f"GEN was called after the stop: {late}"
    run.check_invariants(outcomes)
    assert not (cluster.storage / f"{job_id}.mp4").exists()
    # Cancelling again reports the same end and sends nothing new.
    assert json.loads(_cli(cluster, "cancel", job_id)) == cancelled
    assert run.receiver.ids() == [f"{job_id}.outcome"]


def test_run_message_lost_before_any_worker_took_it(fault_cluster: Any, simulator: Any, run_on: Any) -> None:
    """The helper records the job before sending it, so even a message lost in the queue is found."""
    cluster = fault_cluster(LIPSYNC_QUEUED_RECOVERY="3")
    run = run_on(cluster)
    (job_id,) = run.submit()
    record = run.record(job_id)
    assert record is not None and record.state == "queued"
    broker = redis.Redis.from_url(cluster.env["LIPSYNC_BROKER_URL"])
    assert broker.delete("lipsync") == 1, "the run message was waiting in the queue"
    cluster.start_worker()
    outcomes = run.outcomes()
    assert outcomes[job_id]["status"] == "completed"
    run.check_invariants(outcomes)
    record = run.record(job_id)
    assert record is not None and record.redrives == 1
