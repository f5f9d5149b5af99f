"""What to do when a target's sources change: pure decisions, no Redis, no GEN.

* :func:`merge`: a change names one side or both; the other keeps its last known value.
* :func:`fingerprint`: what "the same sources" means (the same video and audio, by id or URL).
* :func:`decide`: once the debounce window passed, whether to start a generation, supersede the one
  in flight, only stop it, or do nothing.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass

from worker.cards.models import Sources, Target


def merge(known: Sources | None, change: Sources) -> Sources:
    """The target's sources after ``change``: each side it names replaces that side (an id replaces
    a URL and the other way round); a side it does not name keeps its last known value."""
    base = known or Sources()
    video_named = change.video_resource_id is not None or change.video_url is not None
    audio_named = change.audio_resource_id is not None or change.audio_url is not None
    return Sources(
        video_resource_id=change.video_resource_id if video_named else base.video_resource_id,
        video_url=change.video_url if video_named else base.video_url,
        audio_resource_id=change.audio_resource_id if audio_named else base.audio_resource_id,
        audio_url=change.audio_url if audio_named else base.audio_url,
    )


def fingerprint(sources: Sources) -> str:
    """Equal for equal sources, whatever order or spelling they arrived in (ids are strings)."""
    canonical = json.dumps(sources.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def job_id_for(target: Target, seq: int) -> str:
    """The id of the automatic job for the ``seq``-th change of ``target``: ``card.<target>~<seq>``
    (``card.101.3000.4000~7``). Derived, so every worker that settles the same change names the same
    job, and the job record, GEN's Idempotency-Key and the output file agree on it. Too long for a
    job id (GEN ids can be 64 characters each): the target part is a hash."""
    job_id = f"card.{target.key}~{seq}"
    if len(job_id) > 128:
        job_id = f"card.h{hashlib.sha256(target.key.encode()).hexdigest()[:40]}~{seq}"
    return job_id


class Action(enum.StrEnum):
    """What a settle does."""

    #: Nothing: the sources are those of the current output, or of the generation in flight.
    NOTHING = "nothing"
    #: Start a generation for the latest sources (nothing in flight).
    START = "start"
    #: Stop the generation in flight (superseded) and start one for the latest sources.
    SUPERSEDE = "supersede"
    #: Stop the generation in flight: the latest sources are those of the current output again.
    STOP = "stop"
    #: The sources are not complete yet (one side was never named): nothing to generate.
    INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class Situation:
    """What a settle knows about its target."""

    sources: Sources
    #: Fingerprint of the sources behind the target's current output (None: no output yet).
    output_fp: str | None
    #: Fingerprint of the sources of the generation in flight (None: none in flight).
    inflight_fp: str | None


def decide(now: Situation) -> Action:
    """At most one generation per target in flight, always for the latest sources, and none for
    sources whose output exists already."""
    if not now.sources.complete:
        # (A side once named is never forgotten: a target in flight always has both.)
        return Action.INCOMPLETE
    latest = fingerprint(now.sources)
    if now.inflight_fp is not None:
        if now.inflight_fp == latest:
            return Action.NOTHING
        return Action.STOP if latest == now.output_fp else Action.SUPERSEDE
    return Action.NOTHING if latest == now.output_fp else Action.START


def debounced(*, changed_at: float, debounce: float, now: float) -> float:
    """Seconds left until the debounce window after the last change passes (0: it has)."""
    return max(0.0, changed_at + debounce - now)
