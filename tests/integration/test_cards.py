"""Lipsync cards end to end: real Redis, real worker processes, the GEN simulator over HTTP.

What GEN did is counted from the simulator (generations per target, their sources, the stops it
received); what callers got is counted from a webhook receiver the card's callback points at.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import WEBHOOK_SECRET, Cluster, wait_for
from tests.harness import own_target, target_of
from tests.webhook_receiver import WebhookReceiver
from worker.cards.models import Target
from worker.cards.store import CardStore
from worker.names import TASK_CONFIGURE_CARD, TASK_REREAD, TASK_SOURCE_CHANGED
from worker.ops.metrics import CARD_CHANGES_KEY

pytestmark = pytest.mark.integration

#: Short windows, so the tests take seconds (the default is 5 s).
DEBOUNCE = 1.0


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    received = WebhookReceiver(secret=WEBHOOK_SECRET)
    try:
        yield received
    finally:
        received.close()


def configure(cluster: Cluster, target: dict[str, Any], receiver: WebhookReceiver, **card: Any) -> Any:
    body = {**target, "lipSyncModel": "gen", "autoGenerate": True, "debounce_seconds": DEBOUNCE}
    body.update(callback={"webhook_url": receiver.url}, metadata={"pipeline": "cards-test"})
    body.update(card)
    return cluster.app().send_task(TASK_CONFIGURE_CARD, kwargs={"card": body}).get(timeout=15)


def change(cluster: Cluster, target: dict[str, Any], **sources: Any) -> Any:
    return cluster.app().send_task(TASK_SOURCE_CHANGED, kwargs={"change": {**target, **sources}})


def generations(simulator: Any, target: dict[str, Any]) -> list[dict[str, Any]]:
    """The generations GEN created on the target, oldest first, as the simulator knows them."""
    ids = simulator.stats()["generations_by_target"].get(target_of(target), [])
    return [simulator.generation(gen_id) for gen_id in ids]


def sources_of(gen: dict[str, Any]) -> tuple[str, str]:
    """The video and audio resource ids a generation was asked for (the vidsheet dialect sends their
    URLs, which end in the id)."""
    video, audio = (str(v).rsplit("/", 1)[-1].split(".")[0] for v in (gen["video"], gen["audio"]))
    return video, audio


def outcomes(receiver: WebhookReceiver) -> dict[str, dict[str, Any]]:
    """The final outcome each job's webhook carried (by job id)."""
    return {
        r.payload["job_id"]: r.payload
        for r in receiver.received
        if r.payload.get("type") in ("lipsync.result", "lipsync.failure")
    }


def assert_one_in_flight_at_a_time(simulator: Any, target: dict[str, Any]) -> None:
    """GEN never ran two generations of the target at once: each started after the previous one
    ended (completed, or stopped by our stop request), by the simulator's own clock."""
    stats = simulator.stats()
    stopped_at: dict[str, float] = {}
    for request in stats["requests"]:
        if request["endpoint"] == "stop":
            gen_id = request["path"].rstrip("/").split("/")[-2]
            stopped_at.setdefault(gen_id, request["t"])
    spans = []
    for gen in generations(simulator, target):
        end = stopped_at.get(str(gen["id"])) if gen["stopped_by_api"] else gen["ready_at"]
        spans.append((gen["created_at"], end if end is not None else float("inf"), gen["id"]))
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        assert start >= end, f"generation {second} started while {first} was still running on GEN"


def test_twenty_changes_in_one_window_make_one_generation_for_the_latest_sources(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=2.0)
    # Changes sent at once are ordered by when a worker records them (docs/cards.md), and with two
    # processes the last two sent can be recorded either way round: the twentieth is sent once the
    # nineteen before it are recorded, still well inside the window, so that it is the latest.
    sent = [change(cluster, target, video_resource_id=5001, audio_resource_id=6001 + n) for n in range(19)]
    for result in sent:
        result.get(timeout=15)
    change(cluster, target, video_resource_id=5001, audio_resource_id=6020).get(timeout=15)
    wait_for(lambda: len(outcomes(receiver)) >= 1, timeout=30)
    time.sleep(2 * DEBOUNCE)  # nothing else may follow
    made = generations(simulator, target)
    assert len(made) == 1, made
    assert sources_of(made[0]) == ("5001", "6020")
    (outcome,) = outcomes(receiver).values()
    assert outcome["status"] == "completed"
    assert outcome["job_id"].endswith("~20")
    assert outcome["metadata"] == {"pipeline": "cards-test"}


