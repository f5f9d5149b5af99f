"""Optional JSON logs (``LIPSYNC_LOG_JSON=true``): one object per line, with the job's ids.

Inside a task, every line carries ``job_id`` and, once GEN accepted the job, ``generation_id``
(set from the task's arguments before it runs). Celery's own lines about a message (received,
succeeded, retry) carry its ``task_id`` and ``task_name``. Secrets never reach a log line in the
first place: they are not in task arguments, and ``SecretStr`` settings print as ``**********``.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

from celery import signals

_job_id: ContextVar[str | None] = ContextVar("lipsync_log_job_id", default=None)
_generation_id: ContextVar[str | None] = ContextVar("lipsync_log_generation_id", default=None)


def bind_generation(generation_id: str | None) -> None:
    """Called when a step learns the job's generation id."""
    _generation_id.set(generation_id)


class JobContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job_id.get()
        record.generation_id = _generation_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "generation_id": getattr(record, "generation_id", None),
        }
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            entry["task_id"] = data.get("id")
            entry["task_name"] = data.get("name")
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def ids_from_arguments(args: Any, kwargs: Any) -> tuple[str | None, str | None]:
    """The job and generation ids a lipsync task is about, from its arguments (best effort)."""
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    candidates: list[Any] = [kwargs.get("job"), kwargs.get("payload")]
    if isinstance(args, list | tuple) and args:
        candidates.insert(0, args[0])
    request = kwargs.get("request")
    if isinstance(request, dict):
        return _str(request.get("job_id")), None
    for candidate in candidates:
        if isinstance(candidate, dict):
            inner = candidate.get("request")
            job_id = inner.get("job_id") if isinstance(inner, dict) else candidate.get("job_id")
            return _str(job_id), _str(candidate.get("generation_id"))
    if isinstance(args, list | tuple) and args and isinstance(args[0], str):
        return args[0], None  # lipsync.await_job(job_id)
    return None, None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _on_prerun(args: Any = None, kwargs: Any = None, **_: Any) -> None:
    job_id, generation_id = ids_from_arguments(args, kwargs)
    _job_id.set(job_id)
    _generation_id.set(generation_id)


def _on_postrun(**_: Any) -> None:
    _job_id.set(None)
    _generation_id.set(None)


def _use_json(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
        handler.addFilter(JobContextFilter())


def install(*, json_logs: bool) -> None:
    """Connect the signals (idempotent: dispatch uids)."""
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="lipsync-log-prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="lipsync-log-postrun")
    if json_logs:
        signals.after_setup_logger.connect(_use_json, weak=False, dispatch_uid="lipsync-log-json")
        signals.after_setup_task_logger.connect(_use_json, weak=False, dispatch_uid="lipsync-log-json-task")
