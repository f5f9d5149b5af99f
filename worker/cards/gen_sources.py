"""A Lipsync card's sources as GEN's cell or layer shows them (pure: no GEN, no Redis).

GEN documents that a card's configuration lives in the cell's (or layer's) ``additional_attributes``
but not which fields hold a lipsync card's sources. This reads the newer lipsync body's shape,
``talking_avatar_video_data.{video,audio}.value`` (URLs), and the older body's
``video_resource_id`` / ``audio_resource_id``; anything else reads as no sources (None).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from worker.cards.models import Sources


def sources_in(document: dict[str, Any]) -> Sources | None:
    """The sources a cell or layer (GEN's ``GET`` answer) names, or None when it names none."""
    attributes = document.get("additional_attributes")
    if not isinstance(attributes, dict):
        return None
    found: dict[str, Any] = {}
    data = attributes.get("talking_avatar_video_data")
    if isinstance(data, dict):
        for side in ("video", "audio"):
            value = data.get(side)
            url = value.get("value") if isinstance(value, dict) else None
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                found[f"{side}_url"] = url
    for side in ("video", "audio"):
        resource_id = attributes.get(f"{side}_resource_id")
        if (
            f"{side}_url" not in found
            and isinstance(resource_id, str | int)
            and not isinstance(resource_id, bool)
        ):
            found[f"{side}_resource_id"] = resource_id
    if not found:
        return None
    try:
        return Sources.model_validate(found)
    except ValidationError:
        return None
