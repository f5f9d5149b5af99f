"""The JSON contract of a job: what callers send, what travels between tasks, what callers get back.

Every model here is pydantic, serialised to plain JSON on the broker, and published as JSON Schema
(``lipsync-worker schema``), so producers and consumers in any language can use it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.callbacks.models import Callback, StageEvent
from worker.errors import RequestInvalid, describe_validation_error
from worker.gen.models import GenId, OutputResource, coerce_id
from worker.jobs.errors import FailureStatus
from worker.names import LipsyncModel

#: Version of the result/failure/event payloads; bumped on any incompatible change.
SCHEMA_VERSION = 1

#: A caller's job id. It becomes part of GEN's Idempotency-Key, a Redis key and a file name, so it
#: is restricted to characters that are safe in all three (the same set sync.so allows for keys).
JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._~-]{1,128}$")]

#: A caller's source URL (checked against the URL guard when the job is created).
SourceUrl = Annotated[str, StringConstraints(min_length=1, max_length=2048, strip_whitespace=True)]


class LipsyncRequest(BaseModel):
    """One lipsync job, as another service hands it to us (``lipsync.run``'s ``request``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    #: The caller's id for this job; generated when absent. Enqueuing the same id twice joins the job.
    job_id: JobId = Field(default_factory=lambda: uuid.uuid4().hex)
    sheet_id: GenId
    cell_id: GenId
    #: Present: the layer endpoint. Absent: the cell endpoint.
    layer_id: GenId | None = None
    #: Each source is a GEN content resource id or a URL (pipelines often hold their media elsewhere):
    #: ``vidsheet`` sends URLs to GEN as they are, ``autocontentengine`` refuses them (it takes resource
    #: ids only; worker.jobs.sources). One of the two per side.
    video_resource_id: GenId | None = None
    audio_resource_id: GenId | None = None
    video_url: SourceUrl | None = None
    audio_url: SourceUrl | None = None
    #: ``sync_so`` (higher quality, slower) or ``gen`` (faster). Absent: LIPSYNC_DEFAULT_MODEL.
    model: LipsyncModel | None = None
    callback: Callback | None = None
    #: Passed through untouched into the result, the failure and every event.
    metadata: dict[str, Any] = Field(default_factory=dict)

    _coerce_ids = field_validator(
        "sheet_id", "cell_id", "layer_id", "video_resource_id", "audio_resource_id", mode="before"
    )(classmethod(lambda cls, v: coerce_id(v)))

    @model_validator(mode="after")
    def _one_source_per_side(self) -> LipsyncRequest:
        problems = _source_problems(
            self.model_dump(include=set(_SOURCE_SIDES["video"] + _SOURCE_SIDES["audio"]))
        )
        if problems:
            raise ValueError("; ".join(f"{p['field']}: {p['message']}" for p in problems))
        return self

    @classmethod
    def parse(cls, data: Any) -> LipsyncRequest:
        """Validate raw JSON, turning pydantic's error into a :class:`RequestInvalid` naming fields."""
        if not isinstance(data, dict):
            raise RequestInvalid([{"field": "request", "message": "must be a JSON object"}])
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errors = describe_validation_error(exc)
            # A side with no source (or two) is named by its fields, not as the whole request.
            named = [e for e in errors if e["field"] != "request"]
            named += [p for p in _source_problems(data) if p not in named]
            raise RequestInvalid(named or errors) from None


_SOURCE_SIDES = {"video": ("video_resource_id", "video_url"), "audio": ("audio_resource_id", "audio_url")}


def _source_problems(data: dict[str, Any]) -> list[dict[str, str]]:
    """Each side needs a resource id or a URL, not both."""
    problems = []
    for side, (by_id, by_url) in _SOURCE_SIDES.items():
        given = [name for name in (by_id, by_url) if data.get(name) not in (None, "")]
        if not given:
            problems.append({"field": by_id, "message": f"Field required (or {by_url})"})
        elif len(given) == 2:
            problems.append({"field": by_url, "message": f"give the {side} as {by_id} or {by_url}, not both"})
    return problems


# --------------------------------------------------------------------------------------------
# What travels between the tasks of one job
# --------------------------------------------------------------------------------------------


class Job(BaseModel):
    """The state of one job, handed from task to task along the chain as JSON."""

    # Fields of the job's own state that this version does not know are dropped, not refused:
    # during a rolling upgrade a newer worker's message reaches an older one, which must go on
    # driving the job. The caller's request (LipsyncRequest) stays strict.
    model_config = ConfigDict(extra="ignore")

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
    #: When a poll last found the generation still running (epoch seconds): with the poll that
    #: finds it done, the interval its duration lies in (worker.jobs.durations).
    last_running_at: float | None = None
    #: Unreadable GEN answers seen so far; capped so schema drift cannot poll forever.
    bad_responses: int = 0
    #: Transient errors retried in the current step (reset when a step succeeds).
    step_retries: int = 0
    generation_completed_at: float | None = None
    output_resource: OutputResource | None = None
    execution_cost: float | None = None

    @field_validator("request", mode="before")
    @classmethod
    def _known_request_fields(cls, value: Any) -> Any:
        # The request was validated strictly where it entered (lipsync.run), by whichever worker
        # took it; read back from a message a newer worker wrote, it may carry fields this version
        # does not know (as nulls, mostly). What it needs is checked again by LipsyncRequest.
        if isinstance(value, dict):
            return {key: item for key, item in value.items() if key in LipsyncRequest.model_fields}
        return value

    @property
    def job_id(self) -> str:
        return self.request.job_id

    def for_message(self) -> dict[str, Any]:
        """The job as it travels in task messages (and so in Celery's results, which keep the
        arguments): without the request's callback. Its webhook URL can carry a receiver's token;
        the callback stays in the job record (:meth:`worker.jobs.records.JobStore.callback`)."""
        data = self.model_dump(mode="json")
        data["request"]["callback"] = None
        return data


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

    @classmethod
    def of(cls, job: Job | None, finished: float, *, fetch_seconds: float | None = None) -> Timings:
        """The timings of ``job`` (None: a request that never became a job) ending at ``finished``."""
        enqueued = job.enqueued_at if job else finished
        generation_seconds = None
        if job and job.submitted_at and job.generation_completed_at:
            generation_seconds = job.generation_completed_at - job.submitted_at
        return cls(
            enqueued_at=enqueued,
            submitted_at=job.submitted_at if job else None,
            generation_completed_at=job.generation_completed_at if job else None,
            finished_at=finished,
            total_seconds=max(0.0, finished - enqueued),
            generation_seconds=generation_seconds,
            fetch_seconds=fetch_seconds,
        )


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
    #: ``rejected`` (bad request, or GEN refused it), ``cancelled`` (cancelled through us),
    #: ``superseded`` (a card's automatic generation replaced by one for newer sources: docs/cards.md).
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
    #: For a cancelled job that had a generation on GEN: whether GEN confirmed our stop (its credits
    #: are refunded). False: it had already ended there, or the stop failed; the message says which.
    #: None: there was nothing to stop (or a failure other than a cancel).
    generation_stopped: bool | None = None
    #: For a ``superseded`` job: the job that replaced it (None: the sources went back to those of
    #: the current output, so nothing replaced it).
    superseded_by: str | None = None


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
