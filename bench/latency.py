"""The poll schedule: the latency it adds on top of GEN's generation time, and the GEN calls it makes.

For each scenario of GEN durations (fixed 20 s and 60 s, spread 15-25 s, bimodal 10 s / 30 s, and
shifting: learned at 20 s, then 40 s arrives), three drivers take the same waves of jobs on the same
kind of GEN, at the same time:

* **ours**: our worker at default settings (one node, ``-c 2``), jobs enqueued with
  :func:`worker.enqueue.enqueue`;
* **2 s polling**: GEN's TypeScript SDK loop (:mod:`bench.polling_client`), on the same simulator;
* **before**: our worker with ``LIPSYNC_POLL_LEARN=false`` (the fixed geometric schedule, 5 s x1.5
  up to 30 s, with jitter), on a Redis and simulator of its own.

A scenario runs in phases, each starting when every job of the phase before has finished: a
warm-up wave of ``--warmup`` jobs (what the fleet learns from; not measured), then ``--rounds``
measured waves of ``--wave`` jobs (one round each; the waves start 4 s apart, jobs within a wave
0.5 s apart). In the shifting scenario the measured waves are the first ones at 2L (a duration the
fleet has not seen: "unseen"), followed by ``--rounds`` more waves once those have finished
("adapted": after ``rounds x wave`` jobs at 2L were seen).

Per job, from what GEN saw (:mod:`bench.gen_seen`): added latency = (GEN sees the output requested)
- (the job was enqueued / the SDK client posted) - L, as a fraction of that job's L; GEN calls =
generate + status + output requests for its generation, against the minimum of 3. The vidsheet
dialect's two content-resource lookups per submit are counted apart (the SDK client knows its
URLs and makes none). A round's figure is the median job of its wave (calls: the mean).

The scenarios run at the same time, each on stacks of its own (the machine is mostly idle while
jobs wait on GEN).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Job, Stack, simulator
from bench.figures import Figure, Target, percent, plain
from bench.gen_seen import MIN_CALLS, GenerationSeen, added_latency, snapshot
from bench.polling_client import FixedIntervalPoller, ReferenceJob
from gensim import GenSimulator
from tests.conftest import AGENT_ID, API_KEY

WAVE_GAP = 4.0
JOB_SPACING = 0.5
BEFORE = {"LIPSYNC_POLL_LEARN": "false"}


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    #: Draws one generation's duration (seconds); ``shifted`` after the shifting scenario's shift.
    draw: Callable[[random.Random, bool], float]
    longest: float
    shifts: bool = False
    #: Every duration is a whole multiple of the SDK's 2 s: its polls land just after GEN finishes.
    sdk_in_phase: bool = True


SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario("fixed20", "fixed L = 20 s", lambda rng, shifted: 20.0, 20.0),
        Scenario("fixed60", "fixed L = 60 s", lambda rng, shifted: 60.0, 60.0),
        Scenario(
            "spread",
            "spread L = 15-25 s",
            lambda rng, shifted: rng.uniform(15.0, 25.0),
            25.0,
            sdk_in_phase=False,
        ),
        Scenario("bimodal", "bimodal L = 10 s | 30 s", lambda rng, shifted: rng.choice((10.0, 30.0)), 30.0),
        Scenario(
            "shifting",
            "shifting L = 20 s, then 40 s",
            lambda rng, shifted: 40.0 if shifted else 20.0,
            40.0,
            True,
        ),
    )
}


class DurationSource:
    """The simulators' ``duration_sampler``: one draw per new generation, shared by every simulator
    of a scenario, so all drivers face the same GEN (and the shift happens for all at once)."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.shifted = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, model: str) -> float:
        with self._lock:
            return self.scenario.draw(self._rng, self.shifted)


@dataclass
class Phase:
    """Waves of jobs that start together once the previous phase has finished."""

    name: str
    waves: int
    size: int
    measured: bool
    shift: bool = False
    started: bool = False
    #: wave index -> the jobs of each driver in that wave.
    ours: dict[int, list[Job]] = field(default_factory=dict)
    before: dict[int, list[Job]] = field(default_factory=dict)
    reference: dict[int, list[ReferenceJob]] = field(default_factory=dict)
    #: (due at, wave) arrivals not yet sent, in order.
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    done: bool = False
    _waiting: list[Job] | None = None
    _next_check: float = 0.0

    def plan(self, now: float) -> None:
        self.started = True
        self.arrivals = sorted(
            (now + w * WAVE_GAP + i * JOB_SPACING, w) for w in range(self.waves) for i in range(self.size)
        )

    def check(self, now: float) -> bool:
        """Whether every job of the phase has finished (read at most once a second)."""
        if self.done or not self.started or self.arrivals or now < self._next_check:
            return self.done
        self._next_check = now + 1.0
        if self._waiting is None:
            self._waiting = [*self._all(self.ours), *self._all(self.before)]
        self._waiting = [j for j in self._waiting if not j.result.ready()]
        self.done = not self._waiting and all(j.done for wave in self.reference.values() for j in wave)
        return self.done

    @staticmethod
    def _all(waves: dict[int, list[Job]]) -> list[Job]:
        return [job for wave in waves.values() for job in wave]


