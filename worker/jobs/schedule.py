"""When to poll GEN next, planned from the generation times the fleet has seen. Pure arithmetic.

GEN says nothing about how long a generation will take and puts no timestamps in its answers, so
all we know of a finished generation is an *interval*: still running at our last poll (``lo``
seconds after GEN accepted it), done at the next (``hi``). :class:`Durations` turns the recent
intervals into a distribution, newer ones weighing more (a GEN that slows down is followed within
~20 jobs). :func:`plan` then picks the poll times that minimise

    call_cost * (expected status calls) + (expected lateness / the generation's duration)

by dynamic programming over candidate times (every bend of the distribution, and a grid), never
leaving more than ``max_gap`` between polls. Lateness counts relative to the duration because
that is what a user feels: a second matters more to a 10 s generation than to a 2 min one. Polls
close around the usual end narrow the next intervals, which sharpens the next plan.

Past the last planned time (a generation longer than any seen) the plan polls every
``tail_fraction`` of the elapsed time: the lateness stays a fixed fraction of the duration,
whatever it turns out to be, for about ``log(L2 / L1) / log(1 + tail_fraction)`` more calls.

The last few percent of the distribution (fewer than ``rare_share`` of generations still running)
are not chased with polls of their own: a poll there is priced as if ``rare_share`` of them were
still running, and polls there are no sparser than the tail's. Expected cost alone would spend
many cheap polls on a thin, stretched-out upper end (one generation that ran 35 s among twenty of
20 s), and those polls are exactly the ones a generation longer than any seen pays, before the
tail it would have paid anyway.

A generation whose first poll already found it done is known only as ``(0, hi]``: done by ``hi``,
nothing about where. A sharp plan polls once, right at the end, and makes only such observations;
a wave of jobs sharing one plan (a burst, a batch) can fill the whole window with them, and the
estimate would then spread from 0 to the end (the next wave polled its way up from the start: 12
status calls per job). So bounded observations (``lo > 0``) are also kept beyond the window
(:class:`Durations`' ``kept``) and only they are spread evenly; and when most of the window's
weight is unbounded, one job in :data:`LEAD_EVERY` (:func:`takes_the_lead`) polls once more, at
the *lead*: somewhere in the tail step (``1 / (1 + tail_fraction)``) before the plan's first poll
that expects generations done, where its :func:`stagger` puts it, so that its interval is
bounded. A sample is enough to keep the estimate bounded, and a burst's jobs do not all poll again
in the seconds before they all end (worker.jobs.durations also caps the leads a process hands out
per read of the plan). Spread over the step, a wave's leads bound the end at many points, the
tightest closely; all at one point, they left intervals a whole step wide, over which the next
wave's plan spread its polls. The lead is placed from that first poll, which follows the ends,
not from earlier leads, so leads do not creep. A faster GEN shows at the lead: it finds the
generations done, earlier than every kept span.

Every job's schedule is also shifted by its :func:`stagger` on the configured schedule
(worker.jobs.backoff) and in the tail (:meth:`Plan.next_poll`): jobs that start together do not
poll at the same instants, so between them they see where generations end.

The model, its knobs and how it was tested: docs/polling.md.
"""

from __future__ import annotations

import bisect
import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

#: Share of the distribution that spreads each interval evenly over its span, next to the share
#: that puts it where the intervals agree (see :class:`Durations`).
SPREAD_SHARE = 0.15
#: Durations below this count as this long when lateness is weighed relative to the duration.
SHORTEST = 0.5
#: Above this share of the window's weight in unbounded observations, the plan adds a lead poll.
LEAD_WHEN_UNBOUNDED = 0.5
#: One job in this many polls at the lead (see the module docstring).
LEAD_EVERY = 4


def takes_the_lead(job_key: str) -> bool:
    """Whether this job polls at the lead when its plan has one: a stable choice by its key (every
    poll of the job, on any worker, follows the same plan), one job in :data:`LEAD_EVERY`."""
    return zlib.crc32(job_key.encode()) % LEAD_EVERY == 0


