"""worker.cards.flow against a real Redis and broker (nothing consumes the messages) and a fake clock."""

from __future__ import annotations

from typing import Any

from gensim import Fault, GenSimulator
from tests.unit.conftest import FakeClock, queued
from worker.cards import flow
from worker.cards.models import Target
from worker.cards.recovery import settle_overdue
from worker.cards.store import CardStore
from worker.celery_queue import CeleryQueue
from worker.jobs import steps
from worker.jobs.models import Job
from worker.jobs.resources import Resources
from worker.names import QUEUE_JOBS, TASK_FETCH, TASK_POLL, TASK_SUBMIT

TARGET = {"sheet_id": "101", "cell_id": "3000", "layer_id": "4000"}


def card(res: Resources, **fields: Any) -> None:
    flow.configure(res, {**TARGET, "lipSyncModel": "sync_so", "autoGenerate": True, **fields})


def runs(res: Resources) -> list[dict[str, Any]]:
    """The chains of the jobs started, oldest first: the job's id (the task id its chain's last
    step runs under), the request it carries and the steps that follow the submit."""
    return [
        {"id": m["last_id"], "request": m["args"][0]["request"], "chain": m["chain"]}
        for m in queued(res, QUEUE_JOBS)
        if m["task"] == TASK_SUBMIT
    ]


def test_without_auto_generate_a_change_is_recorded_stale_and_nothing_is_sent(
    res: Resources, queue: CeleryQueue
) -> None:
    card(res, autoGenerate=False)
    result = flow.record_change(res, {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001})
    assert result.action == "stale"
    state = CardStore(res.redis).state(Target(**TARGET))
    assert state.stale and state.seq == 1
    assert CardStore(res.redis).due(now=float("inf")) == []
    assert flow.settle(queue, res, Target(**TARGET), seq=1).action == "off"
    assert runs(res) == []