@dataclass
class ScenarioRun:
    """One scenario's drivers and phases, stepped by :func:`run` (see the module docstring)."""

    scenario: Scenario
    phases: list[Phase]
    ours: Stack
    before: Stack | None
    poller: FixedIntervalPoller
    durations: DurationSource
    deadline: float
    timed_out: bool = False

    def current(self, now: float) -> Phase | None:
        for phase in self.phases:
            if not phase.check(now):
                return phase
        return None

    def tick(self, now: float) -> bool:
        """Send what is due; start the next phase when this one finished. False once all are done."""
        phase = self.current(now)
        if phase is None:
            return False
        if now > self.deadline:
            self.timed_out = True
            return False
        if not phase.started:
            if phase.shift:
                self.durations.shifted = True
            phase.plan(now)
        while phase.arrivals and phase.arrivals[0][0] <= now:
            _, wave = phase.arrivals.pop(0)
            index = len(phase.ours.setdefault(wave, []))
            phase.ours[wave].append(self.ours.enqueue())
            if self.before is not None:
                phase.before.setdefault(wave, []).append(self.before.enqueue())
            if phase.measured:
                target = (101, 3000 + index % 100)
                resources = (5001 + index % 90, 6001 + index % 90)
                phase.reference.setdefault(wave, []).append(self.poller.start(target, resources))
        return True


@dataclass
class Round:
    """One measured wave of one driver: per job, added latency / L and GEN calls, and the parts of
    the added latency (see :meth:`parts_line`)."""

    added: list[float]
    calls: list[int]
    missing: int
    #: Per job: (enqueue -> GEN has it, GEN done -> a poll sees it, that poll -> output requested).
    parts: list[tuple[float, float, float]] = field(default_factory=list)
    #: Per job: (generate, status, output) requests.
    kinds: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, seen: dict[str, GenerationSeen], jobs: Sequence[tuple[str, float]]) -> Round:
        round_ = cls([], [], 0)
        for key, started_at in jobs:
            generation = seen.get(key)
            late = added_latency(generation, started_at) if generation is not None else None
            if generation is None or late is None or generation.output_fetched_at is None:
                round_.missing += 1
                continue
            round_.added.append(late / generation.duration if generation.duration else 0.0)
            round_.calls.append(generation.calls)
            seen_done = generation.first_seen_done() or generation.output_fetched_at
            round_.parts.append(
                (
                    generation.created_at - started_at,
                    seen_done - generation.ready_at,
                    generation.output_fetched_at - seen_done,
                )
            )
            round_.kinds.append((generation.generate_calls, generation.status_calls, generation.output_calls))
        return round_

    @property
    def added_median(self) -> float:
        return statistics.median(self.added) if self.added else float("nan")

    @property
    def calls_ratio(self) -> float:
        return statistics.fmean(self.calls) / MIN_CALLS if self.calls else float("nan")


def parts_line(label: str, rounds: Sequence[Round]) -> str:
    """Where ours spends its added latency and which calls it makes, over all rounds' jobs."""
    parts = [p for r in rounds for p in r.parts]
    kinds = [k for r in rounds for k in r.kinds]
    if not parts:
        return f"ours, {label}: no job finished"
    submit, poll, fetch = (statistics.median(column) for column in zip(*parts, strict=True))
    generate, status, output = (statistics.fmean(column) for column in zip(*kinds, strict=True))
    return (
        f"ours, {label}: median job: enqueue -> GEN has it {submit:.2f} s, GEN done -> a poll sees it "
        f"{poll:.2f} s, -> output requested {fetch:.2f} s; calls: generate {generate:.2f}, status "
        f"{status:.2f}, output {output:.2f}"
    )


def build(
    scenario: Scenario,
    tmp: Path,
    closing: ExitStack,
    *,
    warmup: int,
    rounds: int,
    wave: int,
    before: bool,
    seed: int,
) -> ScenarioRun:
    """The scenario's simulators, stacks and reference client; ``closing`` stops them."""
    durations = DurationSource(scenario, seed)

    def sim() -> GenSimulator:
        started = simulator({"gen": scenario.longest})
        closing.callback(started.stop)
        started.duration_sampler = durations
        return started

    ours = closing.enter_context(Stack(f"{scenario.key}-ours", tmp / scenario.key / "ours", sim()))
    before_stack = None
    if before:
        stack = Stack(f"{scenario.key}-before", tmp / scenario.key / "before", sim(), BEFORE)
        before_stack = closing.enter_context(stack)
    poller = closing.enter_context(FixedIntervalPoller(ours.sim.base_url, API_KEY, AGENT_ID))
    phases = [Phase("warm-up", 1, warmup, measured=False)]
    if scenario.shifts:
        phases.append(Phase("unseen", rounds, wave, measured=True, shift=True))
        phases.append(Phase("adapted", rounds, wave, measured=True))
    else:
        phases.append(Phase("seen", rounds, wave, measured=True))
    # Phases run one after the other; each lasts about L plus the cold start's lateness.
    budget = 300 + len(phases) * (3 * scenario.longest + 60)
    return ScenarioRun(scenario, phases, ours, before_stack, poller, durations, time.monotonic() + budget)


