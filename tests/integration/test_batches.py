"""Batches end to end: real worker processes, a real Redis, the GEN simulator, and the downstream
pipeline's own worker receiving the batch callback. Everything is counted from the other side: the
generations GEN created per target (each item has a target of its own), the generations running on
GEN at once, the stops GEN received, and the callbacks the pipeline took."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Cluster, wait_for
from tests.harness import own_target, target_of
from worker.batches.models import BatchInvalid
from worker.enqueue import batch_status, cancel_batch, enqueue, enqueue_batch
from worker.errors import LipsyncJobFailed
from worker.names import TASK_RUN_BATCH

pytestmark = pytest.mark.integration

BATCH_CALLBACK = {"task": "pipeline.on_lipsync", "queue": "media"}
#: Generations of this video fail on GEN ("No face detected").
FAILING_VIDEO = 5099


def items(
    count: int, *, first_target: int = 0, failing: frozenset[int] = frozenset()
) -> list[dict[str, Any]]:
    """Requests on targets of their own (``TARGETS[first_target + i]``)."""
    return [
        {
            **own_target(first_target + i),
            "video_resource_id": FAILING_VIDEO if i in failing else 5001 + i % 90,
            "audio_resource_id": 6001 + i % 90,
            "model": "gen",
            "metadata": {"clip": i},
        }
        for i in range(count)
    ]


def batch_callbacks(cluster: Cluster, batch_id: str) -> list[dict[str, Any]]:
    return [c for c in cluster.received_callbacks() if c["task_id"] == f"{batch_id}.batch"]


def wait_for_batch_callback(cluster: Cluster, batch_id: str, *, timeout: float) -> dict[str, Any]:
    wait_for(lambda: bool(batch_callbacks(cluster, batch_id)), timeout=timeout, interval=0.2)
    payload: dict[str, Any] = batch_callbacks(cluster, batch_id)[0]["payload"]
    return payload


def generations_per_target(sim: Any, requests: list[dict[str, Any]]) -> list[int]:
    by_target = sim.stats()["generations_by_target"]
    return [len(by_target.get(target_of(r), [])) for r in requests]


def most_running_at_once(sim: Any, generation_ids: list[str]) -> int:
    """The most of these generations GEN had running at the same moment (its own start and end)."""
    edges = []
    for generation_id in generation_ids:
        g = sim.generation(generation_id)
        edges += [(g["ready_at"] - g["duration"], 1), (g["ready_at"], -1)]
    running = most = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        most = max(most, running)
    return most


@pytest.fixture(scope="module")
def pipeline(cluster: Cluster) -> Cluster:
    cluster.start_consumer("media")
    return cluster


@pytest.fixture
def sim(simulator: Any) -> Iterator[Any]:
    yield simulator


# ----------------------------------------------------------------------------------------------
# a worker dies mid-batch
# ----------------------------------------------------------------------------------------------


def test_a_worker_killed_mid_batch_still_ends_in_one_batch_callback(
    make_cluster: Callable[..., Cluster], sim: Any
) -> None:
    cluster = make_cluster()
    victim = cluster.start_worker("victim", concurrency=2)
    cluster.start_worker("survivor", concurrency=2)
    cluster.start_consumer("media")
    failing = frozenset({7, 23, 48, 71, 96})
    requests = items(100, failing=failing)
    batch = {"batch_id": "season-1", "items": requests, "callback": BATCH_CALLBACK, "max_parallel": 10}
    enqueue_batch(batch, app=cluster.app())

    def ended() -> int:
        record = batch_status("season-1", app=cluster.app())
        return record.ended if record is not None else 0

    wait_for(lambda: ended() >= 30, timeout=120, interval=0.1)
    victim.kill()

    result = wait_for_batch_callback(cluster, "season-1", timeout=240)
    assert result["type"] == "lipsync.batch_result"
    assert result["counts"] == {"completed": 95, "failed": 5}
    assert {i for i, item in enumerate(result["items"]) if item["status"] == "failed"} == failing
    assert [item["job_id"] for item in result["items"]] == [f"season-1.{i}" for i in range(100)]
    assert [item["metadata"] for item in result["items"]] == [{"clip": i} for i in range(100)]
    # GEN created exactly one generation per item, counted on GEN's side.
    assert generations_per_target(sim, requests) == [1] * 100
    assert sim.stats()["generations_created"] == 100
    time.sleep(3)  # a second batch callback would come from the sweeper after LIPSYNC_RECOVERY_GRACE (2 s)
    assert len(batch_callbacks(cluster, "season-1")) == 1


def test_a_worker_killed_after_recording_the_result_still_sends_one_callback(
    make_cluster: Callable[..., Cluster], sim: Any
) -> None:
    cluster = make_cluster()
    doomed = cluster.start_worker("doomed", LIPSYNC_FAILPOINTS="batch.after_result")
    cluster.start_consumer("media")
    requests = items(4, first_target=300)
    enqueue_batch({"batch_id": "last-one", "items": requests, "callback": BATCH_CALLBACK}, app=cluster.app())
    # It dies as the last item ends: the batch result recorded, its callback not sent.
    wait_for(lambda: doomed.process.poll() is not None, timeout=60)
    record = batch_status("last-one", app=cluster.app())
    assert record is not None and record.outcome is not None and not record.dispatched
    assert batch_callbacks(cluster, "last-one") == []
    cluster.start_worker("heir")
    result = wait_for_batch_callback(cluster, "last-one", timeout=60)
    assert result["counts"] == {"completed": 4}
    assert generations_per_target(sim, requests) == [1] * 4
    time.sleep(3)  # past LIPSYNC_RECOVERY_GRACE: the heir's sweeper sends it no second time
    assert len(batch_callbacks(cluster, "last-one")) == 1


def test_a_worker_killed_while_starting_items_leaves_them_to_the_sweeper(
    make_cluster: Callable[..., Cluster], sim: Any
) -> None:
    cluster = make_cluster()
    doomed = cluster.start_worker("doomed", LIPSYNC_FAILPOINTS="batch.after_admit")
    cluster.start_consumer("media")
    requests = items(3, first_target=310)
    batch = {"batch_id": "lost-admission", "items": requests, "callback": BATCH_CALLBACK, "max_parallel": 2}
    enqueue_batch(batch, app=cluster.app())
    # It dies between reserving the first two items and recording them as jobs.
    wait_for(lambda: doomed.process.poll() is not None, timeout=60)
    record = batch_status("lost-admission", app=cluster.app())
    assert record is not None and record.admitted == 2 and sim.stats()["generations_created"] == 0
    cluster.start_worker("heir")
    result = wait_for_batch_callback(cluster, "lost-admission", timeout=90)
    assert result["counts"] == {"completed": 3}
    assert generations_per_target(sim, requests) == [1] * 3


# ----------------------------------------------------------------------------------------------
# fairness and max_parallel
# ----------------------------------------------------------------------------------------------


def test_a_single_job_enqueued_after_a_large_batch_does_not_wait_for_it(pipeline: Cluster, sim: Any) -> None:
    requests = items(200)
    enqueue_batch(
        {"batch_id": "catalogue", "items": requests, "callback": BATCH_CALLBACK, "max_parallel": 10},
        app=pipeline.app(),
    )

    def ended() -> int:
        record = batch_status("catalogue", app=pipeline.app())
        return record.ended if record is not None else 0

    wait_for(lambda: ended() >= 20, timeout=120, interval=0.1)  # the batch is in full swing
    single = {**own_target(399), "video_resource_id": 5001, "audio_resource_id": 6001, "model": "gen"}
    single["job_id"] = "single-after-batch"
    before = ended()
    outcome = enqueue(single, app=pipeline.app()).get(timeout=120)
    after = ended()
    print(
        f"\nsingle job: {outcome['timings']['total_seconds']:.2f} s in all, generation "
        f"{outcome['timings']['generation_seconds']:.2f} s; batch items ended meanwhile: {after - before} "
        f"({before} -> {after} of 200)"
    )
    # It ran beside the batch, not behind the 180 items still to come: a few batch items (the ones
    # in flight with it, at most max_parallel at a time) ended while it ran.
    assert after - before < 40
    assert after < 150
    result = wait_for_batch_callback(pipeline, "catalogue", timeout=300)
    assert result["counts"] == {"completed": 200}


def test_max_parallel_bounds_the_generations_gen_runs_at_once(pipeline: Cluster, sim: Any) -> None:
    sim.durations = {"gen": 1.5, "sync_so": 1.5}
    requests = items(12, first_target=200)
    enqueue_batch(
        {"batch_id": "narrow", "items": requests, "callback": BATCH_CALLBACK, "max_parallel": 3},
        app=pipeline.app(),
    )
    result = wait_for_batch_callback(pipeline, "narrow", timeout=120)
    assert result["counts"] == {"completed": 12}
    generation_ids = [item["generation_id"] for item in result["items"]]
    most = most_running_at_once(sim, generation_ids)
    print(f"\nmax_parallel 3: at most {most} generations running on GEN at once")
    assert most == 3


# ----------------------------------------------------------------------------------------------
# cancel, duplicates, bad input
# ----------------------------------------------------------------------------------------------


def test_cancel_stops_every_unfinished_item_on_gen(pipeline: Cluster, sim: Any) -> None:
    sim.durations = {"gen": 60.0, "sync_so": 60.0}
    requests = items(8, first_target=220)
    enqueue_batch(
        {"batch_id": "to-cancel", "items": requests, "callback": BATCH_CALLBACK, "max_parallel": 3},
        app=pipeline.app(),
    )
    wait_for(lambda: sim.stats()["generations_created"] == 3, timeout=30)
    record = cancel_batch("to-cancel", app=pipeline.app(), reason="wrong audio")
    assert record is not None
    result = wait_for_batch_callback(pipeline, "to-cancel", timeout=30)
    assert result["status"] == "cancelled"
    assert result["counts"] == {"cancelled": 8}
    stats = sim.stats()
    assert stats["generations_created"] == 3
    assert sorted(stats["stops"]) == sorted(int(i["generation_id"]) for i in result["items"][:3])
    assert all(i["generation_stopped"] for i in result["items"][:3])


def test_a_batch_enqueued_twice_runs_once(pipeline: Cluster, sim: Any) -> None:
    requests = items(6, first_target=240)
    batch = {"batch_id": "twice", "items": requests, "callback": BATCH_CALLBACK, "max_parallel": 2}
    enqueue_batch(batch, app=pipeline.app())
    enqueue_batch(batch, app=pipeline.app())
    # ... and once more by hand, as a producer without this package would.
    pipeline.app().send_task(TASK_RUN_BATCH, kwargs={"batch": batch})
    result = wait_for_batch_callback(pipeline, "twice", timeout=60)
    assert result["counts"] == {"completed": 6}
    assert generations_per_target(sim, requests) == [1] * 6
    # Re-sent after it finished: nothing runs again, no second callback.
    pipeline.app().send_task(TASK_RUN_BATCH, kwargs={"batch": batch}).get(timeout=30)
    time.sleep(3)
    assert generations_per_target(sim, requests) == [1] * 6
    assert len(batch_callbacks(pipeline, "twice")) == 1


def test_an_invalid_batch_runs_nothing(pipeline: Cluster, sim: Any) -> None:
    requests = items(4, first_target=260)
    requests[2].pop("audio_resource_id")
    batch = {"batch_id": "bad", "items": requests, "callback": BATCH_CALLBACK}
    with pytest.raises(BatchInvalid) as refused:
        enqueue_batch(batch, app=pipeline.app())
    missing_audio = {"index": 2, "field": "audio_resource_id", "message": "Field required (or audio_url)"}
    assert refused.value.errors == [missing_audio]
    # A raw send_task: the batch callback gets the refusal, and the task fails with it.
    sent = pipeline.app().send_task(TASK_RUN_BATCH, kwargs={"batch": batch})
    with pytest.raises(LipsyncJobFailed):
        sent.get(timeout=30)
    failure = wait_for_batch_callback(pipeline, "bad", timeout=30)
    assert failure["type"] == "lipsync.batch_failure" and failure["status"] == "rejected"
    assert failure["errors"] == [missing_audio]
    assert sim.stats()["generations_created"] == 0
    assert batch_status("bad", app=pipeline.app()) is None
