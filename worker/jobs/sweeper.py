"""The sweeper: finds jobs that stopped moving and drives them again.

Celery alone can lose a job's only message (a SIGKILLed worker holding a countdown poll, a retry
published while the broker was down, a Redis restart) or bring it back only after the visibility
timeout (two hours here). The job record knows when each job should next show a sign of life
(``overdue_at``); what makes a job overdue *now* is a worker that held it and died or reconnected
(:mod:`worker.jobs.liveness`), or its message missing from the broker (:mod:`worker.jobs.audit`).
Every worker runs a sweeper thread, and one of them per round (a Redis lease, :func:`sweep_round`)
re-drives jobs that are past due:

* it bumps the job's drive token under WATCH (so two sweepers never both take a job, and any old
  message that resurfaces later is stale and does nothing), then
* sends a fresh chain from the step the record says the job is at (submit, poll or fetch), whose
  last task carries the caller's task id so the caller's AsyncResult still resolves.

Finished jobs whose callbacks were not marked dispatched (a crash in between) get them re-sent,
with the same message ids. Webhooks in the outbox (:mod:`worker.callbacks.outbox`) that are past due (their
message was lost with a worker, or a broker restart) are sent again the same way: a new token, the
same webhook id. A job re-driven ``LIPSYNC_MAX_REDRIVES`` times fails (``redrive_limit``)
rather than crash-loop the fleet (re-drives a job owes to a reconnect or a broker loss are free).
Recovery takes ``LIPSYNC_NODE_DEAD_AFTER`` plus ``LIPSYNC_SWEEP_INTERVAL`` after a worker's death,
and one sweep after Redis answers again when a worker lost its broker connection; the overdue
timers (``LIPSYNC_RECOVERY_GRACE``, ``LIPSYNC_QUEUED_RECOVERY``) are the backstop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from worker.batches.progress import sweep_batches
from worker.callbacks.delivery import send_delivery
from worker.callbacks.outbox import EXPIRED
from worker.jobs import audit
from worker.jobs.cancel import DEFAULT_REASON, finish_cancel
from worker.jobs.liveness import Recovery, recover_stopped_holders
from worker.jobs.models import Job, LipsyncFailure, LipsyncResult
from worker.jobs.outcomes import finish
from worker.jobs.records import JobRecord
from worker.jobs.resources import Resources, resources
from worker.jobs.steps import remaining_steps, try_stop
from worker.names import SWEEPER_LEASE_KEY
from worker.ops import metrics
from worker.ops.misrouted import move_misrouted
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.sweeper")


@dataclass
class SweepReport:
    redriven: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    resent_webhooks: list[str] = field(default_factory=list)
    expired_webhooks: list[str] = field(default_factory=list)
    #: Cancels whose canceller died half-way, finished here.
    cancelled: list[str] = field(default_factory=list)
    #: Jobs this round could not sweep (an unreadable record, a refused send); tried next round.
    broken: list[str] = field(default_factory=list)
    #: Silent worker consumers this round could not judge dead (see SweeperThread).
    unjudged_holders: list[str] = field(default_factory=list)
    skipped: int = 0
    #: Batches that had stopped moving, continued (worker.batches.progress).
    batches: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """Whether the sweep did anything worth a log line."""
        return bool(
            self.redriven
            or self.redispatched
            or self.failed
            or self.resent_webhooks
            or self.expired_webhooks
            or self.cancelled
            or self.broken
            or self.batches
        )


#: Overdue jobs read from the active set at a time.
PAGE = 100


def sweep_once(queue: TaskQueue, res: Resources, *, now: float | None = None) -> SweepReport:
    """One pass over every overdue job and the overdue webhooks."""
    now = res.clock() if now is None else now
    report = SweepReport()
    for job_id in _overdue_jobs(res, now):
        try:
            _sweep_job(queue, res, job_id, now, report)
        except Exception:
            # One job's trouble must not end the round for all the others.
            log.exception("job %s: could not sweep it; will try again next round", job_id)
            report.broken.append(job_id)
    _resend_overdue_webhooks(queue, res, now, report)
    report.batches = sweep_batches(queue, res, now)
    return report


def _overdue_jobs(res: Resources, now: float) -> Iterator[str]:
    """Every job overdue at ``now``, each once, a page at a time (the longest overdue first).

    Sweeping a job normally takes it out of the overdue range (re-driven: due later; ended: gone).
    One that stays (an unreadable record, a job another sweeper holds) would come back at the head
    of every page: each page reads past the ones this round has seen, so however many there are,
    they cannot keep the round from the jobs behind them.
    """
    seen: set[str] = set()
    held = 0  # ids seen this round, still in the range, in the last page
    while True:
        limit = PAGE + held
        page = res.jobs.overdue(now, limit=limit)
        fresh = [job_id for job_id in page if job_id not in seen]
        held = len(page) - len(fresh)
        for job_id in fresh:
            seen.add(job_id)
            yield job_id
        if len(page) < limit:
            return


def _sweep_job(queue: TaskQueue, res: Resources, job_id: str, now: float, report: SweepReport) -> None:
    record = res.jobs.get(job_id)
    if record is None:
        res.jobs.forget_active(job_id)
        report.skipped += 1
        return
    if record.outcome is not None:
        # First: an outcome whose callbacks were not confirmed is owed to the caller, whether or
        # not the record holds a job (a request refused at the edge has none).
        _redispatch(queue, res, record, report)
        return
    if record.job is None:
        res.jobs.forget_active(job_id)
        report.skipped += 1
        return
    if record.cancel_requested:
        # The canceller flags the job before it stops the generation and records the outcome;
        # one that died in between lands here once its stop is overdue.
        _finish_cancel(queue, res, record, now, report)
        return
    if record.redrives >= res.settings.max_redrives:
        _give_up(queue, res, record, report)
        return
    taken = res.jobs.take_over(job_id, now=now, overdue_at=now + res.settings.queued_recovery)
    if taken is None or taken.job is None:
        report.skipped += 1
        return
    job = Job.model_validate(taken.job).model_copy(
        update={"drive": taken.drive, "step_retries": 0, "generation_id": taken.generation_id}
    )
    log.warning(
        "job %s: no progress since %s (state %s); re-driving (drive %d)",
        job_id,
        _ago(record.overdue_at, now),
        record.state,
        taken.drive,
    )
    try:
        redrive(queue, job)
    except Exception:
        # The broker refused: due again now, for the next round (not after the queued recovery).
        res.jobs.update(job_id, overdue_at=now)
        raise
    report.redriven.append(job_id)


def _finish_cancel(
    queue: TaskQueue, res: Resources, record: JobRecord, now: float, report: SweepReport
) -> None:
    """Finish a cancel whose canceller died: stop the generation on GEN (unless the record says
    what GEN answered already), then record and deliver the cancellation, once.

    One stop request per round, so a GEN that keeps failing cannot hold the round up: a transient
    failure is tried again in a later round, as the transient policy allows (counted in the record).
    """
    stop = None
    if record.generation_id and record.stop_result is None:
        stop = try_stop(res, record.job_id, record.generation_id, retries=record.stop_attempts)
        if stop.retry_in is not None:
            res.jobs.update(
                record.job_id,
                stop_attempts=record.stop_attempts + 1,
                last_error=stop.detail,
                overdue_at=now + stop.retry_in,
            )
            report.skipped += 1
            return
    log.warning("job %s: its cancel did not finish; finishing it", record.job_id)
    job = Job.model_validate(record.job) if record.job is not None else None
    reason = record.cancel_reason or DEFAULT_REASON
    finish_cancel(queue, res, record.job_id, job=job, reason=reason, stop=stop)
    report.cancelled.append(record.job_id)


def _resend_overdue_webhooks(queue: TaskQueue, res: Resources, now: float, report: SweepReport) -> None:
    for msg_id in res.outbox.overdue(now):
        drive = res.outbox.take_over(msg_id, now=now, due_at=now + res.settings.queued_recovery)
        if drive == EXPIRED:
            log.error("webhook %s expired from the outbox before it was delivered", msg_id)
            report.expired_webhooks.append(msg_id)
            continue
        if not drive:
            report.skipped += 1
            continue
        log.warning("webhook %s: no sign of its delivery since it was due; sending it again", msg_id)
        try:
            send_delivery(queue, msg_id, drive)
        except Exception:  # the broker refused: due again now, for the next round
            log.exception("webhook %s: could not send it again; will retry next sweep", msg_id)
            res.outbox.reschedule(msg_id, drive, due_at=now)
            continue
        report.resent_webhooks.append(msg_id)


def redrive(queue: TaskQueue, job: Job) -> None:
    """Send a fresh chain for ``job`` from the step it is at. Its last task takes the caller's task
    id, so the caller's AsyncResult resolves when it ends."""
    queue.send_chain(remaining_steps(job), job.for_message(), last_task_id=job.task_id)


