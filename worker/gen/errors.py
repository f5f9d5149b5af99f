"""What can go wrong talking to GEN: one class per kind of answer, each saying whether retrying helps.

:func:`status_error_class` is the one mapping from an HTTP status to a class; the client raises
exactly one of these per failed call and never retries by itself (see :mod:`worker.gen.client`).
"""

from __future__ import annotations

from typing import Any

from worker.errors import LipsyncError, rebuild


class GenAPIError(LipsyncError):
    """GEN answered with an error, or could not be reached, or answered something unreadable.

    ``status_code`` is None for transport errors. ``error_code`` is GEN's machine code when GEN sent
    one (``{"error": ..., "error_code": ...}``). ``retry_after`` is the delay GEN asked for, in
    seconds, when it sent a ``Retry-After`` header.
    """

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
        return (rebuild, (type(self), self.message, self.__dict__.copy()))


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
    changed under us will not fix itself, so the poll caps these separately
    (``LIPSYNC_MAX_BAD_RESPONSES``).
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
