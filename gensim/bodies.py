"""Validation of the two lipsync ``generate`` bodies GEN has documented, into one normalised form.

Old dialect (``/v1/autocontentengine``): ``data = {"model": "sync_so"|"gen", "video_resource_id",
"audio_resource_id"}``. New dialect (``/v1/vidsheet``): ``data = {"talking_avatar_video_data":
{"video": {"value": URL}, "audio": {"value": URL}}, "lip_sync_model": "gen"|"sync.so", ...}``.
Both become a :class:`LipsyncInputs` whose model is spelled ``"sync_so"``/``"gen"``, and whose
:meth:`~LipsyncInputs.canonical` form is what Idempotency-Key reuse is compared on, so that
``5001`` and ``"5001"`` (or an omitted model and its default) count as the same request.

Pure functions: the caller passes in how to look a resource id up, and gets ``BodyInvalid`` back
for anything GEN would answer with 422 ``validation_error``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

Dialect = Literal["old", "new"]

#: Path prefixes, by the dialect each one was documented with.
PREFIX_DIALECT: dict[str, Dialect] = {"autocontentengine": "old", "vidsheet": "new"}

#: generation_type values accepted for lipsync: the canonical name and the Rails job it routes to.
LIPSYNC_TYPES = frozenset({"lipsync", "infinite_voice_lip_sync"})

OLD_MODELS = {"sync_so": "sync_so", "gen": "gen"}
NEW_MODELS = {"sync.so": "sync_so", "gen": "gen"}
#: The cell's ``lipSyncModel`` was documented in both spellings over time; accept either.
CELL_MODELS = {**OLD_MODELS, **NEW_MODELS}

_OLD_KEYS = frozenset({"model", "video_resource_id", "audio_resource_id"})
_NEW_KEYS = frozenset(
    {
        "talking_avatar_video_data",
        "lip_sync_model",
        "remove_background",
        "remove_silence",
        "voice_generation_data",
    }
)

OLD_RESOURCE_ERROR = "Missing or invalid video/audio resource"
NEW_INPUT_ERROR = "Missing video.value, or neither audio.value nor voice_generation_data supplied"

_UPLOAD_PATH = re.compile(r"/cdn/uploads/([^/]+)\.(?:mp4|mp3)$")


class BodyInvalid(ValueError):
    """The body is not a valid lipsync request; the message is GEN's user-facing ``error``."""


