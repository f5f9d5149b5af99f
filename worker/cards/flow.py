"""What the card tasks do, without Celery: configure a card, record a source change, settle it.

A change is recorded at once (:func:`record_change`) and, for a card with ``auto_generate``, settled
when its debounce window passed with no further change (:func:`settle`, run by the task the change
scheduled, or by the settle check after a crash). Settling the latest change:

1. retires the job in flight if it ended (a completed one's sources become the output's);
2. decides (:func:`worker.cards.changes.decide`): nothing, start, supersede or stop;
3. claims the target's single in-flight slot for the new job atomically (the change sequence and the
   job in flight must be unchanged), recording the job it replaces as ``superseding``;
4. stops the replaced job on GEN and ends it ``superseded`` (:func:`worker.jobs.cancel.cancel_job`);
5. only then creates the new job (:func:`worker.jobs.steps.create`) and sends its chain.

Each step can be repeated: the job id is derived from the target and the change sequence, the
cancel and the create are idempotent. A settle that dies half-way leaves the target due in
``lipsync:cards:due``; the next settle (the settle check) redoes what is left, in the same order,
so a new generation never starts before the one it replaces was stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker.cards.changes import Action, Situation, decide, fingerprint, job_id_for, merge
from worker.cards.gen_sources import sources_in
from worker.cards.models import Card, SourceChange, Sources, Target
from worker.cards.store import CardStore, TargetState
from worker.errors import RequestInvalid
from worker.jobs import steps
from worker.jobs.cancel import cancel_job
from worker.jobs.failures import reject
from worker.jobs.models import Job
from worker.jobs.records import JobRecord
from worker.jobs.resources import Resources
from worker.jobs.sources import refuse_unusable_urls
from worker.names import TASK_REREAD
from worker.ops import metrics
from worker.ops.failpoints import failpoint
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.cards")


def store_of(res: Resources) -> CardStore:
    return CardStore(res.redis)


# --------------------------------------------------------------------------------------------
# cards
# --------------------------------------------------------------------------------------------


def configure(res: Resources, data: Any) -> Card:
    """Validate and store a card. Raises :class:`RequestInvalid` naming the fields (an unknown
    model, a bad target, a callback that could only go out unsigned)."""
    from worker.callbacks.webhooks import refuse_unsigned

    card = Card.parse(data)
    refuse_unsigned(card.callback, res.settings)
    store_of(res).put_card(card)
    log.info("card %s: model %s, auto_generate %s", card.target.key, card.lip_sync_model, card.auto_generate)
    return card


def show(res: Resources, target: Target) -> dict[str, Any] | None:
    """The card (without its callback, whose webhook URL can carry a token) and its target's state."""
    store = store_of(res)
    card = store.card(target)
    state = retire_ended(res, target)
    if card is None and state.seq == 0:
        return None
    shown = card.model_dump(mode="json", exclude={"callback"}) if card is not None else None
    if shown is not None:
        shown["has_callback"] = card is not None and card.callback is not None
    return {"target": target.key, "card": shown, "state": state.as_json()}


# --------------------------------------------------------------------------------------------
# a change
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeResult:
    """What recording a change did: ``scheduled`` (settled in ``settle_in`` seconds), ``stale``
    (recorded; no card with auto_generate), or ``own_output`` (our generation's output: ignored)."""

    target: Target
    action: str
    seq: int | None = None
    settle_in: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target.key,
            "action": self.action,
            "seq": self.seq,
            "settle_in": self.settle_in,
        }


def record_change(res: Resources, data: Any) -> ChangeResult:
    """Record a change of a target's sources. Raises :class:`RequestInvalid` naming the fields."""
    change = SourceChange.parse(data)
    refuse_unusable_urls({"video_url": change.video_url, "audio_url": change.audio_url}, res.settings)
    target, store = change.target, store_of(res)
    retire_ended(res, target)
    sources = _without_own_outputs(change.sources, store.outputs(target))
    if sources is None:
        # GEN writes a generation's output back into the target: that is not a new source.
        log.info("target %s: change names only our own output; ignored", target.key)
        metrics.record_card_change(res.redis, action="own_output")
        return ChangeResult(target, "own_output")
    card = store.card(target)
    auto = card is not None and card.auto_generate
    debounce = card.debounce_seconds if card is not None else 0.0
    recorded = store.record_change(
        target,
        sources,
        now=res.clock(),
        debounce=debounce,
        schedule=auto,
        grace=res.settings.recovery_grace,
    )
    action = "scheduled" if auto else "stale"
    metrics.record_card_change(res.redis, action=action)
    log.info("target %s: change %d recorded (%s)", target.key, recorded.seq, action)
    return ChangeResult(target, action, recorded.seq, debounce if auto else None)


