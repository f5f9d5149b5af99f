"""Making a job's progress visible: in the result backend (for callers) and as events (for Flower).

``update_state`` writes the custom state (SUBMITTED, POLLING, FETCHING) under the caller's task id.
The result backend is not what Flower watches: Flower builds its view from task events, so the same
progress is also sent as a ``task-<state>`` event, which Celery's event state (and Flower) records
as the task's state, with the progress fields merged into the task.
"""

from __future__ import annotations

from typing import Any

from celery import Task


def report(task: Task[Any, Any], *, caller_task_id: str | None, state: str, meta: dict[str, Any]) -> None:
    # The caller's id only: nobody reads a step's own id in the backend (Flower reads the event).
    task.update_state(task_id=caller_task_id or task.request.id, state=state, meta=meta)
    if task.request.id and not task.request.called_directly:
        task.send_event(f"task-{state.lower()}", **meta)