def stagger(job_key: str) -> float:
    """Where in a step (0 to 1) this job's schedule is shifted: the configured schedule
    (:func:`worker.jobs.backoff.poll_delay`), the tail and the lead (:meth:`Plan.next_poll`). A
    stable choice by its key, spread evenly over the fleet's jobs and independent of the lead's."""
    return zlib.crc32(b"stagger:" + job_key.encode()) / 2**32


@dataclass(frozen=True)
class Observation:
    """One finished generation: running ``lo`` seconds after GEN accepted it, done at ``hi``."""

    lo: float
    hi: float

    @classmethod
    def of(cls, lo: float, hi: float) -> Observation:
        hi = max(0.0, hi)
        return cls(lo=min(max(0.0, lo), hi), hi=hi)

    @property
    def bounded(self) -> bool:
        """Seen running after GEN accepted it: the interval bounds the end from below too."""
        return self.lo > 0


@dataclass(frozen=True)
class Knobs:
    """The plan's trade-offs (Settings' ``poll_*``)."""

    #: What one status call is worth, as lateness relative to the generation's duration.
    call_cost: float = 0.03
    #: Never leave more than this between two polls (LIPSYNC_POLL_MAX_DELAY).
    max_gap: float = 30.0
    #: Never poll sooner than this after the previous poll.
    min_gap: float = 0.5
    #: Past the plan, poll every this fraction of the elapsed time.
    tail_fraction: float = 0.15
    #: Below this share of generations still running, polls are priced as if this share were, and
    #: are spaced as the tail's (see the module docstring). 0: expected cost alone.
    rare_share: float = 0.05
    #: An observation's weight halves with every this many newer ones.
    half_life: float = 10.0


class Durations:
    """The distribution of generation times, from observations listed newest first.

    A mixture of two estimates. Most of the mass goes where the intervals agree: Turnbull's
    self-consistent estimate, which puts it on the *innermost* intervals (spans that some interval
    starts and some interval ends, with no end in between) and shares each observation's weight
    among those inside it in proportion to their mass. On its own that estimate is too sure of
    itself (a plan that only ever polls where it believes the mass is learns nothing new), so a
    share (:data:`SPREAD_SHARE`) spreads every bounded interval evenly over its whole span. An
    unbounded one, ``(0, hi]``, would put that share near 0, where lateness relative to the
    duration is dearest, and the plan would poll its way up from the start: its share goes to the
    agreed estimate. Within a span mass is spread evenly: the survival function stays piecewise
    linear. The shares were chosen by replaying narrow, wide, bimodal, drifting and shifting
    durations (tests/unit/jobs/test_schedule.py).

    ``kept``: bounded observations older than ``newest_first`` (newest first), weighed on as older
    ones. However little they weigh, they hold the agreed estimate's spans where the last bounded
    observations put them while the newer ones are all unbounded (see the module docstring).
    """

    def __init__(
        self,
        newest_first: Sequence[Observation],
        *,
        half_life: float,
        kept: Sequence[Observation] = (),
        rounds: int = 60,
    ) -> None:
        observations = [*newest_first, *kept]
        self.samples = len(newest_first)
        weights = [0.5 ** (age / half_life) for age in range(len(observations))]
        total = sum(weights) or 1.0
        shares = [w / total for w in weights]
        in_window = shares[: self.samples]
        #: Share of the window's weight in unbounded observations (:func:`plan` adds a lead above
        #: :data:`LEAD_WHEN_UNBOUNDED`).
        self.unbounded_share = sum(
            w for o, w in zip(newest_first, in_window, strict=True) if not o.bounded
        ) / (sum(in_window) or 1.0)
        spans = _innermost(observations)
        agreed = _self_consistent(observations, shares, spans, rounds)
        spread = [(o, w) for o, w in zip(observations, shares, strict=True) if o.bounded]
        spread_share = SPREAD_SHARE * sum(w for _, w in spread)
        self._parts = [(lo, hi, m * (1 - spread_share)) for (lo, hi), m in zip(spans, agreed, strict=True)]
        self._parts += [(o.lo, _span_end(o), SPREAD_SHARE * w) for o, w in spread]

    def survival(self, t: float) -> float:
        """P(the generation is still running ``t`` seconds after GEN accepted it)."""
        alive = 0.0
        for lo, hi, weight in self._parts:
            if t < lo:
                alive += weight
            elif t < hi:
                alive += weight * (hi - t) / (hi - lo)
        return alive

    def longest(self) -> float:
        return max((hi for _, hi, weight in self._parts if weight > 0), default=0.0)

    def bends(self) -> list[float]:
        """Where the survival function bends: the ends of every span."""
        return sorted({0.0, *(lo for lo, _, _ in self._parts), *(hi for _, hi, _ in self._parts)})


