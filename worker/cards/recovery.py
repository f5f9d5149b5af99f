"""The settle check: settles what a lost settle left undone.

A change schedules its settle as a countdown message; a worker killed while holding it (or in the
middle of a settle) loses it. Every change of a card with ``auto_generate`` leaves its target in
``lipsync:cards:due`` until it is settled, scored by when the settle is overdue (the debounce plus
``LIPSYNC_RECOVERY_GRACE``, or a stop's time during a supersede). Every worker runs this check next
to the sweeper, every ``LIPSYNC_SWEEP_INTERVAL``; one per round (a Redis lease) settles the overdue
targets itself. A settle is safe to repeat (:mod:`worker.cards.flow`), so a slow settle that is
still alive and the check can overlap.
"""

from __future__ import annotations

import logging
import threading

from worker.cards.flow import settle
from worker.cards.store import CardStore
from worker.jobs.resources import Resources, resources
from worker.names import CARDS_LEASE_KEY
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


class SettleCheckThread(threading.Thread):
    """Every ``LIPSYNC_SWEEP_INTERVAL`` in a worker's main process: if this node wins the round's
    lease, :func:`settle_overdue`."""

    def __init__(self, queue: TaskQueue, holder: str) -> None:
        super().__init__(name="lipsync-settle-check", daemon=True)
        self.queue = queue
        self.holder = holder
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            res = resources()
            interval = res.settings.sweep_interval
            try:
                lease_ms = max(1, int(interval * 900))
                if res.redis.set(CARDS_LEASE_KEY, self.holder, nx=True, px=lease_ms):
                    settle_overdue(self.queue, res)
            except Exception:
                log.exception("settle check failed; will retry in %.0f s", interval)
            self.stopping.wait(interval)
