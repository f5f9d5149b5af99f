"""What the fleet has seen of GEN's generation times, kept in Redis, and the poll plan built from it.

Every completed generation adds one interval (``lo``, ``hi``: seconds after GEN accepted it when
it was last seen running and first seen done) to a short list per model, shared by every worker
(:class:`DurationLog`); a bounded one (``lo > 0``) goes to a second list too, so that the last
bounded intervals outlive a window full of unbounded ones (see :mod:`worker.jobs.schedule`). Each
process keeps a :class:`PollPlanner` that reads both now and then (``LIPSYNC_POLL_PLAN_REFRESH``)
and plans the polls with :mod:`worker.jobs.schedule`; until a model has
``LIPSYNC_POLL_LEARN_MIN_SAMPLES`` intervals, or with ``LIPSYNC_POLL_LEARN=false``, the configured
schedule (``LIPSYNC_POLL_INITIAL_DELAY`` growing to ``LIPSYNC_POLL_MAX_DELAY``) runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker.jobs.backoff import poll_delay
from worker.jobs.schedule import Durations, Knobs, Observation, Plan, plan, stagger, takes_the_lead
from worker.names import BOUNDED_DURATIONS_KEY_PREFIX, DURATIONS_KEY_PREFIX
from worker.ops import deferred
from worker.settings import Settings

log = logging.getLogger("lipsync.schedule")


@dataclass(frozen=True)
class Seen:
    """What the fleet remembers of a model's generations, for :class:`Durations`."""

    #: The newest ``keep`` intervals, newest first.
    window: list[Observation]
    #: Bounded intervals older than the window, newest first (up to ``keep`` bounded ones in all).
    kept: list[Observation]

    @classmethod
    def of(cls, window: Sequence[Observation], bounded: Sequence[Observation]) -> Seen:
        """From the two lists as :class:`DurationLog` keeps them, newest first. The bounded list
        starts with the window's own bounded intervals (they were pushed together); what follows
        them is older than the window."""
        in_window = sum(1 for o in window if o.bounded)
        return cls(window=list(window), kept=list(bounded[in_window:]))

    def durations(self, half_life: float) -> Durations:
        return Durations(self.window, half_life=half_life, kept=self.kept)