TARGETS = {
    "seen": (Target(0.05, label="<= 5 % of L"), Target(2.0, label="<= 2x min")),
    "unseen": (Target(0.10, label="<= 10 % of L"), Target(3.0, label="<= 3x min")),
    "adapted": (Target(0.05, label="<= 5 % of L"), Target(2.0, label="<= 2x min")),
}


def figures(run: ScenarioRun) -> tuple[list[Figure], list[str]]:
    """The scenario's figures, per measured phase, and notes (lookups, missing jobs)."""
    seen_ours = snapshot(run.ours.sim)
    seen_before = snapshot(run.before.sim) if run.before is not None else {}
    out: list[Figure] = []
    notes: list[str] = []
    for phase in (p for p in run.phases if p.measured):
        waves = sorted(phase.ours)
        ours = [Round.of(seen_ours, [(j.key, j.started_at) for j in phase.ours[w]]) for w in waves]
        ref = [
            Round.of(seen_ours, [(j.key, j.started_at) for j in phase.reference.get(w, [])]) for w in waves
        ]
        before = [
            Round.of(seen_before, [(j.key, j.started_at) for j in phase.before.get(w, [])]) for w in waves
        ]
        latency_target, calls_target = TARGETS[phase.name]
        label = f"{run.scenario.title}, {phase.name}"
        latency_refs = {"2 s polling": [r.added_median for r in ref]}
        calls_refs = {"2 s polling": [r.calls_ratio for r in ref]}
        if run.before is not None:
            latency_refs["before"] = [r.added_median for r in before]
            calls_refs["before"] = [r.calls_ratio for r in before]
        out.append(
            Figure(
                f"added latency / L: {label}",
                [r.added_median for r in ours],
                percent,
                latency_refs,
                latency_target,
            )
        )
        out.append(
            Figure(
                f"GEN calls / min 3: {label}", [r.calls_ratio for r in ours], _times, calls_refs, calls_target
            )
        )
        notes.append(parts_line(label, ours))
        missing = sum(r.missing for r in (*ours, *ref, *before))
        if missing:
            notes.append(f"{label}: {missing} job(s) never had their output fetched (failed or timed out)")
    lookups = run.ours.sim.stats()["counts"]["content_resource"]
    total = sum(len(jobs) for phase in run.phases for jobs in phase.ours.values())
    notes.append(
        f"{run.scenario.title}: {lookups / max(total, 1):.1f} content-resource lookups per job (vidsheet "
        "body; not in the call counts; the SDK client makes none)"
    )
    if run.scenario.sdk_in_phase:
        notes.append(
            f"{run.scenario.title}: every L is a whole multiple of 2 s, so the SDK's polls (at 0 s, then "
            "2 s after each answer) land just after GEN ends: its lateness near 0 is the simulator's exact L"
        )
    if run.timed_out:
        notes.append(f"{run.scenario.title}: stopped at its time limit before every phase finished")
    return out, notes


def _times(value: float) -> str:
    return f"{plain(value)}x"


def run(
    tmp: Path,
    *,
    scenarios: Sequence[str],
    warmup: int,
    rounds: int,
    wave: int,
    before: bool,
    seed: int,
) -> tuple[list[Figure], list[str]]:
    """Run the scenarios side by side; return their figures and notes."""
    with ExitStack() as closing:
        runs = [
            build(
                SCENARIOS[key],
                tmp,
                closing,
                warmup=warmup,
                rounds=rounds,
                wave=wave,
                before=before,
                seed=seed + i,
            )
            for i, key in enumerate(scenarios)
        ]
        stacks = [stack for r in runs for stack in (r.ours, r.before) if stack is not None]
        workers = [(stack, stack.start_worker(concurrency=2)) for stack in stacks]
        for stack, worker in workers:
            stack.wait_ready(worker)
        active = list(runs)
        while active:
            now = time.monotonic()
            active = [r for r in active if r.tick(now)]
            time.sleep(0.05)
        all_figures: list[Figure] = []
        all_notes: list[str] = []
        for r in runs:
            f, n = figures(r)
            all_figures += f
            all_notes += n
        return all_figures, all_notes
