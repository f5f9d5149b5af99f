"""What the job logic asks of the task queue, and nothing more: the seam between the Celery-free core
(:mod:`worker.jobs`, :mod:`worker.callbacks`) and Celery.

:class:`worker.celery_queue.CeleryQueue` implements it over a Celery app. Tests of the core use the
same class over a real Redis; nothing in the core imports Celery (an import-linter contract says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class TaskQueue(Protocol):
    def send(
        self,
        task: str,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        queue: str | None = None,
    ) -> None:
        """Send one message to the task named ``task`` (routed by :data:`worker.names.ROUTES`
        unless ``queue`` is given). Raises if the broker refuses it."""
        ...

    def send_chain(
        self,
        tasks: Sequence[str],
        job: dict[str, Any],
        *,
        last_task_id: str | None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Send a chain of job steps (names from :data:`worker.names.CHAIN`) whose first step
        gets ``job``; the last step runs under ``last_task_id`` (the caller's task id), so the
        caller's AsyncResult resolves when it ends. ``options`` apply to the whole chain (a
        producer's ``link`` and ``link_error``)."""
        ...

    def resolve(self, task_id: str, outcome: dict[str, Any]) -> None:
        """Resolve the caller's AsyncResult with a recorded outcome, when the job ended outside its
        chain (cancelled, given up by the sweeper, or its last task died after recording it)."""
        ...

    def revoke(self, task_ids: Sequence[str]) -> None:
        """Ask every worker to drop these messages if they see them (best effort)."""
        ...