class DurationLog:
    """The newest ``keep`` intervals per model, and the newest ``keep`` bounded ones, newest first
    (two Redis lists per model, written together)."""

    def __init__(self, client: redis.Redis, *, keep: int) -> None:
        self.redis = client
        self.keep = keep

    @staticmethod
    def key(model: str) -> str:
        return DURATIONS_KEY_PREFIX + model

    @staticmethod
    def bounded_key(model: str) -> str:
        return BOUNDED_DURATIONS_KEY_PREFIX + model

    def add(self, model: str, observation: Observation) -> None:
        """Learn one interval. In a worker task it rides the task's next write to this Redis
        (:mod:`worker.ops.deferred`): nothing waits for it, and one lost to a dying process only
        leaves the plan a sample short."""
        item = f"{observation.lo:.3f} {observation.hi:.3f}"
        keys = [self.key(model)] + ([self.bounded_key(model)] if observation.bounded else [])

        def fill(pipe: Any) -> None:
            for key in keys:
                pipe.lpush(key, item)
                pipe.ltrim(key, 0, self.keep - 1)

        deferred.write(self.redis, f"duration of {model}", fill)

    def recent(self, model: str) -> Seen:
        """Both lists, read in one MULTI/EXEC so that they agree."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(self.key(model), 0, self.keep - 1)
        pipe.lrange(self.bounded_key(model), 0, self.keep - 1)
        window_raw, bounded_raw = pipe.execute()
        return Seen.of(_parsed(window_raw), _parsed(bounded_raw))


def _parsed(raw: list[bytes]) -> list[Observation]:
    seen = []
    for item in raw:
        try:
            lo, hi = (float(part) for part in item.split())
        except ValueError:
            continue  # not ours: skip rather than stop learning
        seen.append(Observation.of(lo, hi))
    return seen


#: Jobs of one model that take the lead, per process, between two reads of the plan (every
#: ``poll_plan_refresh``, 10 s): a handful of bounded intervals keeps the estimate bounded. One job
#: in four of a 1,000-job burst was 250 leads, whose second polls fell due among the burst's last
#: polls; Celery takes no new message while such a burst of due countdowns is worked off, and
#: those jobs came last (bench/README.md). Jobs that arrive one by one lead as before.
LEADS_PER_READ = 2


@dataclass
class _Learned:
    plan: Plan | None
    read_at: float
    #: Leads this process may still hand out before the next read (:data:`LEADS_PER_READ`).
    leads_left: int = LEADS_PER_READ


class PollPlanner:
    """When to poll a generation next: the learned plan of its model, else the configured schedule."""

    def __init__(
        self, seen: DurationLog, settings: Settings, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.seen = seen
        self.settings = settings
        self._monotonic = monotonic
        self._learned: dict[str, _Learned] = {}
        s = settings
        self.knobs = Knobs(
            call_cost=s.poll_call_cost,
            max_gap=s.poll_max_delay,
            min_gap=s.poll_min_delay,
            tail_fraction=s.poll_tail_fraction,
            rare_share=s.poll_rare_share,
            half_life=s.poll_learn_half_life,
        )

    def plan_for(self, model: str) -> Plan | None:
        """The model's plan, re-read from Redis every ``poll_plan_refresh`` seconds; None while the
        fleet has seen too few of its generations (or learning is off)."""
        learned = self._learned_for(model)
        return None if learned is None else learned.plan

    def _learned_for(self, model: str) -> _Learned | None:
        s = self.settings
        if not s.poll_learn:
            return None
        now = self._monotonic()
        learned = self._learned.get(model)
        if learned is None or now - learned.read_at >= s.poll_plan_refresh:
            seen = self.seen.recent(model)
            made = None
            if len(seen.window) >= s.poll_learn_min_samples:
                made = plan(seen.durations(self.knobs.half_life), self.knobs)
            learned = _Learned(plan=made, read_at=now)
            self._learned[model] = learned
        return learned

    def first_poll_in(self, model: str, *, elapsed: float, job_id: str) -> float:
        """Seconds from now until the first poll of a generation accepted ``elapsed`` seconds ago:
        the learned plan's first time (its lead, for a job that takes it), or 0 (poll at once) on
        the configured schedule. Decides whether the job takes the lead: call it once per job,
        when its first poll is sent."""
        learned = self._learned_for(model)
        if learned is None or learned.plan is None:
            return 0.0
        lead = learned.plan.lead_before is not None and takes_the_lead(job_id) and learned.leads_left > 0
        if lead:
            learned.leads_left -= 1
        return max(0.0, learned.plan.next_poll(0.0, lead=lead, phase=stagger(job_id)) - elapsed)

    def earliest_poll_in(self, model: str, *, elapsed: float) -> float:
        """Seconds from now until the earliest first poll the plan gives any job (the earliest
        lead): a first poll that arrives before it came early (a re-drive) and waits."""
        learned = self.plan_for(model)
        if learned is None:
            return 0.0
        return max(0.0, learned.next_poll(0.0, lead=True, phase=0.0) - elapsed)

    def next_poll_in(self, model: str, *, elapsed: float, polls: int, job_id: str) -> float:
        """Seconds from now until the next poll, after poll number ``polls`` found it running. The
        lead does not matter here: a lead is always followed by the plan's next time."""
        learned = self.plan_for(model)
        if learned is not None:
            return learned.next_poll(elapsed, phase=stagger(job_id)) - elapsed
        s = self.settings
        return poll_delay(
            polls - 1,
            initial=s.poll_initial_delay,
            factor=s.poll_backoff_factor,
            cap=s.poll_max_delay,
            jitter=s.poll_jitter,
            phase=stagger(job_id),
        )

    def learn(self, model: str, observation: Observation) -> None:
        if self.settings.poll_learn:
            self.seen.add(model, observation)
