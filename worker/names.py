"""Every name the fleet shares, defined once: tasks, queues, job stages, task states, Redis keys.

Producers in other languages, the deploy manifests' metric queries and the operators' runbooks all
depend on these strings, so nothing else in the code spells them: it imports them from here (a unit
test renders the manifests' queries against these names).
"""

from __future__ import annotations

import enum
from typing import Literal

# --------------------------------------------------------------------------------------------
# GEN's vocabulary
# --------------------------------------------------------------------------------------------

#: The models GEN's Lipsync card offers, in this worker's spelling (GEN's older dialect).
LipsyncModel = Literal["sync_so", "gen"]

#: ``autocontentengine``: ``/v1/autocontentengine`` with ``model``/``video_resource_id``/
#: ``audio_resource_id`` (GEN's older documented body). ``vidsheet``: ``/v1/vidsheet`` with
#: ``talking_avatar_video_data`` URLs and ``lip_sync_model`` (GEN's newer body).
Dialect = Literal["autocontentengine", "vidsheet"]

# --------------------------------------------------------------------------------------------
# Celery tasks (the wire names other services send to)
# --------------------------------------------------------------------------------------------

#: The entry point: validate a request and replace itself with the chain below.
TASK_RUN = "lipsync.run"
TASK_SUBMIT = "lipsync.submit"
TASK_POLL = "lipsync.poll"
TASK_FETCH = "lipsync.fetch_output"
#: A second enqueue of a running job id waits for the first one's outcome.
TASK_AWAIT = "lipsync.await_job"
#: A Lipsync card's settings for one target (worker.cards), and a change of a target's sources.
TASK_CONFIGURE_CARD = "lipsync.configure_card"
TASK_SOURCE_CHANGED = "lipsync.source_changed"
#: Runs when a change's debounce window passed: starts (or supersedes) the target's generation.
TASK_SETTLE = "lipsync.settle_sources"
#: A GEN event named a card's cell or layer: read its sources from GEN and act on them as a change.
TASK_REREAD = "lipsync.reread_target"
TASK_DELIVER_WEBHOOK = "lipsync.deliver_webhook"
#: A batch of jobs with one batch callback (worker.batches).
TASK_RUN_BATCH = "lipsync.run_batch"

#: The job's chain after ``lipsync.run``, in order.
CHAIN = (TASK_SUBMIT, TASK_POLL, TASK_FETCH)

# --------------------------------------------------------------------------------------------
# Queues, one per kind of work, so operators can give downloads and callbacks their own workers
# --------------------------------------------------------------------------------------------

QUEUE_JOBS = "lipsync"
QUEUE_FETCH = "lipsync.fetch"
QUEUE_CALLBACKS = "lipsync.callbacks"
#: A worker started without ``-Q`` consumes all three.
ALL_QUEUES = (QUEUE_JOBS, QUEUE_FETCH, QUEUE_CALLBACKS)
#: Tasks that do not run on :data:`QUEUE_JOBS` (the default queue).
ROUTES = {TASK_FETCH: QUEUE_FETCH, TASK_DELIVER_WEBHOOK: QUEUE_CALLBACKS}


def queue_of(task: str) -> str:
    return ROUTES.get(task, QUEUE_JOBS)


#: Message priorities where they are not the default (kombu's Redis transport takes priority 0
#: first, then 3, 6, 9). Polls share :data:`QUEUE_JOBS` with ``lipsync.run`` and ``submit``: when a
#: node falls behind, a queue of due polls must not keep new jobs from reaching GEN (a generation
#: not started is later by all of GEN's time; a poll waiting its turn, by the wait). A retried poll
#: keeps its message's priority.
PRIORITIES = {TASK_POLL: 6}


def priority_of(task: str) -> int | None:
    return PRIORITIES.get(task)


# --------------------------------------------------------------------------------------------
# Job stages: the job record's ``state``, the metrics' ``stage`` label, and (upper-cased) the
# progress state a caller's AsyncResult shows
# --------------------------------------------------------------------------------------------


class Stage(enum.StrEnum):
    """Where an unfinished job is, in the order a successful job passes through."""

    #: Recorded; its message waits in a queue.
    QUEUED = "queued"
    #: Asking GEN to start the generation.
    SUBMITTING = "submitting"
    #: GEN accepted it and is generating; we poll.
    POLLING = "polling"
    #: GEN completed it; we are downloading and storing the output.
    FETCHING = "fetching"

    @property
    def task_state(self) -> str:
        """The Celery progress state for this stage (``POLLING``...), as Flower and AsyncResult show it."""
        return self.value.upper()


#: The unfinished stages, exported as metrics even when zero (an autoscaler reads a missing series
#: as an error). A finished job's record holds its outcome status (completed, failed...) instead.
IN_FLIGHT_STAGES = tuple(Stage)

#: The stages whose load each worker queue carries: what the autoscaling of its workers counts
#: (deploy/kubernetes renders these; a test evaluates the deployed queries against the metrics).
STAGES_BY_QUEUE = {
    QUEUE_JOBS: (Stage.QUEUED, Stage.SUBMITTING, Stage.POLLING),
    QUEUE_FETCH: (Stage.FETCHING,),
}

