"""Liveness against real parts: holders, heartbeats and holdings on a real Redis (Redis server time),
the real sweeper re-driving through the real CeleryQueue (messages read back with :func:`queued`).

A holder is dead after ``LIPSYNC_NODE_DEAD_AFTER`` (20 s by default) of silence; these tests ask for
silence of a fraction of a second instead, because heartbeats are stamped with Redis's own clock,
which a test cannot move. The integration tests (tests/integration/test_liveness.py) run the
defaults with real worker processes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import bootsteps

from tests.unit.conftest import queued, unit_settings
from tests.unit.jobs.builders import created, result, submitted
from worker.celery_queue import CeleryQueue
from worker.dev.embedded_redis import free_port
from worker.jobs.liveness import recover_stopped_holders
from worker.jobs.resources import Resources
from worker.jobs.sweeper import SweeperThread, sweep_once, try_lease
from worker.names import (
    BROKER_UNACKED_KEY,
    HOLDERS_KEY,
    QUEUE_CALLBACKS,
    QUEUE_JOBS,
    TASK_DELIVER_WEBHOOK,
    TASK_POLL,
    TASK_RUN,
)
from worker.node import OWED_RETRY, ConnectionStep, HeartbeatThread, Node, _holding_of
from worker.ops.replies import as_text
from worker.settings import Settings

SILENCE = 0.3


def unacked(res: Resources, tag: str) -> None:
    """Put a message in kombu's unacknowledged hash, as the transport does when a worker takes it."""
    res.redis.hset(BROKER_UNACKED_KEY, tag, "[]")


def held_by(res: Resources, job_id: str) -> str | None:
    raw = res.redis.hget("lipsync:job:" + job_id, "held_by")
    return raw.decode() if isinstance(raw, bytes) and raw else None


def recover(res: Resources, *, trust_silence: bool = True) -> Any:
    return recover_stopped_holders(
        res.holders, res.broker_redis, now=res.clock(), dead_after=SILENCE, trust_silence=trust_silence
    )


def go_silent() -> None:
    time.sleep(SILENCE + 0.1)


