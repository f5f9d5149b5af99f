"""GEN's objects, as much of them as a lipsync job reads, and GEN's ids (model and dialect names are
in :mod:`worker.names`)."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

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


class GenerationAccepted(BaseModel):
    """GEN's answer to ``POST …/generate``: ``{"generation_id": 9001, "status": "pending"}``."""

    model_config = ConfigDict(extra="ignore")

    generation_id: GenId
    status: str

    _coerce = field_validator("generation_id", mode="before")(classmethod(lambda cls, v: coerce_id(v)))


class ContentResource(BaseModel):
    """A file in the agent's workspace (``GET /v1/content_resources/{id}``'s ``content_resource``)."""

    model_config = ConfigDict(extra="ignore")

    id: GenId
    url: str = Field(min_length=1)
    thumbnail_url: str | None = None
    file_name: str | None = None
    content_type: str | None = None

    _coerce = field_validator("id", mode="before")(classmethod(lambda cls, v: coerce_id(v)))