#: The Celery state of ``lipsync.await_job`` while it waits for the job it joined (not a stage).
STATE_JOINED = "JOINED"

# --------------------------------------------------------------------------------------------
# Redis keys (records and metrics live in LIPSYNC_REDIS_URL; every key starts with "lipsync:")
# --------------------------------------------------------------------------------------------

#: One hash per job: ``lipsync:job:<job_id>``.
JOB_KEY_PREFIX = "lipsync:job:"
#: A job record's flag: its next re-drive is not the job's doing (its worker lost the broker, or the
#: broker lost its message), so it does not count toward LIPSYNC_MAX_REDRIVES.
FREE_REDRIVE = "free_redrive"
#: Sorted set of unfinished jobs (and finished ones whose callbacks are not yet dispatched),
#: scored by ``overdue_at``.
ACTIVE_JOBS_KEY = "lipsync:jobs:active"
#: The last verdict of GEN on a key and agent (worker.preflight), read by ``health``: one key per
#: configuration, ``lipsync:gen_check:<hash of base URL, agent id and key>`` (never the key itself),
#: so one misconfigured worker's verdict never answers for the rest of the fleet.
GEN_CHECK_KEY = "lipsync:gen_check:"
#: When the audit of lost messages last ran and until when it runs every sweep (worker.jobs.audit).
AUDIT_STATE_KEY = "lipsync:audit:state"
#: Jobs and webhooks with no message in the broker at the last audit, with their record's last change.
AUDIT_SUSPECTS_KEY = "lipsync:audit:suspects"
#: One list per model of the newest generation times seen (``lo hi`` seconds), newest first:
#: ``lipsync:durations:<model>`` (worker.jobs.durations).
DURATIONS_KEY_PREFIX = "lipsync:durations:"
#: One list per model of the newest *bounded* generation times (seen running at a poll before the
#: one that found them done), newest first: ``lipsync:durations-bounded:<model>``. They outlive the
#: window above (worker.jobs.schedule: waves that share one plan).
BOUNDED_DURATIONS_KEY_PREFIX = "lipsync:durations-bounded:"
#: The sweeper's fleet-wide lease (one sweep per round).
SWEEPER_LEASE_KEY = "lipsync:sweeper:lease"
#: Sorted set of worker consumers ("holders"), scored by their last heartbeat in Redis server time;
#: score 0 marks a holder its own node released (it lost its broker connection and dropped what it
#: held). See worker.jobs.liveness.
HOLDERS_KEY = "lipsync:holders"
#: The hash in which kombu's Redis transport keeps every message taken but not yet acknowledged,
#: keyed by delivery tag (kombu's default ``unacked_key``; we set no key prefix).
BROKER_UNACKED_KEY = "unacked"
#: kombu's sorted set of the same delivery tags, scored by when each was taken (the taker's clock).
BROKER_UNACKED_INDEX_KEY = "unacked_index"
#: One hash per owed webhook: ``lipsync:webhook:<msg_id>``.
WEBHOOK_KEY_PREFIX = "lipsync:webhook:"
#: Sorted set of undelivered webhooks, scored by ``due_at``.
WEBHOOKS_PENDING_KEY = "lipsync:webhooks:pending"
#: The fleet-wide counter that hands out webhook drive tokens.
WEBHOOK_DRIVE_KEY = "lipsync:webhooks:drive"
#: List of dead-lettered webhooks (JSON).
DEAD_LETTERS_KEY = "lipsync:callbacks:dead"
#: Sliding-window logs of the fleet-wide GEN rate limits: ``lipsync:ratelimit:<budget>``.
RATELIMIT_KEY_PREFIX = "lipsync:ratelimit:"
#: One hash per batch: ``lipsync:batch:<batch_id>``, with ``:items`` (list of the items' requests)
#: and ``:results`` (hash, item index -> its outcome) beside it (worker.batches.store).
BATCH_KEY_PREFIX = "lipsync:batch:"
#: A batch item's job id -> ``<batch_id> <index>``: how a job's end finds its batch.
BATCH_ITEM_KEY_PREFIX = "lipsync:batchitem:"
#: Sorted set of unfinished batches (and finished ones whose callback is not yet dispatched), scored
#: by when the sweeper should next check them.
ACTIVE_BATCHES_KEY = "lipsync:batches:active"
#: Counter and histogram hashes of the fleet's metrics.
METRICS_PREFIX = "lipsync:metrics:"
#: One hash per Lipsync card: ``lipsync:card:<target>`` (worker.cards.store), and the set of them.
CARD_KEY_PREFIX = "lipsync:card:"
CARDS_KEY = "lipsync:cards"
#: The cards on a cell or a layer (``lipsync:cards:at:cell:<id>``, ``…:layer:<id>``): which targets a
#: GEN event naming that cell or layer is about.
CARDS_AT_KEY_PREFIX = "lipsync:cards:at:"
#: One hash per target whose sources changed: its sources, change sequence, generation in flight
#: and the sources of its output (``lipsync:sources:<target>``), and the set of its outputs'
#: resource ids and URLs (``…:outputs``, the loop guard).
CARD_TARGET_KEY_PREFIX = "lipsync:sources:"
#: Sorted set of targets whose change still waits to be settled, scored by when it is overdue.
CARDS_DUE_KEY = "lipsync:cards:due"
