"""Worker log lines: short at INFO, optionally JSON (``LIPSYNC_LOG_JSON=true``) with the job's ids.

At INFO, Celery logs each task's return value and each failure's exception in full ("Task
lipsync.poll[…] succeeded in 0.01s: {…the whole job…}", ~1 KB a line, request, metadata and any
URL included). :class:`ShortTaskLines` turns those into one short line — job id, step, generation
id, GEN status, outcome — and strips query strings from any URL left; the full text is kept for
DEBUG (a worker started with ``-l DEBUG`` sees everything).

Inside a task, every line carries ``job_id`` and, once GEN accepted the job, ``generation_id``
(set from the task's arguments before it runs). Celery's own lines about a message (received,
succeeded, retry) carry its ``task_id`` and ``task_name``. Secrets never reach a log line in the
first place: they are not in task arguments, and ``SecretStr`` settings print as ``**********``.
"""

from __future__ import annotations

import json
import logging
import re
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


#: The keys a short line keeps from a task's return value or a failure (never URLs or metadata).
SUMMARY_KEYS = ("job_id", "status", "error_code", "generation_id", "gen_status", "polls", "drive")
#: Celery's loggers whose task lines carry whole return values and exceptions.
TASK_LINE_LOGGERS = ("celery.app.trace", "celery.worker.request")
_URL_QUERY = re.compile(r"(https?://[^\s'\"?#]+)[?#][^\s'\"]*")


def summarize(value: Any) -> str:
    """A short, URL-safe one-line summary of a task's return value or exception."""
    if isinstance(value, BaseException):
        inner = value.args[0] if len(value.args) == 1 and isinstance(value.args[0], dict) else None
        if inner is not None:
            return f"{type(value).__name__}({summarize(inner)})"
        return strip_url_queries(f"{type(value).__name__}: {value}")[:300]
    if isinstance(value, dict):
        fields = dict(value)
        request = fields.get("request")
        if isinstance(request, dict) and "job_id" not in fields:
            fields["job_id"] = request.get("job_id")
        kept = {k: fields[k] for k in SUMMARY_KEYS if fields.get(k) not in (None, "")}
        return " ".join(f"{k}={v}" for k, v in kept.items()) or "{…}"
    if isinstance(value, str):
        # Celery hands over the return value already repr'd (and cut at 1 KB): read the ids back.
        found = {k: m.group(1) for k in SUMMARY_KEYS if (m := re.search(rf"'{k}': '?([^',}}]+)", value))}
        if found:
            return " ".join(f"{k}={v}" for k, v in found.items())
    text = value if isinstance(value, str) else repr(value)
    return strip_url_queries(text)[:300]


def strip_url_queries(text: str) -> str:
    """``https://host/path?token=…`` → ``https://host/path?…``: query strings carry tokens."""
    return _URL_QUERY.sub(r"\1?…", text)


class ShortTaskLines(logging.Filter):
    """Shortens Celery's per-task INFO lines (see the module docstring); DEBUG passes untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return True
        if isinstance(record.args, dict):
            short = dict(record.args)
            for key in ("return_value", "exc"):
                if key in short:
                    short[key] = summarize(short[key])
            for key in ("args", "kwargs"):
                short.pop(key, None)
            record.args = short
        return True


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
    # On the loggers themselves, not on handlers: Celery replaces handlers when it sets up logging
    # (and pool processes inherit loggers), so a handler filter can miss lines.
    for name in TASK_LINE_LOGGERS:
        task_logger = logging.getLogger(name)
        if not any(isinstance(f, ShortTaskLines) for f in task_logger.filters):
            task_logger.addFilter(ShortTaskLines())
    if json_logs:
        signals.after_setup_logger.connect(_use_json, weak=False, dispatch_uid="lipsync-log-json")
        signals.after_setup_task_logger.connect(_use_json, weak=False, dispatch_uid="lipsync-log-json-task")
