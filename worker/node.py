"""This worker node's part in liveness (:mod:`worker.jobs.liveness`), in Celery terms.

* :class:`Node` is the process's identity in the fleet: one *holder* name per broker connection.
  Celery drops the reserved and countdown messages it held, and cancels its running steps, the
  moment that connection is lost; the node then takes a fresh holder and releases the old one for
  the sweeper to recover at once — at the loss, not at the reconnect, which a backoff puts seconds
  after Redis is back (30 s with Celery's own; worker.ops.reconnect).
* :class:`HeartbeatThread` writes the current holder's heartbeat from a thread of its own, so a long
  download or a busy pool is never mistaken for death.
* :meth:`Node.took` runs on Celery's ``task_received`` signal, in the consumer, for every message
  the node takes — countdown polls held in memory and reserved-but-not-started messages included —
  and records that this holder holds the job (or owed webhook) the message drives.
* The bootsteps wire them into a worker: :class:`NodeStep` (worker) and :class:`ConnectionStep`
  (consumer: one holder per connection).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import bootsteps, signals

from worker.errors import RequestInvalid
from worker.jobs import steps
from worker.jobs.resources import Resources, resources
from worker.ops.broker import Drives, drives_args

log = logging.getLogger("lipsync.node")

#: A blueprint's state while it runs, a restart after a lost connection included (Celery's stubs
#: leave it out).
BLUEPRINT_RUNNING: int = bootsteps.RUN  # type: ignore[attr-defined]


class Node:
    """One worker process in the fleet, and the holder name of its current broker connection."""

    def __init__(self, name: str, *, resources: Callable[[], Resources] = resources) -> None:
        self.name = name
        self.resources = resources
        self._generation = itertools.count(1)
        self._lock = threading.Lock()
        self.holder = self._new_holder()
        self._connections = 0
        #: Holders whose release could not be written yet (Redis was down): retried on every beat.
        self._to_release: list[str] = []
        #: Holdings Redis refused at receipt (it was restarting), with their holder: written by the
        #: next beat.
        self._pending_holds: list[tuple[Holding, str]] = []
        #: Monotonic time since when every heartbeat reached Redis (None: the last one failed).
        self.healthy_since: float | None = None
        #: Whether the current connection was lost and its holder released already (by :meth:`lost`).
        self._lost = False
        #: Set when something is owed (a release, a holding): wakes the heartbeat to write it now.
        self.wake = threading.Event()

    def _new_holder(self) -> str:
        # Unique across processes, restarts (a pid can be reused) and reconnects.
        return f"{self.name}/{os.getpid()}/{next(self._generation)}-{uuid.uuid4().hex[:6]}"

    # -- the consumer's side ---------------------------------------------------------------------

    def connected(self) -> None:
        """The consumer (re)connected to the broker. Whatever the previous connection held is gone
        from this process: if :meth:`lost` did not release that holder already, release it now."""
        with self._lock:
            self._connections += 1
            if self._connections == 1:
                return
            if self._lost:
                self._lost = False
                return
            old = self._switch_holder()
        log.warning("broker connection re-established; re-driving what this worker held before it (%s)", old)
        self._try_release(old)

    def lost(self) -> None:
        """The consumer lost its broker connection: Celery has just dropped the messages that
        connection held (reserved ones, countdown polls) and cancelled its running steps. Release
        its holder now, so that the sweeper re-drives those jobs as soon as Redis answers, whoever
        runs them. Waiting for this consumer's reconnect would add its backoff (up to
        ``LIPSYNC_BROKER_RECONNECT_MAX`` between attempts) to the recovery of every job it held."""
        with self._lock:
            if self._connections == 0 or self._lost:
                return
            self._lost = True
            old = self._switch_holder()
        log.warning("broker connection lost; re-driving what this worker held (%s) once Redis answers", old)
        self._try_release(old)

    def _switch_holder(self) -> str:
        """A new holder for the next connection; the old one is owed a release. Under the lock."""
        old, self.holder = self.holder, self._new_holder()
        self._to_release.append(old)
        self.wake.set()
        return old

    def _try_release(self, old: str) -> None:
        try:
            self._release_pending()
        except redis.RedisError:  # still owed: the heartbeat writes it
            pass
        except Exception:  # still owed too; never stop the consumer from (re)connecting
            log.warning("could not release %s yet; the heartbeat will", old, exc_info=True)

    def took(self, request: Any) -> None:
        """Record that this node holds the job the message in ``request`` (a Celery Request) drives.

        Never raises: liveness must not stop a worker from consuming. When Redis cannot be written
        (it is restarting), the holding is kept and written by the next heartbeat.
        """
        try:
            holding = _holding_of(request)
        except Exception:
            log.warning("could not read %s %s", request.name, request.id, exc_info=True)
            return
        if holding is None:
            return
        holder = self.holder
        try:
            self._write(holding, holder)
        except redis.RedisError:
            with self._lock:
                self._pending_holds.append((holding, holder))
                self.wake.set()
        except Exception:
            log.warning("could not record who holds %s %s", request.name, request.id, exc_info=True)

    def _write(self, holding: Holding, holder: str) -> None:
        res, what = self.resources(), holding.drives
        if what.webhook_id is not None:
            res.holders.hold_webhook(what.webhook_id, holder, holding.tag, drive=what.drive or 0)
            return
        assert what.job_id is not None
        if res.holders.hold_job(what.job_id, holder, holding.tag, drive=what.drive) == -1:
            if what.run_request is None:
                return
            # A producer that sent lipsync.run by hand: open the job's record now, so the job can
            # be re-driven if this node dies before running it (lipsync.run finds it).
            try:
                steps.create(what.run_request, task_id=holding.task_id, res=res)
            except RequestInvalid:
                return  # lipsync.run rejects it, with its failure callback
            res.holders.hold_job(what.job_id, holder, holding.tag, drive=None)

    def _write_pending_holds(self) -> None:
        """Holdings Redis refused at receipt. One taken under an earlier connection's holder is written
        as that holder's, and the holder is released again: the sweeper may have recovered it
        already, without this job.

        A holding that fails with anything but a Redis error would fail the same way on every beat:
        it is logged and dropped (its job is then recovered by its timers, as before liveness), so
        it never blocks the holdings behind it."""
        with self._lock:
            pending, self._pending_holds = self._pending_holds, []
        try:
            while pending:
                holding, holder = pending[0]
                try:
                    self._write(holding, holder)
                except redis.RedisError:
                    raise
                except Exception:
                    log.exception("dropping the holding of %s (%s): cannot write it", holding.task_id, holder)
                    pending.pop(0)
                    continue
                if holder != self.holder:
                    with self._lock:
                        self._to_release.append(holder)
                pending.pop(0)
        finally:
            if pending:
                with self._lock:
                    self._pending_holds[:0] = pending

    # -- the heartbeat's side --------------------------------------------------------------------

    def beat(self) -> None:
        """Write the current holder's heartbeat first, then the holdings and releases still owed.

        The heartbeat goes first so that nothing owed (a holding that cannot be written) can keep a
        live node from looking alive. A non-Redis error from the heartbeat itself propagates (the
        thread logs it and beats again); the link is then not trusted until beats land again.
        """
        try:
            if not self.resources().holders.beat(self.holder):
                # Released already (never by us for the current holder, but be safe): take a new one.
                with self._lock:
                    self.holder = self._new_holder()
        except redis.RedisError as exc:
            if self.healthy_since is not None:
                log.warning("heartbeat: Redis unreachable (%s); will keep trying", type(exc).__name__)
            self.healthy_since = None
            return
        except Exception:
            self.healthy_since = None
            raise
        if self.healthy_since is None:
            self.healthy_since = time.monotonic()
        self.wake.clear()  # before writing: whatever is owed after this sets it again
        try:
            self._write_pending_holds()
            self._release_pending()
        except redis.RedisError as exc:  # still owed: the next beat writes it
            log.warning("heartbeat: could not write what is owed (%s); will retry", type(exc).__name__)

    def owes(self) -> bool:
        """Whether a release or a holding is still to be written."""
        with self._lock:
            return bool(self._to_release or self._pending_holds)

    def trusts_silence(self, dead_after: float) -> bool:
        """Whether this node has reached Redis for the last ``dead_after`` seconds without a gap, so
        that another node's silence over that window means the other node, not Redis, stopped."""
        since = self.healthy_since
        return since is not None and time.monotonic() - since >= dead_after

    def _release_pending(self) -> None:
        with self._lock:
            pending, self._to_release = self._to_release, []
        try:
            for holder in pending:
                self.resources().holders.release(holder)
                pending = pending[1:]
        finally:
            if pending:
                with self._lock:
                    self._to_release[:0] = pending