def _redispatch(queue: TaskQueue, res: Resources, record: JobRecord, report: SweepReport) -> None:
    if record.callbacks_dispatched:
        res.jobs.forget_active(record.job_id)
        return
    assert record.outcome is not None
    job = Job.model_validate(record.job) if record.job is not None else None
    log.warning("job %s: outcome recorded but callbacks not confirmed; re-dispatching", record.job_id)
    # finish resolves the caller's AsyncResult too: the chain's last task died before storing it.
    finish(
        queue,
        res,
        job_id=record.job_id,
        callback=job.request.callback if job is not None else None,
        outcome=_outcome_model(record.outcome),
    )
    report.redispatched.append(record.job_id)


def _give_up(queue: TaskQueue, res: Resources, record: JobRecord, report: SweepReport) -> None:
    assert record.job is not None
    job = Job.model_validate(record.job)
    failure = LipsyncFailure(
        job_id=job.job_id,
        generation_id=record.generation_id,
        status="failed",
        error_code="redrive_limit",
        message=f"the job stopped making progress {record.redrives} times (workers dying on it?); giving up",
        model=job.model,
        metadata=job.request.metadata,
    )
    finish(
        queue, res, job_id=job.job_id, callback=job.request.callback, outcome=failure
    )  # resolves the caller
    # Invalidate whatever message may still resurface: after the outcome, so that a sweeper dying
    # in between leaves a job to give up again, not a cancel to finish.
    res.jobs.request_cancel(job.job_id)
    log.error("job %s: failed after %d re-drives", job.job_id, record.redrives)
    report.failed.append(job.job_id)