def reread(res: Resources, target: Target) -> ChangeResult:
    """Read the target's sources from GEN (``GET`` the cell or layer: a GEN event named it) and act
    on them as on a change, unless they are the ones known already. ``no_sources``: GEN shows none
    (:func:`worker.cards.gen_sources.sources_in`). Raises GEN's errors (GenAPIError)."""
    if target.layer_id is not None:
        document = res.gen.get_layer(target.sheet_id, target.cell_id, target.layer_id)
    else:
        document = res.gen.get_cell(target.sheet_id, target.cell_id)
    sources = sources_in(document)
    if sources is None:
        return ChangeResult(target, "no_sources")
    known = store_of(res).state(target).sources
    if known is not None and fingerprint(merge(known, sources)) == fingerprint(known):
        return ChangeResult(target, "unchanged")
    change = {**target.model_dump(mode="json", exclude_none=True), **sources.model_dump(exclude_none=True)}
    return record_change(res, change)


def reread_named(
    queue: TaskQueue, res: Resources, cell_ids: Iterable[str], layer_ids: Iterable[str]
) -> list[str]:
    """Send ``lipsync.reread_target`` for every card on these cells or layers (a GEN event named
    them); returns the targets' names."""
    targets = store_of(res).targets_at(cell_ids, layer_ids)
    for target in targets:
        queue.send(TASK_REREAD, kwargs={"target": target.key})
    return [target.key for target in targets]


def _without_own_outputs(sources: Sources, outputs: set[str]) -> Sources | None:
    """``sources`` without a side that names one of our outputs (GEN wrote it back into the target:
    the loop guard); None when no side is left. The other side of such a change is still a change
    (GEN shows our output as the video and a new speech as the audio)."""
    kept: dict[str, str] = {}
    for side in ("video", "audio"):
        values = {name: getattr(sources, f"{side}_{name}") for name in ("resource_id", "url")}
        named = {k: v for k, v in values.items() if v is not None}
        if named and not set(named.values()) & outputs:
            kept.update({f"{side}_{k}": v for k, v in named.items()})
    return Sources.model_validate(kept) if kept else None


# --------------------------------------------------------------------------------------------
# settling the latest change
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settled:
    """What a settle did: ``stale`` (a newer change settles later), ``early`` (come back in
    ``wait`` seconds), ``off`` (the card's auto_generate is off), or the decision it carried out."""

    action: str
    job_id: str | None = None
    superseded: str | None = None
    wait: float | None = None


def settle(queue: TaskQueue, res: Resources, target: Target, *, seq: int | None) -> Settled:
    """Settle the target's latest change (``seq``: the change that scheduled this settle; None: the
    latest, for the settle check). Safe to run twice, and concurrently."""
    store = store_of(res)
    while True:
        state = retire_ended(res, target)
        if seq is not None and state.seq != seq:
            return Settled("stale")
        if state.superseding is not None:
            if not _supersede(queue, res, target, state.superseding, by=state.inflight_job):
                return Settled("stop_unconfirmed", superseded=state.superseding)
            continue
        if state.inflight_job is not None and state.inflight_seq == state.seq:
            # Claimed for the latest change: make sure its job exists (the claimer may have died).
            _start(queue, res, target, state)
            store.settled(target, state.seq)
            return Settled("started", job_id=state.inflight_job)
        card = store.card(target)
        if card is None or not card.auto_generate:
            store.settled(target, state.seq)
            return Settled("off")
        assert state.changed_at is not None
        wait = state.changed_at + card.debounce_seconds - res.clock()
        if wait > 0.05:
            return Settled("early", wait=wait)
        outcome = _carry_out(queue, res, target, state)
        if outcome is not None:
            return outcome


def _carry_out(queue: TaskQueue, res: Resources, target: Target, state: TargetState) -> Settled | None:
    """Carry out the decision for ``state``; None when the target moved on meanwhile (look again)."""
    store = store_of(res)
    assert state.sources is not None
    action = decide(Situation(state.sources, output_fp=state.output_fp, inflight_fp=state.inflight_fp))
    due = steps.stop_due(res, within=0.0)
    if action in (Action.NOTHING, Action.INCOMPLETE):
        store.settled(target, state.seq)
        if action == Action.NOTHING:
            metrics.record_card_change(res.redis, action="unchanged")
        return Settled(action.value)
    if action == Action.STOP:
        assert state.inflight_job is not None
        if not store.stop_inflight(target, seq=state.seq, expected=state.inflight_job, due=due):
            return None
        failpoint("cards.after_claim")
        if not _supersede(queue, res, target, state.inflight_job, by=None):
            return Settled("stop_unconfirmed", superseded=state.inflight_job)
        store.settled(target, state.seq)
        return Settled(action.value, superseded=state.inflight_job)
    job_id = job_id_for(target, state.seq)
    claimed = store.claim(
        target,
        seq=state.seq,
        job_id=job_id,
        fp=fingerprint(state.sources),
        expected=state.inflight_job,
        due=due,
    )
    if not claimed:
        return None
    failpoint("cards.after_claim")
    if state.inflight_job is not None and not _supersede(queue, res, target, state.inflight_job, by=job_id):
        return Settled("stop_unconfirmed", job_id=job_id, superseded=state.inflight_job)
    _start(queue, res, target, store.state(target))
    store.settled(target, state.seq)
    return Settled(action.value, job_id=job_id, superseded=state.inflight_job)