@dataclass(frozen=True)
class Holding:
    """A message this node took: its delivery tag, its task id, and what it drives."""

    tag: str
    task_id: str
    drives: Drives


def _holding_of(request: Any) -> Holding | None:
    tag = getattr(request.message, "delivery_tag", None)
    if not tag:
        return None
    task_id = str(request.id)
    what = drives_args(request.name, request.args or (), request.kwargs or {}, task_id)
    if what.job_id is None and (what.webhook_id is None or what.drive is None):
        return None
    return Holding(str(tag), task_id, what)


#: How soon the heartbeat tries again while a release or a holding is owed (seconds): until it is
#: written, the sweeper cannot re-drive the jobs it concerns.
OWED_RETRY = 0.5


class HeartbeatThread(threading.Thread):
    """Beats every ``interval``; at once when the node owes a release or a holding, and then every
    :data:`OWED_RETRY` until Redis takes it."""

    def __init__(self, node: Node, interval: float) -> None:
        super().__init__(name="lipsync-heartbeat", daemon=True)
        self.node = node
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        # Never dies: a node whose heartbeat thread stopped would look dead while it works, and the
        # sweeper would re-drive everything it takes (each re-drive counting toward the limit).
        while not self.stopping.is_set():
            try:
                self.node.beat()
            except Exception:
                log.exception("heartbeat failed; will retry in %.0f s", self.interval)
            if self.node.owes():
                self.stopping.wait(OWED_RETRY)
            else:
                self.node.wake.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.node.wake.set()


