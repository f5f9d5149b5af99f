"""The JSON contract of the card settings and of a source change (published as JSON Schema)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.callbacks.models import Callback
from worker.errors import RequestInvalid, describe_validation_error
from worker.gen.models import GenId, coerce_id
from worker.names import LipsyncModel

#: Longest debounce window a card may ask for: a target whose sources settle after an hour is not
#: being edited, it is being forgotten.
MAX_DEBOUNCE_SECONDS = 3600.0


_M = TypeVar("_M", bound=BaseModel)


def _parse(model: type[_M], data: Any, what: str) -> _M:
    """Validate raw JSON, turning pydantic's error into a :class:`RequestInvalid` naming fields."""
    if not isinstance(data, dict):
        raise RequestInvalid([{"field": what, "message": "must be a JSON object"}])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestInvalid(describe_validation_error(exc)) from None


class Target(BaseModel):
    """A Lipsync card's place on GEN: a cell, or a layer of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sheet_id: GenId
    cell_id: GenId
    layer_id: GenId | None = None

    _coerce_ids = field_validator("sheet_id", "cell_id", "layer_id", mode="before")(
        classmethod(lambda cls, v: coerce_id(v))
    )

    @property
    def key(self) -> str:
        """The target's name in Redis and in job ids: ``sheet.cell`` or ``sheet.cell.layer`` (GEN ids
        never contain a dot, so the name cannot be read two ways)."""
        parts = [self.sheet_id, self.cell_id] + ([self.layer_id] if self.layer_id is not None else [])
        return ".".join(parts)

    @classmethod
    def from_key(cls, key: str) -> Target:
        parts = key.split(".")
        if len(parts) not in (2, 3):
            raise ValueError(f"not a target name: {key!r}")
        return cls(sheet_id=parts[0], cell_id=parts[1], layer_id=parts[2] if len(parts) == 3 else None)


class Card(Target):
    """The Lipsync card's own settings for one target (``lipsync.configure_card``'s ``card``).

    GEN's own spellings ``lipSyncModel``, ``autoGenerate`` and ``debounceSeconds`` are accepted too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    #: The model of this target's jobs that name none (then LIPSYNC_DEFAULT_MODEL).
    lip_sync_model: LipsyncModel | None = Field(
        default=None, validation_alias=AliasChoices("lip_sync_model", "lipSyncModel")
    )
    #: Generate for the latest sources when they change (after the debounce window).
    auto_generate: bool = Field(default=False, validation_alias=AliasChoices("auto_generate", "autoGenerate"))
    #: Seconds without a further change before a generation starts.
    debounce_seconds: float = Field(
        default=5.0,
        ge=0.0,
        le=MAX_DEBOUNCE_SECONDS,
        validation_alias=AliasChoices("debounce_seconds", "debounceSeconds"),
    )
    #: Where the outcomes of this target's automatic generations go.
    callback: Callback | None = None
    #: Passed through untouched into the outcomes of this target's automatic generations.
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("lip_sync_model", mode="before")
    @classmethod
    def _gen_spelling(cls, value: Any) -> Any:
        # GEN's newer card spells the Sync model "sync.so".
        return "sync_so" if value == "sync.so" else value

    @property
    def target(self) -> Target:
        return Target(sheet_id=self.sheet_id, cell_id=self.cell_id, layer_id=self.layer_id)

    @classmethod
    def parse(cls, data: Any) -> Card:
        """Raises :class:`RequestInvalid` naming the fields (e.g. an unknown model)."""
        return _parse(cls, data, "card")


class Sources(BaseModel):
    """A target's source video and audio: each a GEN content resource id or a URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    video_resource_id: GenId | None = None
    audio_resource_id: GenId | None = None
    video_url: str | None = Field(default=None, min_length=1, max_length=2048)
    audio_url: str | None = Field(default=None, min_length=1, max_length=2048)

    _coerce_ids = field_validator("video_resource_id", "audio_resource_id", mode="before")(
        classmethod(lambda cls, v: coerce_id(v))
    )

    @property
    def video(self) -> str | None:
        return self.video_resource_id or self.video_url

    @property
    def audio(self) -> str | None:
        return self.audio_resource_id or self.audio_url

    @property
    def complete(self) -> bool:
        return self.video is not None and self.audio is not None

    def values(self) -> list[str]:
        """Every resource id and URL named here (what the loop guard compares)."""
        return [
            v for v in (self.video_resource_id, self.audio_resource_id, self.video_url, self.audio_url) if v
        ]


class SourceChange(Target):
    """A target's sources changed (``lipsync.source_changed``'s ``change``). A side that is absent
    keeps its last known value; a side given by resource id replaces a URL and the other way round."""

    video_resource_id: GenId | None = None
    audio_resource_id: GenId | None = None
    video_url: str | None = Field(default=None, min_length=1, max_length=2048)
    audio_url: str | None = Field(default=None, min_length=1, max_length=2048)

    _coerce_sources = field_validator("video_resource_id", "audio_resource_id", mode="before")(
        classmethod(lambda cls, v: coerce_id(v))
    )

    @model_validator(mode="after")
    def _one_side_at_least(self) -> SourceChange:
        if self.video_resource_id and self.video_url:
            raise ValueError("give video_resource_id or video_url, not both")
        if self.audio_resource_id and self.audio_url:
            raise ValueError("give audio_resource_id or audio_url, not both")
        if not (self.video_resource_id or self.video_url or self.audio_resource_id or self.audio_url):
            raise ValueError(
                "a change needs video_resource_id, video_url, audio_resource_id or audio_url (at least one)"
            )
        return self

    @property
    def target(self) -> Target:
        return Target(sheet_id=self.sheet_id, cell_id=self.cell_id, layer_id=self.layer_id)

    @property
    def sources(self) -> Sources:
        """Only the sides this change names."""
        return Sources(
            video_resource_id=self.video_resource_id,
            audio_resource_id=self.audio_resource_id,
            video_url=self.video_url,
            audio_url=self.audio_url,
        )

    @classmethod
    def parse(cls, data: Any) -> SourceChange:
        """Raises :class:`RequestInvalid` naming the fields (e.g. a change with neither side)."""
        if isinstance(data, dict) and not any(data.get(name) not in (None, "") for name in SOURCE_FIELDS):
            message = "a change needs at least one side: a video or an audio resource id or URL"
            raise RequestInvalid([{"field": name, "message": message} for name in SOURCE_FIELDS])
        return _parse(cls, data, "change")


#: The fields of a change that name a source.
SOURCE_FIELDS = ("video_resource_id", "video_url", "audio_resource_id", "audio_url")
