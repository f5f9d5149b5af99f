"""A job's ends without a video. Each carries the ``status`` and ``error_code`` of its failure JSON."""

from __future__ import annotations

from typing import Any, Literal

from worker.errors import LipsyncError, rebuild

#: The statuses a job can end with when it produced no video (see worker.jobs.models.LipsyncFailure).
FailureStatus = Literal["failed", "stopped", "timeout", "rejected", "cancelled", "superseded"]


class JobError(LipsyncError):
    """The job ended without a video. Terminal: never retried."""

    status: FailureStatus = "failed"
    error_code: str = "job_failed"
    #: The message when a step's retries are spent and this error ends the job.
    gave_up: str = "gave up after {attempts} attempts: {cause}"

    def __init__(self, message: str, *, generation_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.generation_id = generation_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (type(self), self.message, self.__dict__.copy()))


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


class BadUpstream(JobError):
    """GEN kept answering with bodies we cannot read (``LIPSYNC_MAX_BAD_RESPONSES``)."""

    error_code = "bad_upstream_response"
    gave_up = "GEN answered {attempts} times with unreadable bodies: {cause}"


class UpstreamUnavailable(JobError):
    """GEN (or the output's host) kept failing with transient errors until we gave up."""

    error_code = "gen_unavailable"