class NodeStep(bootsteps.StartStopStep):
    """Worker bootstep: this process's :class:`Node`, its heartbeat thread, and the hook that records
    every message the consumer takes. The sweeper (worker.app) asks the node whether to trust
    other nodes' silence."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.node: Node | None = None
        self.heartbeat: HeartbeatThread | None = None

    def start(self, worker: Any) -> None:
        settings = resources().settings
        node = self.node = Node(str(getattr(worker, "hostname", None) or "worker"))
        worker.lipsync_node = node
        signals.task_received.connect(_on_task_received, weak=False)
        node.beat()
        self.heartbeat = HeartbeatThread(node, settings.heartbeat_interval)
        self.heartbeat.start()

    def stop(self, worker: Any) -> None:
        # The heartbeat goes on until the process exits: a warm shutdown first finishes the running
        # steps (a long download) and puts back the reserved messages, and the node must not look
        # dead meanwhile. Once it stops beating, whatever it still held is recovered.
        signals.task_received.disconnect(_on_task_received)


def _on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    node: Node | None = getattr(getattr(sender, "controller", None), "lipsync_node", None)
    if node is not None and request is not None:
        node.took(request)


class ConnectionStep(bootsteps.StartStopStep):
    """Consumer bootstep, started after every broker (re)connection and stopped when the connection
    is lost: a new holder per connection, the old one released at the loss."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        node: Node | None = getattr(c.controller, "lipsync_node", None)
        if node is not None:
            node.connected()

    def stop(self, c: Any) -> None:
        # Celery stops the consumer's steps, with its blueprint still running, when the connection
        # is lost (after dropping what it held), and with the blueprint closing at a shutdown: a
        # warm shutdown finishes its running steps and puts back its reserved messages itself.
        node: Node | None = getattr(c.controller, "lipsync_node", None)
        if node is not None and c.blueprint.state == BLUEPRINT_RUNNING:
            node.lost()
