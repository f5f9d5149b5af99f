"""The Lipsync card as Celery tasks (thin: the logic is :mod:`worker.cards.flow`).

* ``lipsync.configure_card(card={...})`` stores a card and returns it with its target's state;
* ``lipsync.source_changed(change={...})`` records a change of a target's sources and, for a card
  with ``auto_generate``, schedules ``lipsync.settle_sources`` after the debounce window;
* ``lipsync.settle_sources(target=..., seq=...)`` settles the change: only the settle of the newest
  change of a target does anything;
* ``lipsync.reread_target(target=...)``: a GEN event named the target's cell or layer: its sources
  are read from GEN and acted on as a change.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.base import AnyTask, redis_blinks_retried, retry_after_redis_error, without_callback
from worker.app import app
from worker.cards import flow
from worker.cards.models import Target
from worker.celery_queue import CeleryQueue
from worker.errors import RequestInvalid
from worker.gen.errors import GenAPIError
from worker.jobs.resources import resources
from worker.names import TASK_CONFIGURE_CARD, TASK_REREAD, TASK_SETTLE, TASK_SOURCE_CHANGED

log = logging.getLogger("lipsync.tasks")

#: Tries of a GEN read that failed transiently, before the event is given up (the next event, or
#: a lipsync.source_changed, brings the sources again).
REREAD_RETRIES = 5

_OPTIONS: dict[str, Any] = {"bind": True, "max_retries": None, "acks_late": True, "throws": (RequestInvalid,)}


@app.task(name=TASK_CONFIGURE_CARD, **_OPTIONS)
def configure_card(self: AnyTask, card: Any = None) -> dict[str, Any] | None:
    """Store the card; returns it (its callback left out) with its target's state.

    Raises :class:`RequestInvalid` (the task fails) naming the fields, e.g. an unknown model.
    """
    without_callback(self, "card")
    res = resources()
    with redis_blinks_retried(self):
        stored = flow.configure(res, card)
    return flow.show(res, stored.target)


@app.task(name=TASK_SOURCE_CHANGED, **_OPTIONS)
def source_changed(self: AnyTask, change: Any = None) -> dict[str, Any]:
    """Record the change; with the card's auto_generate on, settle it after the debounce window."""
    res = resources()
    with redis_blinks_retried(self):
        result = flow.record_change(res, change)
    _schedule_settle(result)
    return result.as_json()


@app.task(name=TASK_REREAD, **_OPTIONS)
def reread_target(self: AnyTask, target: str) -> dict[str, Any]:
    """A GEN event named the target's cell or layer: read its sources from GEN, act as on a change."""
    res = resources()
    try:
        result = flow.reread(res, Target.from_key(target))
    except GenAPIError as exc:
        if exc.retryable and self.request.retries < REREAD_RETRIES:
            raise self.retry(countdown=exc.retry_after or 2.0 * (self.request.retries + 1)) from None
        log.warning("target %s: could not read its sources from GEN: %s", target, exc)
        return {"target": target, "action": "gen_error", "error": str(exc)}
    except Exception as exc:
        retry_after_redis_error(self, exc)
        raise
    _schedule_settle(result)
    return result.as_json()


def _schedule_settle(result: flow.ChangeResult) -> None:
    if result.action == "scheduled" and result.seq is not None:
        settle_sources.apply_async(
            kwargs={"target": result.target.key, "seq": result.seq}, countdown=result.settle_in or 0.0
        )


@app.task(name=TASK_SETTLE, **{**_OPTIONS, "ignore_result": True})
def settle_sources(self: AnyTask, target: str, seq: int) -> dict[str, Any]:
    """Start (or supersede, or skip) the target's generation for its latest sources."""
    res = resources()
    with redis_blinks_retried(self):
        settled = flow.settle(CeleryQueue(self.app), res, Target.from_key(target), seq=seq)
    if settled.action == "early":
        raise self.retry(countdown=settled.wait or 0.0)
    log.info("target %s: change %d settled (%s)", target, seq, settled.action)
    return {"action": settled.action, "job_id": settled.job_id, "superseded": settled.superseded}