def _supersede(queue: TaskQueue, res: Resources, target: Target, job_id: str, *, by: str | None) -> bool:
    """Stop ``job_id`` on GEN (its credits are refunded) and end it ``superseded`` (failure callback
    naming ``by``), then free the target for the job that replaces it.

    False when GEN did not confirm the stop (it stayed unreachable, or refused for another reason
    than the generation having ended): the target stays held by the old generation, so nothing new
    starts beside it; the settle check asks GEN again after LIPSYNC_RECOVERY_GRACE.
    """
    earlier = res.jobs.get(job_id)
    if earlier is not None and earlier.outcome is not None and _unconfirmed(earlier):
        assert earlier.generation_id is not None
        steps.try_stop(res, job_id, earlier.generation_id, retries=0)
    reason = f"superseded by job {by} for newer sources" if by else "the sources went back to the output's"
    outcome = cancel_job(queue, res, job_id, reason=reason, supersede=True, superseded_by=by)
    ended = res.jobs.get(job_id)
    if ended is not None and _unconfirmed(ended):
        log.warning(
            "target %s: GEN did not confirm the stop of job %s; asking again later", target.key, job_id
        )
        store_of(res).postpone(target, res.clock() + res.settings.recovery_grace)
        return False
    log.info("target %s: job %s %s", target.key, job_id, (outcome or {}).get("status", "unknown"))
    failpoint("cards.after_supersede")
    if outcome is not None and outcome.get("status") == "completed":
        # It completed before the stop reached it: its output is real (if no longer the latest).
        _add_outputs(res, target, outcome)
    store_of(res).superseded(target, job_id)
    return True


def _unconfirmed(record: JobRecord) -> bool:
    """The job had a generation on GEN and GEN did not confirm our stop of it."""
    return record.generation_id is not None and record.stop_result == "failed"


def _start(queue: TaskQueue, res: Resources, target: Target, state: TargetState) -> None:
    """Create the claimed job and send it (both idempotent: a second run joins the first). A job
    that cannot be created (its sources refused) ends ``rejected`` with the card's callback told."""
    card = store_of(res).card(target)
    assert state.inflight_job is not None and state.sources is not None
    request: dict[str, Any] = {
        "job_id": state.inflight_job,
        **target.model_dump(mode="json", exclude_none=True),
        **state.sources.model_dump(mode="json", exclude_none=True),
        "metadata": card.metadata if card is not None else {},
    }
    if card is not None and card.lip_sync_model is not None:
        request["model"] = card.lip_sync_model
    if card is not None and card.callback is not None:
        request["callback"] = card.callback.model_dump(mode="json")
    try:
        started = steps.create(request, task_id=state.inflight_job, res=res)
    except RequestInvalid as exc:
        reject(queue, res, request, exc, task_id=state.inflight_job)
        log.warning("target %s: job %s refused: %s", target.key, state.inflight_job, exc)
        return
    if started.record.outcome is not None or (not started.created and started.record.state != "queued"):
        return
    current = store_of(res).state(target).inflight_job
    if current != state.inflight_job:
        # A newer change's settle took the target while this job was being created. Its record
        # exists now, so that settle's stop would have found it; end it here before it is sent.
        reason = (
            f"superseded by job {current} before it started" if current else "superseded before it started"
        )
        cancel_job(queue, res, state.inflight_job, reason=reason, supersede=True, superseded_by=current)
        return
    if not steps.start(queue, res, started):
        return  # its chain had started already (an earlier settle of the same change)
    metrics.record_card_change(res.redis, action="generation_started")
    log.info("target %s: job %s started for change %d", target.key, state.inflight_job, state.seq)


def retire_ended(res: Resources, target: Target) -> TargetState:
    """The target's state, after taking its job in flight out of flight if that job ended (a
    completed one's sources become the output's, and its output joins the loop guard's list)."""
    store = store_of(res)
    state = store.state(target)
    if state.inflight_job is None:
        return state
    record = res.jobs.get(state.inflight_job)
    if record is None:
        return state
    if record.job is not None:
        # GEN writes the output into the target as soon as it completes, before our fetch ends.
        output = Job.model_validate(record.job).output_resource
        if output is not None:
            store.add_outputs(target, [v for v in (output.id, output.url) if v])
    if record.outcome is None:
        return state
    completed = record.outcome.get("status") == "completed"
    if completed:
        _add_outputs(res, target, record.outcome)
    store.retire(target, state.inflight_job, completed=completed)
    return store.state(target)


def _add_outputs(res: Resources, target: Target, outcome: dict[str, Any]) -> None:
    output = outcome.get("output") or {}
    store_of(res).add_outputs(target, [str(v) for v in (output.get("id"), output.get("url")) if v])


__all__ = ["ChangeResult", "RequestInvalid", "Settled", "configure", "record_change", "settle", "show"]