def _span_end(o: Observation) -> float:
    return max(o.hi, o.lo + 1e-3)  # an empty interval (a poll at the very end) still spans a little


def _innermost(observations: Sequence[Observation]) -> list[tuple[float, float]]:
    """Turnbull's innermost intervals: a start directly followed by an end in the order of all
    ends (at a tie the end first: ``(a, t]`` and ``(t, b]`` do not overlap)."""
    ends = sorted([(o.lo, 1) for o in observations] + [(_span_end(o), 0) for o in observations])
    return [(t, u) for (t, kind), (u, following) in itertools.pairwise(ends) if kind == 1 and following == 0]


def _self_consistent(
    observations: Sequence[Observation],
    shares: Sequence[float],
    spans: Sequence[tuple[float, float]],
    rounds: int,
) -> list[float]:
    """The mass of each innermost span (Turnbull's EM, ``rounds`` iterations from even mass)."""
    if not spans:
        return []
    inside = [
        [j for j, (lo, hi) in enumerate(spans) if o.lo <= lo and hi <= _span_end(o)] for o in observations
    ]
    mass = [1.0 / len(spans)] * len(spans)
    for _ in range(rounds):
        updated = [0.0] * len(spans)
        for share, members in zip(shares, inside, strict=True):
            held = sum(mass[j] for j in members)
            if held > 0:
                for j in members:
                    updated[j] += share * mass[j] / held
        mass = updated
    return mass


@dataclass(frozen=True)
class Plan:
    """Poll times (seconds after GEN accepted the generation), then the tail for longer ones."""

    times: tuple[float, ...]
    knobs: Knobs
    #: The first planned time that expects generations done, when the jobs that take the lead poll
    #: once more before it (see the module docstring); None: no lead.
    lead_before: float | None = None

    def next_poll(self, elapsed: float, *, lead: bool = False, phase: float = 0.0) -> float:
        """When (seconds after acceptance) to poll next, ``elapsed`` seconds after acceptance: the
        next planned time (with the lead, for a job that takes it), at least ``min_gap`` and at
        most ``max_gap`` away. A planned time closer than ``min_gap`` (the poll before it ran
        late) is put off, not skipped: skipping the plan's last time sent a generation ending
        there to the tail, 15 % of its duration later.

        Past the plan, the tail, shifted by part of a step by the job's ``phase``
        (:func:`stagger`, :meth:`_tail_after`). Generations longer than any seen that end together
        (a slower GEN, longer inputs in a burst) are then each seen within a step, half of one on
        average, instead of all at the same tail times: the median of such a wave is no longer
        late by 0 or by 15 % depending on where the tail fell.
        """
        k = self.knobs
        # The part of a step the job's stagger leaves, 0 to 1: the lead and the tail's first step.
        rest = 1.0 - min(max(phase, 0.0), 1.0)
        times = self.times
        if lead and self.lead_before is not None:
            times = self._with_lead(self.lead_before, rest)
        i = bisect.bisect_right(times, elapsed + 1e-9)
        due = times[i] if i < len(times) else self._tail_after(times, elapsed, rest)
        return min(max(due, elapsed + k.min_gap), elapsed + k.max_gap)

    @property
    def _step(self) -> float:
        """A tail step, as a factor of the time elapsed."""
        return 1.0 + self.knobs.tail_fraction

    def _with_lead(self, first: float, rest: float) -> tuple[float, ...]:
        """The plan with the lead: somewhere in the tail step before ``first``, by the job's
        phase, so that the leads of a wave bound the end at many points and the tightest of them
        closely (all at one point, they left intervals a whole tail step wide, and the estimate
        spread the mass over them: the next wave polled there too). At least ``min_gap`` before
        ``first``; none where the plan polls in that step already."""
        at = min(first / math.pow(self._step, rest), first - self.knobs.min_gap)
        if at <= 0 or any(at <= t < first for t in self.times):
            return self.times
        return tuple(sorted((*self.times, at)))

    def _tail_after(self, times: Sequence[float], elapsed: float, rest: float) -> float:
        """Past the plan: the first step from its last time is half a step to a step and a half,
        by the job's phase (a step on average, as unstaggered; never so short a poll that it
        learns nothing), then every step is ``tail_fraction`` of the time elapsed (from when the
        poll ran: a late poll shifts the rest, it does not bring on an early one)."""
        if times:
            staggered = times[-1] * math.pow(self._step, rest if rest >= 0.5 else rest + 1.0)
            if elapsed < staggered - 1e-9:
                return staggered
        return elapsed * self._step