def test_only_the_newest_change_starts_a_job_once_its_window_passed(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    card(res, debounce_seconds=5)
    target = Target(**TARGET)
    flow.record_change(res, {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001})
    clock.advance(2)
    flow.record_change(res, {**TARGET, "audio_resource_id": 6002})
    assert flow.settle(queue, res, target, seq=1).action == "stale"
    early = flow.settle(queue, res, target, seq=2)
    assert early.action == "early" and early.wait is not None and 4.9 < early.wait <= 5
    clock.advance(5)
    started = flow.settle(queue, res, target, seq=2)
    assert (started.action, started.job_id) == ("start", "card.101.3000.4000~2")
    (run,) = runs(res)
    assert run["id"] == "card.101.3000.4000~2"
    assert run["chain"] == [TASK_POLL, TASK_FETCH]
    assert run["request"]["job_id"] == "card.101.3000.4000~2"
    assert run["request"]["audio_resource_id"] == "6002"
    assert run["request"]["model"] == "sync_so"
    assert run["request"]["callback"] is None
    # The same settle again (a redelivery) finds the job it started.
    assert flow.settle(queue, res, target, seq=2).job_id == "card.101.3000.4000~2"
    assert res.jobs.get("card.101.3000.4000~2") is not None


def test_a_job_that_names_no_model_takes_the_cards_then_the_default(res: Resources) -> None:
    card(res, lipSyncModel="sync.so")
    request = {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001}
    assert steps.create({**request, "job_id": "a"}, task_id="a", res=res).job.model == "sync_so"
    assert steps.create({**request, "job_id": "b", "model": "gen"}, task_id="b", res=res).job.model == "gen"
    elsewhere = {**request, "cell_id": "3001", "layer_id": None, "job_id": "c"}
    assert steps.create(elsewhere, task_id="c", res=res).job.model == res.settings.default_model


def test_the_settle_check_settles_a_change_whose_settle_was_lost(
    res: Resources, queue: CeleryQueue, clock: FakeClock
) -> None:
    card(res, debounce_seconds=5)
    flow.record_change(res, {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001})
    clock.advance(5)
    assert settle_overdue(queue, res) == []  # not overdue before the recovery grace
    clock.advance(res.settings.recovery_grace)
    assert settle_overdue(queue, res) == ["101.3000.4000"]
    assert [m["id"] for m in runs(res)] == ["card.101.3000.4000~1"]
    assert CardStore(res.redis).due(now=float("inf")) == []


def test_unchanged_sources_settle_to_nothing(res: Resources, queue: CeleryQueue, clock: FakeClock) -> None:
    card(res, debounce_seconds=0)
    target = Target(**TARGET)
    store = CardStore(res.redis)
    flow.record_change(res, {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001})
    flow.settle(queue, res, target, seq=1)
    assert store.retire(target, "card.101.3000.4000~1", completed=True)
    flow.record_change(res, {**TARGET, "video_resource_id": 5001})
    assert flow.settle(queue, res, target, seq=2).action == "nothing"
    assert len(runs(res)) == 1
    assert not store.state(target).stale


def test_a_supersede_whose_stop_gen_does_not_confirm_starts_nothing_until_it_does(
    res: Resources, queue: CeleryQueue, clock: FakeClock, sim: GenSimulator
) -> None:
    sim.durations = {"gen": 1000.0, "sync_so": 1000.0}  # still running when the stop is asked again
    card(res, debounce_seconds=0)
    target = Target(**TARGET)
    flow.record_change(res, {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001})
    first = flow.settle(queue, res, target, seq=1).job_id
    assert first is not None
    record = res.jobs.get(first)
    assert record is not None and record.job is not None
    submitted = steps.submit(Job.model_validate(record.job), res, record=record)
    assert isinstance(submitted, Job) and submitted.generation_id is not None
    sim.add_fault(Fault(endpoint="stop", status=403, times=None))

    flow.record_change(res, {**TARGET, "audio_resource_id": 6002})
    held = flow.settle(queue, res, target, seq=2)
    assert held.action == "stop_unconfirmed"
    assert [m["id"] for m in runs(res)] == [first], "a new job started beside a generation still running"
    ended = res.jobs.get(first)
    assert ended is not None and ended.outcome is not None
    assert ended.outcome["status"] == "superseded" and ended.outcome["generation_stopped"] is False

    sim.clear_faults()
    clock.advance(res.settings.recovery_grace + 1)
    assert settle_overdue(queue, res) == ["101.3000.4000"]
    assert sim.generation(submitted.generation_id)["stopped_by_api"]
    assert [m["id"] for m in runs(res)] == [first, "card.101.3000.4000~2"]


def test_a_job_whose_target_was_taken_while_it_was_created_is_never_sent(
    res: Resources, queue: CeleryQueue
) -> None:
    # The interleaving: settle A claimed change 1 and is about to create its job when settle B
    # claims change 2 (finding no job 1 to stop yet). A must not send job 1.
    card(res, debounce_seconds=0)
    target, store = Target(**TARGET), CardStore(res.redis)
    first, second = "card.101.3000.4000~1", "card.101.3000.4000~2"
    flow.record_change(res, {**TARGET, "video_resource_id": 5001, "audio_resource_id": 6001})
    assert store.claim(target, seq=1, job_id=first, fp="a", expected=None, due=0)
    seen_by_a = store.state(target)
    flow.record_change(res, {**TARGET, "audio_resource_id": 6002})
    assert store.claim(target, seq=2, job_id=second, fp="b", expected=first, due=0)

    flow._start(queue, res, target, seen_by_a)

    assert runs(res) == []
    ended = res.jobs.get(first)
    assert ended is not None and ended.outcome is not None
    assert (ended.outcome["status"], ended.outcome["superseded_by"]) == ("superseded", second)


def test_the_loop_guard_drops_only_the_side_that_is_our_output(res: Resources) -> None:
    card(res, debounce_seconds=0)
    target, store = Target(**TARGET), CardStore(res.redis)
    store.add_outputs(target, ["1009001", "https://cdn.example/outputs/lipsynced-9001.mp4"])
    ours = flow.record_change(res, {**TARGET, "video_url": "https://cdn.example/outputs/lipsynced-9001.mp4"})
    assert ours.action == "own_output" and store.state(target).seq == 0
    # GEN shows our output as the video and a new speech as the audio: the speech is a change.
    mixed = flow.record_change(res, {**TARGET, "video_resource_id": 1009001, "audio_resource_id": 6002})
    assert mixed.action == "scheduled"
    sources = store.state(target).sources
    assert sources is not None and (sources.video, sources.audio) == (None, "6002")
