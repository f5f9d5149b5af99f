"""The JSON contract: what callers send, what travels between tasks, what callers get back.

Every model here is pydantic, serialised to plain JSON on the broker, and published as JSON Schema
(``lipsync-worker schema``), so producers and consumers in any language can use it.
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.errors import FailureStatus, RequestInvalid

#: Version of the result/failure/event payloads; bumped on any incompatible change.
SCHEMA_VERSION = 1

#: The models GEN's Lipsync card offers, in this worker's spelling (GEN's older dialect).
LipsyncModel = Literal["sync_so", "gen"]

#: A caller's job id. It becomes part of GEN's Idempotency-Key, a Redis key and a file name, so it
#: is restricted to characters that are safe in all three (the same set sync.so allows for keys).
JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._~-]{1,128}$")]

#: A GEN id (sheet, cell, layer, content resource). GEN's docs show integers, its OpenAPI strings;
#: we accept both and keep them as strings. They are put into URL paths, hence the character set.
_GEN_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
GenId = Annotated[str, StringConstraints(pattern=_GEN_ID_PATTERN)]


def coerce_id(value: Any) -> Any:
    """Accept integer ids as GEN's docs show them; refuse booleans, which are ints to Python."""
    if isinstance(value, bool):
        raise ValueError("must be a string or an integer id, not a boolean")
    if isinstance(value, int):
        return str(value)
    return value


class StageEvent(enum.StrEnum):
    """Stage events a caller may subscribe to, in the order they happen."""

    #: GEN accepted the generation; the event carries its ``generation_id``.
    SUBMITTED = "submitted"
    #: GEN reported ``completed``; the event carries GEN's output URL.
    GENERATION_COMPLETED = "generation_completed"
    #: The video is in our storage; the event carries where.
    OUTPUT_FETCHED = "output_fetched"


