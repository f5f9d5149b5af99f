"""The settle check: settles what a lost settle left undone.

A change schedules its settle as a countdown message; a worker killed while holding it (or in the
middle of a settle) loses it. Every change of a card with ``auto_generate`` leaves its target in
``lipsync:cards:due`` until it is settled, scored by when the settle is overdue (the debounce plus
``LIPSYNC_RECOVERY_GRACE``, or a stop's time during a supersede). The sweeper thread's round runs
this check (``extra_work``, given in :mod:`worker.app`): every ``LIPSYNC_SWEEP_INTERVAL``, the one
node holding the round's lease settles the overdue targets itself. A settle is safe to repeat
(:mod:`worker.cards.flow`), so a slow settle that is still alive and the check can overlap.
"""

from __future__ import annotations

import logging

from worker.cards.flow import settle
from worker.cards.store import CardStore
from worker.jobs.resources import Resources
from worker.taskqueue import TaskQueue

log = logging.getLogger("lipsync.cards.recovery")


def settle_overdue(queue: TaskQueue, res: Resources, *, limit: int = 100) -> list[str]:
    """Settle every target whose settle is overdue; returns their names."""
    store = CardStore(res.redis)
    now = res.clock()
    done = []
    for target in store.due(now, limit=limit):
        try:
            settled = settle(queue, res, target, seq=None)
        except Exception:
            # One target's trouble must not hold up the others; it stays due.
            log.exception("target %s: could not settle it; will try again", target.key)
            store.postpone(target, now + res.settings.recovery_grace)
            continue
        if settled.action == "early":
            store.postpone(target, now + (settled.wait or 0.0) + res.settings.recovery_grace)
            continue
        log.warning("target %s: its settle was overdue; settled here (%s)", target.key, settled.action)
        done.append(target.key)
    return done
