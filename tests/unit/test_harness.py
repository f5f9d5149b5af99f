"""The fault harness's own checks (tests/harness.py) can fail: the receiver-side invariant catches an
outcome webhook that carries anything but the job's recorded outcome, and counts repeats; the
soak's --defaults report fails on more repeats than POSTs in flight at a kill."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bench.soak import DefaultsReport, _posts_in_flight, _timings_line
from tests.conftest import WEBHOOK_SECRET
from tests.harness import Holdings, Run, target_of
from tests.unit.jobs.builders import created, failure, result
from tests.webhook_receiver import Arrival, Received, WebhookReceiver
from worker.jobs.resources import Resources
from worker.settings import Settings


@pytest.fixture
def receiver() -> Any:
    receiver = WebhookReceiver(secret=WEBHOOK_SECRET)
    yield receiver
    receiver.close()


def finished_run(res: Resources, receiver: WebhookReceiver) -> tuple[Run, dict[str, dict[str, Any]]]:
    """A run whose one job completed (generation 9001 on its target, as GEN counted it)."""
    job = created(res, "h1")
    outcome = result(job.job_id).model_dump(mode="json")
    res.jobs.end(job.job_id, outcome, state="completed", overdue_at=res.clock() + 60)
    request = {"job_id": job.job_id, "sheet_id": 101, "cell_id": 3001, "layer_id": 4001}
    stats = {"generations_by_target": {target_of(request): [9001]}, "generations_created": 1}
    run = Run(
        cluster=SimpleNamespace(redis=lambda: res.redis),  # type: ignore[arg-type]
        sim=SimpleNamespace(stats=lambda: stats),
        receiver=receiver,
        requests={job.job_id: request},
    )
    recorded = res.jobs.get(job.job_id)
    assert recorded is not None and recorded.outcome is not None
    return run, {job.job_id: recorded.outcome}


def take(receiver: WebhookReceiver, msg_id: str, payload: dict[str, Any]) -> None:
    receiver.received.append(Received(msg_id, payload, True, {}))


def test_one_delivery_of_the_recorded_outcome_passes(res: Resources, receiver: WebhookReceiver) -> None:
    run, outcomes = finished_run(res, receiver)
    take(receiver, "h1.outcome", outcomes["h1"])
    seen = run.check_invariants(outcomes, wait=0, max_repeated=0)
    assert seen.deliveries == {"h1": 1} and seen.repeated == 0


def test_a_repeated_delivery_is_counted_and_can_be_bounded(res: Resources, receiver: WebhookReceiver) -> None:
    run, outcomes = finished_run(res, receiver)
    take(receiver, "h1.outcome", outcomes["h1"])
    take(receiver, "h1.outcome", outcomes["h1"])
    assert run.check_invariants(outcomes, wait=0).repeated == 1
    with pytest.raises(AssertionError, match="repeated"):
        run.check_invariants(outcomes, wait=0, max_repeated=0)


def test_two_different_outcomes_under_one_id_fail(res: Resources, receiver: WebhookReceiver) -> None:
    run, outcomes = finished_run(res, receiver)
    take(receiver, "h1.outcome", outcomes["h1"])
    take(receiver, "h1.outcome", failure(job_id="h1").model_dump(mode="json"))
    with pytest.raises(AssertionError, match="differ from the recorded outcome"):
        run.check_invariants(outcomes, wait=0)


def test_a_delivery_that_is_not_the_recorded_outcome_fails(res: Resources, receiver: WebhookReceiver) -> None:
    run, outcomes = finished_run(res, receiver)
    take(receiver, "h1.outcome", {**outcomes["h1"], "generation_id": "1"})
    with pytest.raises(AssertionError, match="differ from the recorded outcome"):
        run.check_invariants(outcomes, wait=0)


# --------------------------------------------------------------------------------------------
# bench.soak --defaults: repeated deliveries are bounded by the POSTs in flight at a kill
# --------------------------------------------------------------------------------------------


def test_the_soak_fails_on_more_repeats_than_posts_in_flight_at_kills(receiver: WebhookReceiver) -> None:
    receiver.arrivals.append(Arrival(100.0, "a.outcome"))  # in flight when its node was killed
    receiver.arrivals.append(Arrival(200.0, "b.outcome"))  # sent again after the kill
    held = Holdings("w1", at=150.0, webhooks={"a.outcome": "a", "b.outcome": "b"})
    assert _posts_in_flight(held, receiver) == 1
    report = DefaultsReport(repeated_deliveries=1, posts_in_flight_at_kills=1)
    assert report.failures() == []
    report = DefaultsReport(repeated_deliveries=2, posts_in_flight_at_kills=1)
    assert any("taken again" in problem for problem in report.failures())
    report = DefaultsReport(conflicting_outcomes=1)
    assert report.failures()


def test_the_soak_mode_line_says_whether_the_learned_poll_schedule_is_on() -> None:
    assert "then learned per model" in _timings_line(Settings.model_construct(poll_learn=True))
    assert "learned poll schedule off" in _timings_line(Settings.model_construct(poll_learn=False))
    assert DefaultsReport().timings == _timings_line()