def plan(durations: Durations, knobs: Knobs, *, resolution: int = 240) -> Plan:
    """The poll times that minimise call cost plus relative lateness (see the module docstring)."""
    points = _candidates(durations, knobs, resolution)
    survival = [durations.survival(t) for t in points]
    # A generation ending at t between polls a < b is late by (b - t) / t of its duration. With the
    # density f constant between two candidates, the integral of (b - t) / t * f(t) from a to b is
    # b * (LOG[b] - LOG[a]) - (S(a) - S(b)), LOG being a prefix sum of f * log(far / near).
    logs = [0.0]
    for k in range(len(points) - 1):
        density = (survival[k] - survival[k + 1]) / max(points[k + 1] - points[k], 1e-9)
        near, far = max(points[k], SHORTEST), max(points[k + 1], SHORTEST)
        logs.append(logs[-1] + density * math.log(far / near))
    times = _cheapest(points, survival, logs, knobs)
    lead_before = None
    if durations.unbounded_share > LEAD_WHEN_UNBOUNDED:
        # The first poll that expects some generations done: the lead comes in the tail step
        # before it (see the module docstring and Plan.next_poll).
        first = next((i for i in times if survival[i] < 1 - knobs.rare_share), None)
        if first is not None:
            lead_before = points[first]
    return Plan(times=tuple(points[i] for i in times), knobs=knobs, lead_before=lead_before)


def _cheapest(
    points: Sequence[float], survival: Sequence[float], logs: Sequence[float], knobs: Knobs
) -> list[int]:
    """Indexes of the cheapest polls (dynamic programming, see :func:`plan`)."""
    n = len(points)
    best = [0.0] * n  # least expected cost from a poll at points[i] on, still running there
    after = [-1] * n
    for i in range(n - 2, -1, -1):
        best[i] = math.inf
        rare = survival[i] < knobs.rare_share
        # In the rare upper end, no sparser than the tail (but always as far as the next candidate).
        widest = max(knobs.min_gap, knobs.tail_fraction * points[i]) if rare else knobs.max_gap
        call = knobs.call_cost * max(survival[i], knobs.rare_share)
        for j in range(i + 1, n):
            gap = points[j] - points[i]
            if gap > knobs.max_gap + 1e-9 or (gap > widest + 1e-9 and j > i + 1):
                break
            if gap < knobs.min_gap - 1e-9 and j != n - 1:
                continue
            late = points[j] * (logs[j] - logs[i]) - (survival[i] - survival[j])
            total = call + late + best[j]
            # At equal cost, the later poll: one that max_gap forces in before a long stretch
            # where nothing ends bounds the next observations more tightly the later it comes.
            if total <= best[i]:
                best[i], after[i] = total, j
    chosen = []
    i = after[0]
    while i != -1:
        chosen.append(i)
        i = after[i]
    return chosen


def _candidates(durations: Durations, knobs: Knobs, resolution: int) -> list[float]:
    """Poll times worth considering: every bend of the distribution, and an even grid (so a wide
    span can be split and ``max_gap`` kept), up to the longest duration seen."""
    end = durations.longest()
    step = max(end / resolution, knobs.min_gap / 2, 1e-3)
    grid = [i * step for i in range(int(end / step) + 1)]
    return sorted({round(t, 3) for t in (*grid, *durations.bends(), end) if t <= end})