def _outcome_model(outcome: dict[str, Any]) -> LipsyncResult | LipsyncFailure:
    if outcome.get("status") == "completed":
        return LipsyncResult.model_validate(outcome)
    return LipsyncFailure.model_validate(outcome)


def _ago(when: float | None, now: float) -> str:
    return "an unknown time" if when is None else f"{now - when:.1f} s past due"


def sweep_round(queue: TaskQueue, res: Resources, *, trust_silence: bool) -> SweepReport:
    """One round of the sweeper:

    1. make what stopped holders held overdue (:mod:`worker.jobs.liveness`);
    2. move lipsync messages out of queues we do not consume (:mod:`worker.ops.misrouted`);
    3. when due, make jobs whose message is nowhere in the broker overdue (:mod:`worker.jobs.audit`);
    4. :func:`sweep_once` re-drives all of it, with everything else that is overdue.

    ``trust_silence``: whether the caller's own link to Redis has been up for
    ``LIPSYNC_NODE_DEAD_AFTER`` (see :func:`~worker.jobs.liveness.recover_stopped_holders`).
    """
    now, broker = res.clock(), res.broker_redis
    recovery = recover_stopped_holders(
        res.holders, broker, now=now, dead_after=res.settings.node_dead_after, trust_silence=trust_silence
    )
    if recovery:
        _log_recovery(recovery)
        audit.trouble_seen(res.redis, now)
    lost = audit.Audit()
    if broker is not None:
        if res.settings.misroute_queues:
            for wrong_queue, count in move_misrouted(broker, res.settings.misroute_queues).items():
                metrics.record_misrouted(res.redis, queue=wrong_queue, count=count)
        if audit.due(res.redis, now, interval=res.settings.audit_interval):
            lost = audit.audit(res.redis, broker, now=now, dead_after=res.settings.node_dead_after)
    report = sweep_once(queue, res)
    report.unjudged_holders = recovery.unjudged
    if report:
        log.warning("sweep: %s", report)
    _count_recoveries(res, recovery, lost, report)
    return report


def _log_recovery(recovery: Recovery) -> None:
    log.warning(
        "holders stopped: %d dead %s, %d released %s; re-driving the %d job(s) and %d webhook(s) they held",
        len(recovery.dead),
        recovery.dead,
        len(recovery.released),
        recovery.released,
        len(recovery.jobs),
        len(recovery.webhooks),
    )


def _count_recoveries(res: Resources, recovery: Recovery, lost: audit.Audit, report: SweepReport) -> None:
    overdue = len(report.redriven) - recovery.jobs_of_dead - recovery.jobs_of_released - len(lost.lost_jobs)
    for cause, count in (
        ("dead_worker", recovery.jobs_of_dead),
        ("released_on_reconnect", recovery.jobs_of_released),
        ("lost_message", len(lost.lost_jobs) + len(lost.lost_webhooks)),
        ("overdue", max(0, overdue)),
        ("webhook_overdue", len(report.resent_webhooks)),
        ("callbacks_redispatched", len(report.redispatched)),
    ):
        if count:
            metrics.record_recoveries(res.redis, cause=cause, count=count)


def release_lease(res: Resources, holder: str) -> None:
    """Give the round's lease back early, if this holder still has it."""
    if res.redis.get(SWEEPER_LEASE_KEY) == holder.encode():
        res.redis.delete(SWEEPER_LEASE_KEY)


def try_lease(res: Resources, holder: str, ttl: float) -> bool:
    """One sweeper per round across the fleet."""
    return bool(res.redis.set(SWEEPER_LEASE_KEY, holder, nx=True, px=max(1, int(ttl * 1000))))


#: More work for the lease winner's round, given by the app (layers above this one: the cards'
#: settle check, worker.cards.recovery.settle_overdue).
RoundWork = Callable[[TaskQueue, Resources], object]


class SweeperThread(threading.Thread):
    """Every ``LIPSYNC_SWEEP_INTERVAL``, in a worker's main process (started by the worker bootstep
    in :mod:`worker.app`): if this node wins the round's lease, :func:`sweep_round`, then each of
    ``extra_work``.

    ``trust_silence(dead_after)`` says whether this node's own link to Redis has been up long enough
    to read another node's silence as its death (see :meth:`worker.node.Node.trusts_silence`).
    """

    def __init__(
        self,
        queue: TaskQueue,
        holder: str,
        *,
        trust_silence: Callable[[float], bool] | None = None,
        extra_work: Sequence[RoundWork] = (),
    ) -> None:
        super().__init__(name="lipsync-sweeper", daemon=True)
        self.queue = queue
        self.holder = holder
        self.trust_silence = trust_silence or (lambda _dead_after: True)
        self.extra_work = tuple(extra_work)
        self.stopping = threading.Event()
        #: How soon to retry when not even the settings could be read (then: the sweep interval).
        self.retry_interval = 5.0

    def run(self) -> None:
        interval = self.retry_interval
        while not self.stopping.is_set():
            try:
                # Inside the try: an error building the resources must not end the sweeper thread.
                res = resources()
                interval = res.settings.sweep_interval
                if try_lease(res, self.holder, interval * 0.9):
                    self._round(res)
            except redis.ConnectionError as exc:
                # Redis restarting: expected, and said in one line (not a traceback every round).
                log.warning(
                    "sweep: Redis unreachable (%s); will retry in %.0f s", type(exc).__name__, interval
                )
            except Exception:
                log.exception("sweep failed; will retry in %.0f s", interval)
            self.stopping.wait(interval)

    def _round(self, res: Resources) -> None:
        unjudged = False
        try:
            trusted = self.trust_silence(res.settings.node_dead_after)
            unjudged = bool(sweep_round(self.queue, res, trust_silence=trusted).unjudged_holders)
        finally:
            # Each on its own: a failing sweep or one failing piece does not hold up the others.
            for work in self.extra_work:
                try:
                    work(self.queue, res)
                except Exception:
                    log.exception("%s failed; will retry next round", getattr(work, "__name__", work))
        if unjudged:
            # Silent workers this node is too new (or just back from an outage) to judge: hand the
            # lease back, so that a node that can takes the next round.
            release_lease(res, self.holder)