def unreachable(tmp_path: Path, **settings: Any) -> Resources:
    """Resources on a Redis nobody listens on (one restarting), failing fast."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    down = Resources(unit_settings(url, "http://127.0.0.1:9", tmp_path).model_copy(update=settings))
    down.redis.connection_pool.connection_kwargs.update(socket_connect_timeout=0.2)
    return down


# --------------------------------------------------------------------------------------------
# recording who holds a job
# --------------------------------------------------------------------------------------------


def test_the_current_message_records_its_holder(res: Resources) -> None:
    job = submitted(res)
    assert res.holders.hold_job(job.job_id, "a", "tag-1", drive=job.drive) == 1
    assert held_by(res, job.job_id) == "a"


def test_a_stale_message_never_claims_a_job_someone_else_holds(res: Resources) -> None:
    job = submitted(res)
    res.holders.hold_job(job.job_id, "a", "tag-1", drive=job.drive)
    assert res.holders.hold_job(job.job_id, "b", "tag-0", drive=job.drive - 1 if job.drive > 1 else 99) == 0
    assert held_by(res, job.job_id) == "a"


def test_a_job_without_a_record_or_with_an_outcome_is_not_held(res: Resources) -> None:
    assert res.holders.hold_job("nobody-knows-me", "a", "t", drive=1) == -1
    assert not res.redis.exists("lipsync:job:nobody-knows-me")
    job = submitted(res)
    res.redis.hset("lipsync:job:" + job.job_id, "outcome", "{}")
    assert res.holders.hold_job(job.job_id, "a", "t", drive=job.drive) == 0


def test_a_run_message_holds_the_job_only_until_its_chain_started(res: Resources) -> None:
    job = created(res)
    assert res.holders.hold_job(job.job_id, "a", "t1", drive=None) == 1
    res.jobs.mark_once(job.job_id, "chain_started")
    assert res.holders.hold_job(job.job_id, "b", "t2", drive=None) == 0
    assert held_by(res, job.job_id) == "a"


# --------------------------------------------------------------------------------------------
# heartbeats
# --------------------------------------------------------------------------------------------


def test_a_beating_holder_is_not_silent_and_a_quiet_one_is(res: Resources) -> None:
    res.holders.beat("quiet")
    go_silent()
    res.holders.beat("alive")
    silent = res.holders.silent(SILENCE)
    assert "quiet" in silent and "alive" not in silent


def test_a_released_holder_is_recovered_at_once_and_never_beats_again(res: Resources) -> None:
    res.holders.beat("h")
    res.holders.release("h")
    assert res.holders.silent(3600) == {"h": 0.0}
    assert res.holders.beat("h") is False
    assert res.redis.zscore(HOLDERS_KEY, "h") == 0.0


# --------------------------------------------------------------------------------------------
# recovery
# --------------------------------------------------------------------------------------------


def test_a_dead_holders_job_is_redriven_in_the_same_round(res: Resources, queue: CeleryQueue) -> None:
    job = submitted(res)
    res.holders.beat("dead")
    res.holders.hold_job(job.job_id, "dead", "tag-1", drive=job.drive)
    unacked(res, "tag-1")
    go_silent()
    recovery = recover(res)
    assert recovery.dead == ["dead"] and recovery.jobs == [job.job_id]
    report = sweep_once(queue, res)
    assert report.redriven == [job.job_id]
    [message] = [m for m in queued(res, QUEUE_JOBS) if m["task"] == TASK_POLL]
    assert message["args"][0]["drive"] == job.drive + 1
    # The holder is forgotten once what it held was recovered.
    assert res.redis.zscore(HOLDERS_KEY, "dead") is None


def test_a_message_acknowledged_or_put_back_is_not_redriven(res: Resources, queue: CeleryQueue) -> None:
    # The holder took the message and was done with it (acked: gone from the unacked hash) before
    # it died; the job's next message waits in a queue, where a backlog is not a failure.
    job = submitted(res)
    res.holders.beat("dead")
    res.holders.hold_job(job.job_id, "dead", "tag-done", drive=job.drive)
    go_silent()
    assert recover(res).jobs == []
    assert sweep_once(queue, res).redriven == []


def test_a_live_holders_jobs_are_left_alone(res: Resources) -> None:
    job = submitted(res)
    res.holders.beat("slow-but-alive")
    res.holders.hold_job(job.job_id, "slow-but-alive", "tag-1", drive=job.drive)
    unacked(res, "tag-1")
    assert recover(res).jobs == []
    assert held_by(res, job.job_id) == "slow-but-alive"


def test_a_job_nobody_took_is_never_redriven_early(res: Resources) -> None:
    job = created(res)  # recorded; its message waits in a queue
    res.holders.beat("dead")
    go_silent()
    assert recover(res).jobs == []
    record = res.jobs.get(job.job_id)
    assert record is not None and record.overdue_at is not None
    assert record.overdue_at > res.clock() + 60


def test_after_its_own_outage_a_sweeper_recovers_only_released_holders(res: Resources) -> None:
    # Everyone's heartbeat looks old to a node whose link to Redis just came back: their silence
    # may have been the outage's. What a live node said it dropped is still recovered.
    quiet, dropped = submitted(res, "j1"), submitted(res, "j2")
    res.holders.beat("quiet")
    res.holders.beat("reconnected")
    res.holders.hold_job(quiet.job_id, "quiet", "t-quiet", drive=quiet.drive)
    res.holders.hold_job(dropped.job_id, "reconnected", "t-dropped", drive=dropped.drive)
    unacked(res, "t-quiet")
    unacked(res, "t-dropped")
    res.holders.release("reconnected")
    go_silent()
    recovery = recover(res, trust_silence=False)
    assert recovery.jobs == [dropped.job_id] and recovery.released == ["reconnected"]
    assert recovery.dead == []
    assert recover(res, trust_silence=True).jobs == [quiet.job_id]


def test_a_job_taken_by_another_holder_meanwhile_stays_with_it(res: Resources) -> None:
    job = submitted(res)
    res.holders.beat("dead")
    res.holders.hold_job(job.job_id, "dead", "t1", drive=job.drive)
    unacked(res, "t1")
    go_silent()
    [(job_id, holder, _tag)] = list(res.holders.held_jobs({"dead"}))
    res.holders.hold_job(job.job_id, "b", "t2", drive=job.drive)  # Redis gave it to b meanwhile
    assert res.holders.job_overdue(job_id, holder, at=res.clock(), released=False) is False
    assert held_by(res, job.job_id) == "b"


def test_a_webhook_held_by_a_dead_holder_is_sent_again(res: Resources, queue: CeleryQueue) -> None:
    drive = res.outbox.put("msg-1", "http://127.0.0.1:9/hook", {"x": 1}, due_at=res.clock() + 3600)
    res.holders.beat("dead")
    res.holders.hold_webhook("msg-1", "dead", "t-w", drive=drive)
    unacked(res, "t-w")
    go_silent()
    assert recover(res).webhooks == ["msg-1"]
    report = sweep_once(queue, res)
    assert report.resent_webhooks == ["msg-1"]
    [message] = [m for m in queued(res, QUEUE_CALLBACKS) if m["task"] == TASK_DELIVER_WEBHOOK]
    assert message["kwargs"]["msg_id"] == "msg-1" and message["kwargs"]["drive"] > drive


# --------------------------------------------------------------------------------------------
# the node: what a consumer records when it takes a message, and on reconnect
# --------------------------------------------------------------------------------------------


def request(name: str, tag: str, *args: Any, **kwargs: Any) -> Any:
    """What the consumer hands the ``task_received`` signal: only the fields the node reads."""
    return SimpleNamespace(
        name=name, id=f"id-{tag}", args=args, kwargs=kwargs, message=SimpleNamespace(delivery_tag=tag)
    )


def test_the_node_records_each_message_it_takes(res: Resources) -> None:
    node = Node("n1", resources=lambda: res)
    job = submitted(res)
    node.took(request(TASK_POLL, "t-poll", res.jobs.get(job.job_id).job))  # type: ignore[union-attr]
    assert held_by(res, job.job_id) == node.holder


def test_a_raw_run_message_gets_its_record_when_taken(res: Resources) -> None:
    node = Node("n1", resources=lambda: res)
    raw = {"job_id": "raw-1", "sheet_id": 1, "cell_id": 2, "video_resource_id": 3, "audio_resource_id": 4}
    node.took(request(TASK_RUN, "t-run", request=raw))
    record = res.jobs.get("raw-1")
    assert record is not None and record.task_id == "id-t-run"
    assert held_by(res, "raw-1") == node.holder


def test_a_message_the_node_cannot_read_does_not_stop_it(res: Resources) -> None:
    node = Node("n1", resources=lambda: res)
    node.took(request(TASK_POLL, "t", "not a job"))
    node.took(request(TASK_RUN, "t", request={"job_id": "bad", "sheet_id": "x"}))
    assert res.jobs.get("bad") is None


@pytest.mark.parametrize("ended", ["lost", "connected"])
def test_a_connection_that_ended_releases_what_it_held(res: Resources, ended: str) -> None:
    # Celery drops what a connection held when it loses it. The release comes at the loss (Node.lost,
    # from the consumer step's stop); a reconnect whose loss the node never heard of releases too.
    node = Node("n1", resources=lambda: res)
    node.connected()
    first = node.holder
    node.beat()
    getattr(node, ended)()
    assert node.holder != first
    assert res.redis.zscore(HOLDERS_KEY, first) == 0.0
    node.beat()
    assert res.redis.zscore(HOLDERS_KEY, node.holder) > 0  # type: ignore[operator]


def test_a_loss_releases_once_and_the_reconnect_keeps_its_new_holder(res: Resources) -> None:
    node = Node("n1", resources=lambda: res)
    node.connected()
    first = node.holder
    node.lost()
    second = node.holder
    node.lost()  # Celery stops the consumer's steps again after a failed reconnect: nothing more
    node.connected()
    assert node.holder == second
    released: Any = res.redis.zrangebyscore(HOLDERS_KEY, 0, 0)
    assert [as_text(h) for h in released] == [first]


def test_a_release_owed_while_redis_is_down_is_written_as_soon_as_it_answers(
    res: Resources, tmp_path: Path
) -> None:
    # At a Redis restart the loss comes while Redis is down: the heartbeat writes the release, and
    # must not wait for its interval (5 s by default, 30 s here) to do so.
    down = unreachable(tmp_path)
    current = [res]
    node = Node("n1", resources=lambda: current[0])
    node.connected()
    first = node.holder
    thread = HeartbeatThread(node, interval=30.0)
    thread.start()
    try:
        assert _wait_for(lambda: (res.redis.zscore(HOLDERS_KEY, first) or 0) > 0)
        current[0] = down
        node.lost()
        assert node.owes()
        current[0] = res
        back = time.monotonic()
        assert _wait_for(lambda: res.redis.zscore(HOLDERS_KEY, first) == 0.0, timeout=5)
        assert time.monotonic() - back < 2 * OWED_RETRY + 0.5
        assert _wait_for(lambda: not node.owes())
    finally:
        thread.stop()
        thread.join(2)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("state", "releases"),
    [(bootsteps.RUN, True), (bootsteps.CLOSE, False)],  # type: ignore[attr-defined]
    ids=["connection-lost", "shutdown"],
)
def test_only_a_lost_connection_releases_the_holder_not_a_shutdown(
    res: Resources, state: int, releases: bool
) -> None:
    # Celery stops the consumer's steps with its blueprint running when the connection is lost, and
    # closing at a warm shutdown, which finishes the running steps and puts back what is reserved:
    # released then, the sweeper would re-drive steps that are still running.
    node = Node("n1", resources=lambda: res)
    node.connected()
    first = node.holder
    consumer = SimpleNamespace(
        controller=SimpleNamespace(lipsync_node=node), blueprint=SimpleNamespace(state=state)
    )
    ConnectionStep(consumer).stop(consumer)
    assert (res.redis.zscore(HOLDERS_KEY, first) == 0.0) is releases
    assert (node.holder != first) is releases


def test_trust_needs_an_unbroken_link_for_the_whole_window(res: Resources) -> None:
    node = Node("n1", resources=lambda: res)
    assert not node.trusts_silence(0.0)
    node.beat()
    assert node.trusts_silence(0.0) and not node.trusts_silence(60)


def test_a_raw_run_message_without_a_job_id_gets_its_task_id_as_job_id(res: Resources) -> None:
    node = Node("n1", resources=lambda: res)
    raw = {"sheet_id": 1, "cell_id": 2, "video_resource_id": 3, "audio_resource_id": 4}
    node.took(request(TASK_RUN, "t-anon", request=raw))
    record = res.jobs.get("id-t-anon")
    assert record is not None and record.task_id == "id-t-anon"
    assert held_by(res, "id-t-anon") == node.holder


def test_a_job_dropped_by_a_reconnecting_worker_is_redriven_without_counting_toward_the_limit(
    res: Resources, queue: CeleryQueue
) -> None:
    # Five Redis restarts must not fail a healthy job with redrive_limit; five worker deaths may.
    job = submitted(res)
    for round_ in range(res.settings.max_redrives + 2):
        holder = f"reconnected-{round_}"
        current = res.jobs.get(job.job_id)
        assert current is not None and current.outcome is None
        res.holders.hold_job(job.job_id, holder, f"t-{round_}", drive=current.drive)
        unacked(res, f"t-{round_}")
        res.holders.release(holder)
        recover(res)
        assert sweep_once(queue, res).redriven == [job.job_id]
    record = res.jobs.get(job.job_id)
    assert record is not None and record.redrives == 0 and record.outcome is None


def test_a_job_held_by_dead_workers_counts_toward_the_limit(res: Resources, queue: CeleryQueue) -> None:
    job = submitted(res)
    res.holders.beat("dead")
    res.holders.hold_job(job.job_id, "dead", "t1", drive=job.drive)
    unacked(res, "t1")
    go_silent()
    recover(res)
    sweep_once(queue, res)
    record = res.jobs.get(job.job_id)
    assert record is not None and record.redrives == 1


def test_a_holding_redis_refused_at_receipt_is_written_by_the_next_beat(
    res: Resources, queue: CeleryQueue, tmp_path: Path
) -> None:
    down = unreachable(tmp_path)
    current = [down]
    node = Node("n1", resources=lambda: current[0])
    node.connected()
    job = submitted(res)
    record = res.jobs.get(job.job_id)
    assert record is not None
    node.took(request(TASK_POLL, "t-during-restart", record.job))  # Redis is restarting
    taken_by = node.holder
    node.connected()  # ... and the worker reconnects: what it held is gone from its memory
    assert held_by(res, job.job_id) is None
    current[0] = res  # Redis is back
    node.beat()
    assert held_by(res, job.job_id) == taken_by
    assert res.redis.zscore(HOLDERS_KEY, taken_by) == 0.0  # released: recovered at once
    unacked(res, "t-during-restart")
    assert recover(res).jobs == [job.job_id]


def test_a_job_whose_last_step_died_after_recording_its_outcome_is_told_at_once(
    res: Resources, queue: CeleryQueue
) -> None:
    # The fetch recorded the result, then its worker lost the broker and cancelled it before the
    # callbacks went out: without liveness the sweeper would wait LIPSYNC_RECOVERY_GRACE.
    job = submitted(res)
    res.holders.hold_job(job.job_id, "fetcher", "t-fetch", drive=job.drive)
    unacked(res, "t-fetch")
    outcome = result(job.job_id).model_dump(mode="json")
    res.jobs.end(job.job_id, outcome, state="completed", overdue_at=res.clock() + 60)
    res.holders.release("fetcher")
    assert recover(res).jobs == [job.job_id]
    report = sweep_once(queue, res)
    assert report.redispatched == [job.job_id]
    assert job.task_id is not None and queue.app.AsyncResult(job.task_id).state == "SUCCESS"


def test_a_sweeper_too_new_to_judge_silence_hands_the_lease_to_one_that_can(
    settings: Settings, queue: CeleryQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node that just joined cannot tell a dead worker from an outage; if it kept winning the
    # round's lease, a dead worker's jobs would wait until it had been up for NODE_DEAD_AFTER.
    quick = settings.model_copy(update={"heartbeat_interval": 0.1, "node_dead_after": SILENCE})
    res = Resources(quick)
    monkeypatch.setattr("worker.jobs.sweeper.resources", lambda: res)
    res.holders.beat("dead")
    go_silent()

    def newcomer_trusts(_dead_after: float) -> bool:
        newcomer.stopping.set()  # one round only
        return False

    newcomer = SweeperThread(queue, "newcomer", trust_silence=newcomer_trusts)
    newcomer.run()
    assert res.redis.zscore(HOLDERS_KEY, "dead") is not None  # not judged by the newcomer
    assert try_lease(res, "old-timer", 60)  # and the next round is someone else's


# --------------------------------------------------------------------------------------------
# the heartbeat and the sweeper never die of an error
# --------------------------------------------------------------------------------------------


class _FailingHolders:
    """``res.holders`` whose first heartbeat raises a non-Redis error."""

    def __init__(self, holders: Any) -> None:
        self.holders, self.failed = holders, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.holders, name)

    def beat(self, holder: str) -> bool:
        if not self.failed:
            self.failed = True
            raise ValueError("not a Redis error")
        return bool(self.holders.beat(holder))


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.mark.parametrize("failing", ["resources", "holders"])
def test_the_heartbeat_thread_outlives_a_non_redis_error(res: Resources, failing: str) -> None:
    # A dead heartbeat thread makes a live node look dead: the sweeper would re-drive everything it
    # takes, and each re-drive counts toward LIPSYNC_MAX_REDRIVES.
    calls = [0]
    failing_res = SimpleNamespace(holders=_FailingHolders(res.holders))

    def resources() -> Any:
        calls[0] += 1
        if failing == "resources":
            if calls[0] == 1:
                raise ValueError("settings could not be read")
            return res
        return failing_res

    node = Node("n1", resources=resources)
    thread = HeartbeatThread(node, interval=0.05)
    thread.start()
    try:
        assert _wait_for(lambda: res.redis.zscore(HOLDERS_KEY, node.holder) is not None)
        first = res.redis.zscore(HOLDERS_KEY, node.holder)
        assert first is not None and first > 0
        assert _wait_for(lambda: (res.redis.zscore(HOLDERS_KEY, node.holder) or 0) > first)
        assert thread.is_alive()
    finally:
        thread.stop()
        thread.join(2)


def test_a_holding_that_cannot_be_written_never_blocks_the_heartbeat(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A holding Redis refused at receipt waits for the next beat; one that fails with anything but
    # a Redis error would fail on every beat, and must neither keep the heartbeat from landing nor
    # the holdings behind it from being written.
    node = Node("n1", resources=lambda: res)
    node.connected()
    poison, good = submitted(res, "poison"), submitted(res, "good")
    hold_job = res.holders.hold_job

    def hold(job_id: str, *args: Any, **kwargs: Any) -> int:
        if job_id == poison.job_id:
            raise ValueError("cannot be written")
        return int(hold_job(job_id, *args, **kwargs))

    monkeypatch.setattr(res.holders, "hold_job", hold)
    for job, tag in ((poison, "t-poison"), (good, "t-good")):
        record = res.jobs.get(job.job_id)
        assert record is not None
        holding = _holding_of(request(TASK_POLL, tag, record.job))
        assert holding is not None
        node._pending_holds.append((holding, node.holder))
    node.beat()
    score = res.redis.zscore(HOLDERS_KEY, node.holder)
    assert score is not None and score > 0
    assert node.trusts_silence(0.0)
    assert held_by(res, good.job_id) == node.holder and held_by(res, poison.job_id) is None
    assert node._pending_holds == []  # dropped (logged), not retried forever
    go_silent()
    node.beat()
    assert (res.redis.zscore(HOLDERS_KEY, node.holder) or 0) > score


def test_the_sweeper_thread_outlives_an_error_reading_its_resources(
    settings: Settings, queue: CeleryQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    quick = settings.model_copy(update={"sweep_interval": 0.05})
    res = Resources(quick)
    calls = [0]

    def resources() -> Resources:
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("settings could not be read")
        return res

    monkeypatch.setattr("worker.jobs.sweeper.resources", resources)
    sweeper = SweeperThread(queue, "sweeper-1")
    sweeper.retry_interval = 0.05
    sweeper.start()
    try:
        assert _wait_for(lambda: calls[0] >= 3)
        assert sweeper.is_alive()
    finally:
        sweeper.stopping.set()
        sweeper.join(5)


def test_the_sweeper_says_redis_is_unreachable_in_one_line_per_round(
    settings: Settings, queue: CeleryQueue, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every worker sweeps every 5 s: through a Redis restart a traceback each time buries the log.
    down = unreachable(tmp_path, sweep_interval=0.05)
    caplog.set_level(logging.WARNING, logger="lipsync.sweeper")
    sweeper = SweeperThread(queue, "sweeper-1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("worker.jobs.sweeper.resources", lambda: down)
        sweeper.start()
        try:
            assert _wait_for(lambda: len(caplog.records) >= 2)
        finally:
            sweeper.stopping.set()
            sweeper.join(5)
    assert all("Redis unreachable" in r.getMessage() and r.exc_info is None for r in caplog.records)
