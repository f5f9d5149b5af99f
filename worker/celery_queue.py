"""The task queue as Celery does it: :class:`worker.taskqueue.TaskQueue` over a Celery app."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery, chain, current_task
from celery.canvas import Signature

from worker.errors import LipsyncJobFailed
from worker.names import priority_of, queue_of


class CeleryQueue:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(
        self,
        task: str,
        *,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        queue: str | None = None,
    ) -> None:
        options: dict[str, Any] = {}
        if task_id is not None:
            options["task_id"] = task_id
        if queue is not None:
            options["queue"] = queue
        self.app.send_task(task, args=list(args), kwargs=dict(kwargs or {}), **options)

    def chain_of(
        self, tasks: Sequence[str], job: dict[str, Any], *, last_task_id: str | None
    ) -> Signature[Any]:
        """The chain as a Celery signature: ``lipsync.run`` replaces itself with it; producers
        (:func:`worker.jobs.steps.start`) and the sweeper send it. Each step names its queue and
        priority, so routing does not depend on the sending app's ``task_routes``."""
        steps = [self.app.signature(name, queue=queue_of(name)) for name in tasks]
        for step in steps:
            priority = priority_of(step.name)
            if priority is not None:
                step.set(priority=priority)
        if last_task_id is not None:
            steps[-1].set(task_id=last_task_id)
        first, *rest = steps
        job_id = job.get("request", {}).get("job_id")
        # A short argsrepr keeps callback URLs and metadata out of monitoring.
        first = first.clone(args=(job,))
        first.options["argsrepr"] = f"(job={job_id})"
        return chain(first, *rest)

    def send_chain(
        self,
        tasks: Sequence[str],
        job: dict[str, Any],
        *,
        last_task_id: str | None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.chain_of(tasks, job, last_task_id=last_task_id).apply_async(**(options or {}))

    def resolve(self, task_id: str, outcome: dict[str, Any]) -> None:
        # When the task running here is the one whose result this is (the chain's last step), store
        # it with that task's own request: the result keeps its extended metadata (worker, name,
        # queue). (current_task is a proxy: it is falsy, not None, outside a task.)
        request = current_task.request if current_task and current_task.request.id == task_id else None
        if outcome.get("status") == "completed":
            self.app.backend.store_result(task_id, outcome, "SUCCESS", request=request)
            if request is not None:
                # The task returns this very outcome next (tasks.lipsync): Celery's own store of it
                # would write and publish the same result a second time. Celery reads the request's
                # ignore_result when the task has returned, so the success is stored once. A
                # failure is not ours to skip: Celery stores it (or not) by the task's options.
                request.ignore_result = True
        else:
            self.app.backend.store_result(task_id, LipsyncJobFailed(outcome), "FAILURE", request=request)

    def revoke(self, task_ids: Sequence[str]) -> None:
        self.app.control.revoke(list(task_ids))