@dataclass(frozen=True)
class LipsyncInputs:
    dialect: Dialect
    #: "sync_so" or "gen", whatever the dialect spelled it.
    model: str
    #: Old dialect: the video content resource id. New dialect: the video URL.
    video: str
    #: Old dialect: the audio resource id. New dialect: the audio URL, or None with voice generation.
    audio: str | None
    #: The content resource the video refers to, when the simulator knows it (drives 5098/5099).
    video_resource_id: str | None
    options: Mapping[str, Any]

    def canonical(self) -> str:
        """A stable text form of the request, for comparing Idempotency-Key reuse."""
        return json.dumps(
            {
                "dialect": self.dialect,
                "model": self.model,
                "video": self.video,
                "audio": self.audio,
                "options": dict(self.options),
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def as_id(value: object) -> str | None:
    """A GEN id given as a JSON integer or a string, as a string; None for anything else."""
    if isinstance(value, bool):  # bools are ints to Python but never ids
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def is_http_url(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def resource_id_in_url(url: str) -> str | None:
    """The content resource id of one of the simulator's own upload URLs (any host), else None."""
    match = _UPLOAD_PATH.search(urlsplit(url).path)
    return match.group(1) if match else None


def parse_lipsync(
    body: object,
    *,
    prefix: str,
    strict_dialect: bool,
    cell_model: object,
    resource_kind: Callable[[str], str | None],
) -> LipsyncInputs:
    """Validate a generate body sent under ``/v1/{prefix}``; raise :class:`BodyInvalid` as GEN would.

    ``cell_model`` is the cell's ``additional_attributes.lipSyncModel`` (the old body's fallback when
    ``data.model`` is missing); ``resource_kind`` maps a resource id to "video", "audio" or None.
    """
    if not isinstance(body, dict):
        raise BodyInvalid("Request body must be a JSON object")
    generation_type = body.get("generation_type")
    if generation_type not in LIPSYNC_TYPES:
        raise BodyInvalid(
            f"Unsupported generation_type {generation_type!r}; this simulator supports 'lipsync'"
        )
    data = body.get("data")
    if not isinstance(data, dict):
        raise BodyInvalid("data must be an object")

    dialect = _dialect_of(data, prefix)
    if strict_dialect and dialect != PREFIX_DIALECT[prefix]:
        expected = (
            "talking_avatar_video_data" if prefix == "vidsheet" else "video_resource_id/audio_resource_id"
        )
        raise BodyInvalid(f"/v1/{prefix} expects the lipsync body with {expected}")
    if dialect == "old":
        return _parse_old(data, cell_model, resource_kind)
    return _parse_new(data, resource_kind)


def _dialect_of(data: Mapping[str, Any], prefix: str) -> Dialect:
    if data.keys() & _NEW_KEYS:
        return "new"
    if data.keys() & _OLD_KEYS:
        return "old"
    # Nothing recognisable: judge it by the dialect of the path, so the error message fits.
    return PREFIX_DIALECT[prefix]


def _parse_old(
    data: Mapping[str, Any], cell_model: object, resource_kind: Callable[[str], str | None]
) -> LipsyncInputs:
    video = as_id(data.get("video_resource_id"))
    audio = as_id(data.get("audio_resource_id"))
    if video is None or audio is None or resource_kind(video) != "video" or resource_kind(audio) != "audio":
        raise BodyInvalid(OLD_RESOURCE_ERROR)
    model = data.get("model")
    if model is None:
        if not isinstance(cell_model, str) or cell_model not in CELL_MODELS:
            raise BodyInvalid('Missing data.model ("sync_so" or "gen") and the cell has no lipSyncModel')
        normalised = CELL_MODELS[cell_model]
    elif isinstance(model, str) and model in OLD_MODELS:
        normalised = OLD_MODELS[model]
    else:
        raise BodyInvalid(f'Invalid data.model {model!r}; expected "sync_so" or "gen"')
    return LipsyncInputs("old", normalised, video, audio, video, {})


def _parse_new(data: Mapping[str, Any], resource_kind: Callable[[str], str | None]) -> LipsyncInputs:  # noqa: C901
    unknown = sorted(set(data) - _NEW_KEYS)
    if unknown:
        raise BodyInvalid(f"Unknown data fields {unknown}; no other top-level fields are accepted")
    tav = data.get("talking_avatar_video_data")
    if not isinstance(tav, dict):
        raise BodyInvalid(NEW_INPUT_ERROR)
    video_obj = tav.get("video")
    video = video_obj.get("value") if isinstance(video_obj, dict) else None
    if video is None:
        raise BodyInvalid(NEW_INPUT_ERROR)
    if not is_http_url(video):
        raise BodyInvalid("talking_avatar_video_data.video.value must be an http(s) URL")
    audio_obj = tav.get("audio")
    audio = audio_obj.get("value") if isinstance(audio_obj, dict) else None
    voice = data.get("voice_generation_data")
    if voice is not None and not isinstance(voice, dict):
        raise BodyInvalid("voice_generation_data must be an object")
    if audio is None and voice is None:
        raise BodyInvalid(NEW_INPUT_ERROR)
    if audio is not None and voice is not None:
        raise BodyInvalid("Supply exactly one of audio.value or voice_generation_data, not both")
    if audio is not None and not is_http_url(audio):
        raise BodyInvalid("talking_avatar_video_data.audio.value must be an http(s) URL")
    model = data.get("lip_sync_model", "gen")
    if not isinstance(model, str) or model not in NEW_MODELS:
        raise BodyInvalid(f'Invalid lip_sync_model {model!r}; expected "gen" or "sync.so"')
    options: dict[str, Any] = {}
    for flag in ("remove_background", "remove_silence"):
        if flag in data:
            if not isinstance(data[flag], bool):
                raise BodyInvalid(f"{flag} must be a boolean")
            options[flag] = data[flag]
    if voice is not None:
        options["voice_generation_data"] = voice
    video_id = resource_id_in_url(video)
    if video_id is not None and resource_kind(video_id) != "video":
        video_id = None
    return LipsyncInputs("new", NEW_MODELS[model], video, audio, video_id, options)