def test_a_change_during_a_generation_supersedes_it(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    simulator.durations = {"gen": 8.0, "sync_so": 8.0}
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=0.5)
    change(cluster, target, video_resource_id=5002, audio_resource_id=6002).get(timeout=15)
    wait_for(lambda: len(generations(simulator, target)) == 1, timeout=20)
    simulator.durations = {"gen": 0.6, "sync_so": 0.6}
    change(cluster, target, audio_resource_id=6003).get(timeout=15)
    wait_for(lambda: len(outcomes(receiver)) >= 2, timeout=30)

    first, second = generations(simulator, target)
    assert first["stopped_by_api"] and first["status"] == "stopped", "GEN never saw the stop"
    assert sources_of(second) == ("5002", "6003")
    by_job = outcomes(receiver)
    old = next(o for o in by_job.values() if o["status"] != "completed")
    new = next(o for o in by_job.values() if o["status"] == "completed")
    assert old["status"] == "superseded" and old["error_code"] == "superseded"
    assert old["superseded_by"] == new["job_id"]
    assert old["generation_id"] == str(first["id"]) and old["generation_stopped"] is True
    assert new["generation_id"] == str(second["id"])
    assert_one_in_flight_at_a_time(simulator, target)


def test_with_auto_generate_off_a_change_is_recorded_stale_and_nothing_is_paid(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target, no_card = own_target(), own_target()
    configure(cluster, target, receiver, autoGenerate=False)
    recorded = [
        change(cluster, target, video_resource_id=5004, audio_resource_id=6004).get(timeout=15),
        change(cluster, no_card, video_resource_id=5005, audio_resource_id=6005).get(timeout=15),
    ]
    assert [r["action"] for r in recorded] == ["stale", "stale"]
    time.sleep(DEBOUNCE + 2)
    assert simulator.stats()["counts"].get("generate", 0) == 0
    assert receiver.received == []
    store = CardStore(cluster.redis())
    assert store.state(Target.model_validate(target)).stale
    assert store.state(Target.model_validate(no_card)).stale
    assert cluster.redis().hget(CARD_CHANGES_KEY, '["stale"]') == b"2"


def test_sources_equal_to_the_outputs_pay_nothing_and_the_written_back_output_is_no_change(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target = own_target()
    configure(cluster, target, receiver)
    change(cluster, target, video_resource_id=5006, audio_resource_id=6006).get(timeout=15)
    wait_for(lambda: len(outcomes(receiver)) == 1, timeout=30)
    (result,) = outcomes(receiver).values()
    # The same sources again (a pipeline re-sending what it sent), then GEN writing our output back.
    change(cluster, target, video_resource_id=5006, audio_resource_id=6006).get(timeout=15)
    loop = change(cluster, target, video_resource_id=result["output"]["id"]).get(timeout=15)
    assert loop["action"] == "own_output"
    time.sleep(DEBOUNCE + 3)
    assert len(generations(simulator, target)) == 1
    assert len(outcomes(receiver)) == 1


def test_a_worker_killed_mid_supersede_leaves_at_most_one_generation_in_flight(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    # Short GEN timeouts: a supersede's settle is overdue after one stop's time plus the grace.
    cluster = make_cluster(LIPSYNC_GEN_CONNECT_TIMEOUT="1", LIPSYNC_GEN_READ_TIMEOUT="2")
    simulator.durations = {"gen": 30.0, "sync_so": 30.0}
    first_worker = cluster.start_worker("w1", concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=0.5)
    change(cluster, target, video_resource_id=5007, audio_resource_id=6007).get(timeout=15)
    wait_for(lambda: len(generations(simulator, target)) == 1, timeout=20)
    wait_for(lambda: generations(simulator, target)[0]["status"] == "processing", timeout=20)
    first_worker.stop()
    # This one dies as it claims the target for the new sources: before stopping the old generation.
    doomed = cluster.start_worker("w2", concurrency=1, LIPSYNC_FAILPOINTS="cards.after_claim")
    simulator.durations = {"gen": 0.6, "sync_so": 0.6}
    change(cluster, target, audio_resource_id=6008).get(timeout=15)
    wait_for(lambda: doomed.process.poll() is not None, timeout=20)
    assert len(generations(simulator, target)) == 1
    cluster.start_worker("w3", concurrency=2)
    wait_for(lambda: len(outcomes(receiver)) >= 2, timeout=60)

    first, second = generations(simulator, target)
    assert first["stopped_by_api"]
    assert sources_of(second) == ("5007", "6008")
    statuses = sorted(o["status"] for o in outcomes(receiver).values())
    assert statuses == ["completed", "superseded"]
    assert_one_in_flight_at_a_time(simulator, target)


def test_changes_sent_concurrently_to_three_workers_are_all_recorded_and_make_one_generation(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name, concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=2.0)
    results: list[Any] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        result = change(cluster, target, video_resource_id=5010, audio_resource_id=6010 + n)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seqs = sorted(result.get(timeout=20)["seq"] for result in results)
    assert seqs == list(range(1, 31)), "a change was lost or counted twice"
    wait_for(lambda: len(outcomes(receiver)) >= 1, timeout=40)
    time.sleep(2 * DEBOUNCE)
    (made,) = generations(simulator, target)
    latest = CardStore(cluster.redis()).state(Target.model_validate(target)).sources
    assert latest is not None and sources_of(made) == (latest.video, latest.audio)
    (outcome,) = outcomes(receiver).values()
    assert outcome["status"] == "completed" and outcome["job_id"].endswith("~30")


def test_a_change_by_url_generates_with_that_url(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=0.5)
    speech = "https://media.example/speech/episode-12-v2.mp3"
    change(cluster, target, video_resource_id=5020, audio_url=speech).get(timeout=15)
    wait_for(lambda: len(outcomes(receiver)) == 1, timeout=30)
    (made,) = generations(simulator, target)
    assert made["audio"] == speech
    (outcome,) = outcomes(receiver).values()
    assert outcome["status"] == "completed"


def test_a_change_of_a_target_gen_does_not_know_ends_in_gens_404_not_silence(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target = {"sheet_id": 999, "cell_id": 3000}
    configure(cluster, target, receiver, debounce_seconds=0.2)
    change(cluster, target, video_resource_id=5021, audio_resource_id=6021).get(timeout=15)
    wait_for(lambda: len(outcomes(receiver)) == 1, timeout=30)
    (failure,) = outcomes(receiver).values()
    assert failure["status"] == "rejected" and failure["error_code"] == "not_found"
    assert simulator.stats()["counts"].get("generate") == 1


def test_a_gen_event_rereads_the_target_and_generates_for_what_gen_shows(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster()
    cluster.start_worker(concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=0.5)
    simulator.set_sources(target["sheet_id"], target["cell_id"], target["layer_id"], video=5030, audio=6030)
    # What the event receiver sends for an event naming the target's cell or layer.
    key = Target.model_validate(target).key
    reread = cluster.app().send_task(TASK_REREAD, kwargs={"target": key}).get(timeout=15)
    assert reread["action"] == "scheduled"
    wait_for(lambda: len(outcomes(receiver)) == 1, timeout=30)
    again = cluster.app().send_task(TASK_REREAD, kwargs={"target": key}).get(timeout=15)
    assert again["action"] == "unchanged"
    time.sleep(DEBOUNCE + 1)
    (made,) = generations(simulator, target)
    assert sources_of(made) == ("5030", "6030")


def test_with_autocontentengine_a_change_by_url_is_uploaded_to_gen_then_generated(
    make_cluster: Any, simulator: Any, receiver: WebhookReceiver
) -> None:
    cluster = make_cluster(LIPSYNC_GEN_DIALECT="autocontentengine")
    cluster.start_worker(concurrency=2)
    target = own_target()
    configure(cluster, target, receiver, debounce_seconds=0.5)
    speech = f"{simulator.base_url}/cdn/uploads/6040.mp3"
    change(cluster, target, video_resource_id=5040, audio_url=speech).get(timeout=15)
    wait_for(lambda: len(outcomes(receiver)) == 1, timeout=30)
    (made,) = generations(simulator, target)
    uploads = [r for r in simulator.stats()["requests"] if r["endpoint"] == "upload_content_resource"]
    assert len(uploads) == 1
    assert made["dialect"] == "old" and made["video"] == "5040"
    assert simulator.uploaded(made["audio"]) == requests.get(speech, timeout=10).content
    (outcome,) = outcomes(receiver).values()
    assert outcome["status"] == "completed"
