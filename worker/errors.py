"""The errors a caller of this package meets, and the base every other error here derives from.

Each layer keeps its own family beside its code: talking to GEN (:mod:`worker.gen.errors`),
fetching and storing outputs (:mod:`worker.output.errors`), a job's terminal outcomes
(:mod:`worker.jobs.errors`), webhook attempts (:mod:`worker.callbacks.webhooks`). Every one of them
says, with its ``retryable`` attribute, whether trying again can help; :func:`worker.retry.decide`
is the one place that reads it.

Nothing here imports Celery.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class LipsyncError(Exception):
    """Base class of every error this package raises on purpose."""

    #: Whether the same attempt, made again later, can succeed (read by worker.retry.decide).
    retryable: bool = False


class RequestInvalid(LipsyncError, ValueError):
    """A lipsync request failed validation. ``errors`` lists ``{"field", "message"}`` pairs."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__(self._describe(errors))

    @staticmethod
    def _describe(errors: list[dict[str, str]]) -> str:
        parts = [f"{e['field']}: {e['message']}" for e in errors]
        return "invalid lipsync request: " + "; ".join(parts)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))


def describe_validation_error(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as ``{"field", "message"}``, without echoing the offending input.

    The input is left out on purpose: it can be large, and a secret pasted into the wrong field must
    not reach logs or callbacks through an error message.
    """
    errors = []
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "request"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        errors.append({"field": field, "message": message})
    return errors


class ConfigurationError(LipsyncError):
    """The worker is misconfigured (e.g. ``LIPSYNC_GEN_API_KEY`` unset). Never retried.

    The message names the setting; it never contains a secret's value.
    """


class LipsyncJobFailed(LipsyncError):
    """Raised by the last task of a failed job, so Celery marks it FAILURE and runs ``link_error``.

    Its only argument is the failure JSON (:class:`worker.jobs.models.LipsyncFailure`), so a caller
    that does not import this package still finds the whole failure in the task's ``exc_message``.
    """

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure)
        self.failure = failure

    def __str__(self) -> str:
        f = self.failure
        return f"lipsync job {f.get('job_id')} {f.get('status')} ({f.get('error_code')}): {f.get('message')}"


class StillRunning(LipsyncError):
    """Not an error: the reason a step is re-queued (GEN still working, a transient error, the rate
    limit). Celery puts it in the retry event, so monitors show the job's progress while it waits."""


def rebuild(cls: type[BaseException], message: str, state: dict[str, Any]) -> BaseException:
    """Unpickle an error whose constructor takes keyword-only arguments (they do not survive
    pickling by default); used by the ``__reduce__`` of the GEN and job error families."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc
