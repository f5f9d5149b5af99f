"""The error taxonomy, and the one function that decides whether an error is worth retrying.

Two families, kept apart on purpose (as replicate-python does with ReplicateError vs ModelError):

* ``GenAPIError`` and its subclasses: talking to GEN went wrong (HTTP status, transport, a body we
  cannot read). Whether to retry depends only on what went wrong: see :func:`is_retryable`.
* ``JobError`` and its subclasses: the job itself reached an end that is not a video (GEN failed or
  stopped the generation, the deadline passed, the output is unusable). These are terminal and each
  carries the ``status`` and ``error_code`` that end up in the failure JSON.

Nothing here imports Celery, so the GEN client and the storage layer stay usable on their own.
"""

from __future__ import annotations

from typing import Any, Literal

#: The statuses a job can end with when it produced no video (see worker.models.LipsyncFailure).
FailureStatus = Literal["failed", "stopped", "timeout", "rejected", "cancelled"]


class LipsyncError(Exception):
    """Base class of every error this package raises on purpose."""


# --------------------------------------------------------------------------------------------
# Bad input at the edge
# --------------------------------------------------------------------------------------------


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


class ConfigurationError(LipsyncError):
    """The worker is misconfigured (e.g. ``LIPSYNC_GEN_API_KEY`` unset). Never retried.

    The message names the setting; it never contains a secret's value.
    """


# --------------------------------------------------------------------------------------------
# Talking to GEN
# --------------------------------------------------------------------------------------------


class GenAPIError(LipsyncError):
    """GEN answered with an error, or could not be reached, or answered something unreadable.

    ``status_code`` is None for transport errors. ``error_code`` is GEN's machine code when GEN sent
    one (``{"error": ..., "error_code": ...}``). ``retry_after`` is the delay GEN asked for, in
    seconds, when it sent a ``Retry-After`` header.
    """

    #: Subclasses say whether trying the same request again can succeed.
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_code: str | None = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_code = error_code
        self.retry_after = retry_after
        self.endpoint = endpoint

    def __str__(self) -> str:
        where = f" [{self.endpoint}]" if self.endpoint else ""
        status = f"HTTP {self.status_code}" if self.status_code is not None else "transport"
        code = f" {self.error_code}" if self.error_code else ""
        return f"GEN {status}{code}{where}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments do not survive pickling by default.
        return (_rebuild_gen_error, (type(self), self.message, self.__dict__.copy()))


def _rebuild_gen_error(cls: type[GenAPIError], message: str, state: dict[str, Any]) -> GenAPIError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class GenTransportError(GenAPIError):
    """Connection refused or reset, DNS failure, connect or read timeout."""

    retryable = True


class GenTimeout(GenTransportError):
    """GEN did not answer within the (connect, read) timeout."""


class GenRateLimited(GenAPIError):
    """HTTP 429. Honour ``retry_after`` when GEN sends it."""

    retryable = True


class GenServerError(GenAPIError):
    """HTTP 5xx, or 408 Request Timeout."""

    retryable = True


class GenBadResponse(GenAPIError):
    """A 2xx whose body is not the JSON we expect (malformed, wrong types, missing fields).

    Retryable a bounded number of times: a proxy hiccup can return garbage once, but a schema that
    changed under us will not fix itself, so the poll task caps these separately.
    """

    retryable = True


class GenAuthError(GenAPIError):
    """HTTP 401 or 403: the API key is missing, wrong, or lacks access. Never retried."""


class GenNotFound(GenAPIError):
    """HTTP 404: the sheet, cell, layer or generation does not exist (or is not ours)."""


class GenRejected(GenAPIError):
    """HTTP 422 (validation_error, agent_not_found, credit errors) or another 4xx. Never retried."""


class GenNotStoppable(GenRejected):
    """``/stop`` answered 422 because the generation is already terminal: re-read its status."""


def is_retryable(exc: BaseException) -> bool:
    """The single retry decision for everything that talks to GEN or downloads outputs.

    408/429/5xx, transport errors, timeouts and unreadable bodies are retryable; 401/403/404/422 and
    every terminal job outcome are not. Unknown exception types are *not* retried: a bug should fail
    the job loudly rather than loop.
    """
    if isinstance(exc, GenAPIError | OutputError):
        return exc.retryable
    return False


def status_error_class(status_code: int) -> type[GenAPIError]:
    """Map an HTTP status from GEN to the error class that describes it."""
    if status_code in (401, 403):
        return GenAuthError
    if status_code == 404:
        return GenNotFound
    if status_code == 429:
        return GenRateLimited
    if status_code == 408 or status_code >= 500:
        return GenServerError
    return GenRejected


# --------------------------------------------------------------------------------------------
# Outputs (download and storage)
# --------------------------------------------------------------------------------------------


class OutputError(LipsyncError):
    """Fetching or storing the output video went wrong."""

    retryable: bool = False
    error_code: str = "output_error"


class OutputDownloadError(OutputError):
    """The download broke off (reset, short body, timeout, 5xx from the CDN). Retryable."""

    retryable = True
    error_code = "output_download_failed"


class StorageError(OutputError):
    """Publishing to the storage backend failed (unreachable, refused, upload broke off). Retryable."""

    retryable = True
    error_code = "storage_unavailable"


class OutputTooLarge(OutputError):
    """The output is bigger than ``LIPSYNC_MAX_OUTPUT_BYTES``."""

    error_code = "output_too_large"


class OutputInvalid(OutputError):
    """The output is not a video (wrong content type, empty, missing from the generation)."""

    error_code = "output_invalid"


class UnsafeURL(OutputError):
    """A URL points somewhere we refuse to connect to (not http(s), or a private address)."""

    error_code = "unsafe_url"


# --------------------------------------------------------------------------------------------
# Terminal job outcomes
# --------------------------------------------------------------------------------------------


class JobError(LipsyncError):
    """The job ended without a video. ``status`` and ``error_code`` go into the failure JSON."""

    status: FailureStatus = "failed"
    error_code: str = "job_failed"

    def __init__(self, message: str, *, generation_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.generation_id = generation_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_job_error, (type(self), self.message, self.__dict__.copy()))


def _rebuild_job_error(cls: type[JobError], message: str, state: dict[str, Any]) -> JobError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class GenerationFailed(JobError):
    """GEN reported ``failed``; the message is GEN's ``failed_reason``."""

    error_code = "generation_failed"


class GenerationStopped(JobError):
    """GEN reported ``stopped`` (someone stopped it outside this job)."""

    status = "stopped"
    error_code = "generation_stopped"


class UnknownGenerationStatus(JobError):
    """GEN reported a status we do not know. Failing loudly beats polling forever."""

    error_code = "unknown_generation_status"


class JobTimeout(JobError):
    """The job's wall-clock deadline passed before GEN finished."""

    status = "timeout"
    error_code = "timeout"


class LipsyncJobFailed(LipsyncError):
    """Raised by the last task of a failed job, so Celery marks it FAILURE and runs ``link_error``.

    Its only argument is the failure JSON (:class:`worker.models.LipsyncFailure`), so a caller that
    does not import this package still finds the whole failure in the task's ``exc_message``.
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
