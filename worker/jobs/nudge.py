"""Poll now: what one of GEN's own events does to the jobs it names (see :mod:`worker.events`).

An event is a hint, never the truth. It names a generation, a cell or a layer; the jobs waiting on
it have their next poll moved to now instead of waiting out the poll schedule, and that poll reads
GEN's status as every poll does. Lost, late, duplicated or unreadable events change nothing else:
without them jobs complete on the schedule, as before.

A nudge is a re-drive from the poll step (:func:`worker.jobs.sweeper.redrive`) taken atomically on
the job record (:meth:`~worker.jobs.records.JobStore.nudge`): the drive token is bumped, so the
countdown poll the job was waiting for turns stale and is dropped when it comes due. It is free
(not counted toward ``LIPSYNC_MAX_REDRIVES``), and bounded, so that a storm of events cannot become
a storm of polls: only a job in ``polling`` whose next poll is more than :data:`MIN_GAIN` away is
nudged, at most once per ``LIPSYNC_EVENTS_NUDGE_INTERVAL``, and never while a poll of it is due
or running.

Which jobs an event names: the jobs of the generation ids it carries, when the index knows one
(an event about a generation is about that generation); otherwise the jobs on the cells and layers
it carries (an event about a row).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from worker.jobs.models import Job
from worker.jobs.records import NudgeVerdict
from worker.jobs.resources import Resources
from worker.jobs.sweeper import redrive
from worker.names import FREE_REDRIVE
from worker.ops import metrics
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.events")

#: Seconds: a job whose next poll is due sooner than this anyway is left alone (a nudge would gain
#: less than it costs: a message, and the countdown one left to be dropped).
MIN_GAIN = 1.0

#: Verdicts of jobs that wait on GEN: the event was about one of ours.
_WAITING: frozenset[NudgeVerdict] = frozenset({"nudged", "poll_due", "recently_nudged", "not_polling"})
#: Verdicts of jobs that wait on nothing any more: they leave the cell and layer index.
_GONE: frozenset[NudgeVerdict] = frozenset({"unknown", "finished", "cancelled"})


@dataclass(frozen=True)
class Named:
    """What an event names, as read by :func:`worker.events.payload.read_ids`."""

    generation_ids: tuple[str, ...] = ()
    cell_ids: tuple[str, ...] = ()
    layer_ids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.generation_ids or self.cell_ids or self.layer_ids)


@dataclass
class NudgeReport:
    """What one event did: job id -> ``sent`` (polled now), ``send_failed`` (the broker refused the
    poll; the sweeper re-drives the job), or the verdict why it was left alone."""

    results: dict[str, str] = field(default_factory=dict)

    @property
    def matched(self) -> bool:
        """Whether the event named a job that waits on GEN."""
        return any(
            result in _WAITING or result in ("sent", "send_failed") for result in self.results.values()
        )

    @property
    def sent(self) -> list[str]:
        return [job_id for job_id, result in self.results.items() if result == "sent"]


def named_jobs(res: Resources, named: Named) -> tuple[list[str], bool]:
    """The ids of the jobs ``named`` points at, and whether they were found by cell or layer."""
    by_generation = res.jobs.jobs_of_generations(list(named.generation_ids))
    if by_generation:
        return sorted(set(by_generation.values())), False
    return sorted(res.jobs.jobs_on_targets(named.cell_ids, named.layer_ids)), True


def nudge_jobs(queue: TaskQueue, res: Resources, named: Named) -> NudgeReport:
    """Poll now every job ``named`` points at that is waiting for a poll (see the module docstring)."""
    report = NudgeReport()
    job_ids, by_target = named_jobs(res, named)
    for job_id in job_ids:
        verdict = _nudge_one(queue, res, job_id)
        report.results[job_id] = verdict
        if by_target and verdict in _GONE:
            res.jobs.drop_from_targets(job_id, named.cell_ids, named.layer_ids)
    for result, count in Counter(report.results.values()).items():
        metrics.record_event_nudges(res.redis, result=result, count=count)
    return report


def _nudge_one(queue: TaskQueue, res: Resources, job_id: str) -> str:
    now = res.clock()
    verdict, taken = res.jobs.nudge(
        job_id,
        now=now,
        min_gain=MIN_GAIN,
        min_interval=res.settings.events_nudge_interval,
        overdue_at=now + res.settings.queued_recovery,
    )
    if taken is None or taken.job is None:
        # (nudged, then gone before it could be read: nothing left to poll)
        return verdict if verdict != "nudged" else "unknown"
    job = Job.model_validate(taken.job).model_copy(
        update={"drive": taken.drive, "step_retries": 0, "generation_id": taken.generation_id}
    )
    try:
        redrive(queue, job)
    except Exception:  # whatever the broker raised, the job must not be left waiting
        # The countdown poll is stale already: make the job overdue now, for the sweeper, and free
        # (the broker's refusal is not the job's doing).
        log.exception("job %s: could not send its poll after a GEN event; the sweeper re-drives it", job_id)
        free: dict[str, Any] = {FREE_REDRIVE: "1"}
        res.jobs.update(job_id, overdue_at=now, **free)
        return "send_failed"
    log.info("job %s: GEN sent an event about it; polling now (drive %d)", job_id, taken.drive)
    return "sent"