class Callback(BaseModel):
    """Where the outcome goes: a Celery task on a queue, a webhook, or both."""

    model_config = ConfigDict(extra="forbid")

    #: Name of a Celery task to send the result or failure JSON to, as its only positional argument.
    task: str | None = Field(default=None, min_length=1, max_length=200)
    #: Queue for ``task``; None means the task's default routing.
    queue: str | None = Field(default=None, min_length=1, max_length=200)
    #: URL that receives a signed JSON POST (Standard Webhooks headers).
    webhook_url: AnyHttpUrl | None = None
    #: Stage events to deliver as well, besides the final outcome.
    events: list[StageEvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _needs_a_target(self) -> Callback:
        if self.task is None and self.webhook_url is None:
            raise ValueError("callback needs 'task' and/or 'webhook_url'")
        if self.queue is not None and self.task is None:
            raise ValueError("callback 'queue' is only meaningful with 'task'")
        return self


class LipsyncRequest(BaseModel):
    """One lipsync job, as another service hands it to us (``lipsync.run``'s ``request``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    #: The caller's id for this job; generated when absent. Enqueuing the same id twice joins the job.
    job_id: JobId = Field(default_factory=lambda: uuid.uuid4().hex)
    sheet_id: GenId
    cell_id: GenId
    #: Present: the layer endpoint. Absent: the cell endpoint.
    layer_id: GenId | None = None
    video_resource_id: GenId
    audio_resource_id: GenId
    #: ``sync_so`` (higher quality, slower) or ``gen`` (faster). Absent: LIPSYNC_DEFAULT_MODEL.
    model: LipsyncModel | None = None
    callback: Callback | None = None
    #: Passed through untouched into the result, the failure and every event.
    metadata: dict[str, Any] = Field(default_factory=dict)

    _coerce_ids = field_validator(
        "sheet_id", "cell_id", "layer_id", "video_resource_id", "audio_resource_id", mode="before"
    )(classmethod(lambda cls, v: coerce_id(v)))

    @classmethod
    def parse(cls, data: Any) -> LipsyncRequest:
        """Validate raw JSON, turning pydantic's error into a :class:`RequestInvalid` naming fields."""
        if not isinstance(data, dict):
            raise RequestInvalid([{"field": "request", "message": "must be a JSON object"}])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RequestInvalid(describe_validation_error(exc)) from None


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


# --------------------------------------------------------------------------------------------
# GEN's objects, as much of them as we read
# --------------------------------------------------------------------------------------------


class GenerationStatus(enum.StrEnum):
    """GEN's generation statuses (``GET /v1/generations/{id}``)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


TERMINAL_STATUSES = frozenset({GenerationStatus.COMPLETED, GenerationStatus.FAILED, GenerationStatus.STOPPED})
RUNNING_STATUSES = frozenset({GenerationStatus.PENDING, GenerationStatus.PROCESSING})


class OutputResource(BaseModel):
    """One entry of a generation's ``output_resources``."""

    model_config = ConfigDict(extra="ignore")

    id: GenId | None = None
    url: str
    thumbnail_url: str | None = None
    object_type: str | None = None
    type: str | None = None

    _coerce = field_validator("id", mode="before")(classmethod(lambda cls, v: coerce_id(v)))


class Generation(BaseModel):
    """A generation as ``GET /v1/generations/{id}`` returns it.

    ``status`` stays a plain string so that an unknown status parses and can be reported, instead of
    being lost in a validation error.
    """

    model_config = ConfigDict(extra="ignore")

    id: GenId
    status: str
    user_job_type: str | None = None
    failed_reason: str | None = None
    output_resources: list[OutputResource] = Field(default_factory=list)
    execution_cost: float | None = None

    _coerce = field_validator("id", mode="before")(classmethod(lambda cls, v: coerce_id(v)))

    @field_validator("execution_cost", mode="before")
    @classmethod
    def _cost(cls, value: Any) -> Any:
        # GEN's docs show a number, its OpenAPI a nullable string.
        if isinstance(value, str):
            return float(value) if value.strip() else None
        return value


# --------------------------------------------------------------------------------------------
# What travels between the tasks of one job
# --------------------------------------------------------------------------------------------


class Job(BaseModel):
    """The state of one job, handed from task to task along the chain as JSON."""

    model_config = ConfigDict(extra="forbid")

    request: LipsyncRequest
    #: The model actually used (the request's, or the configured default).
    model: LipsyncModel
    #: Celery id of the caller's ``lipsync.run`` task; progress states are reported under it.
    task_id: str | None = None
    #: Drive token: messages carrying an older token than the job record are stale and do nothing.
    drive: int = 1
    enqueued_at: float = Field(default_factory=time.time)
    #: Wall-clock deadline (epoch seconds); past it the poll stops the generation and fails.
    deadline_at: float
    generation_id: str | None = None
    submitted_at: float | None = None
    gen_status: str | None = None
    polls: int = 0
    #: Unreadable GEN answers seen so far; capped so schema drift cannot poll forever.
    bad_responses: int = 0
    #: Transient errors retried in the current step (reset when a step succeeds).
    step_retries: int = 0
    generation_completed_at: float | None = None
    output_resource: OutputResource | None = None
    execution_cost: float | None = None

    @property
    def job_id(self) -> str:
        return self.request.job_id


# --------------------------------------------------------------------------------------------
# What callers get back
# --------------------------------------------------------------------------------------------


class StoredOutput(BaseModel):
    """Where the lip-synced video is now, and what GEN said about it."""

    #: Local path, for the local storage backend.
    path: str | None = None
    #: Where the video is, as a URI (``file://...`` or ``s3://bucket/key``).
    uri: str
    size_bytes: int
    sha256: str
    content_type: str
    #: GEN's CDN URL of the output.
    url: str
    thumbnail_url: str | None = None
    #: GEN's content resource id of the output.
    id: str | None = None


class Timings(BaseModel):
    """Epoch-second timestamps of each stage, and the durations that matter."""

    enqueued_at: float
    submitted_at: float | None = None
    generation_completed_at: float | None = None
    finished_at: float
    #: From enqueue to the end (result or failure).
    total_seconds: float
    #: From GEN accepting the generation to GEN reporting completion.
    generation_seconds: float | None = None
    #: Downloading and storing the output.
    fetch_seconds: float | None = None


class LipsyncResult(BaseModel):
    """The outcome of a completed job: ``lipsync.run``'s result and the success callback's payload."""

    schema_version: int = SCHEMA_VERSION
    type: Literal["lipsync.result"] = "lipsync.result"
    job_id: str
    generation_id: str
    status: Literal["completed"] = "completed"
    model: LipsyncModel
    output: StoredOutput
    execution_cost: float | None = None
    polls: int
    timings: Timings
    metadata: dict[str, Any] = Field(default_factory=dict)


class LipsyncFailure(BaseModel):
    """The outcome of a job that ended without a video: the failure callback's payload."""

    schema_version: int = SCHEMA_VERSION
    type: Literal["lipsync.failure"] = "lipsync.failure"
    job_id: str
    generation_id: str | None = None
    #: ``failed`` (GEN failed it, or an error), ``stopped`` (stopped on GEN), ``timeout`` (deadline),
    #: ``rejected`` (bad request, or GEN refused it), ``cancelled`` (cancelled through us).
    status: FailureStatus
    #: Machine-readable reason, e.g. ``generation_failed``, ``validation_error``, ``gen_not_found``.
    error_code: str
    #: Human-readable reason; for a failed generation this is GEN's ``failed_reason``.
    message: str
    #: Per-field problems, for ``validation_error``.
    errors: list[dict[str, str]] | None = None
    model: LipsyncModel | None = None
    timings: Timings | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class StageEventPayload(BaseModel):
    """A stage event sent to subscribers (``callback.events``)."""

    schema_version: int = SCHEMA_VERSION
    type: Literal["lipsync.event"] = "lipsync.event"
    event: StageEvent
    job_id: str
    generation_id: str | None = None
    at: float
    #: Event-specific details: GEN's status and output URL, or the stored output.
    data: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


Outcome = LipsyncResult | LipsyncFailure
