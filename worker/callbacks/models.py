"""Where a job's outcome and stage events go: a Celery task by name, a webhook, or both."""

from __future__ import annotations

import enum

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator


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
