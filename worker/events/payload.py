"""Reading GEN's events: which generations, cells and layers an event names, whatever its shape.

GEN documents that it POSTs "when generations complete, rows change, or other events occur", but
not the body: no schema, no event names (see gen-api.md §3.10). So nothing here expects one. The
JSON document is walked, bounded, and every value that GEN's vocabulary would use for an id is
collected by kind:

* a key naming the id: ``generation_id``, ``user_job_id``, ``job_id``, ``cell_id``,
  ``spreadsheet_cell_id``, ``layer_id``, ``video_layer_id``, ``sheet_id``, ``spreadsheet_id``... in any
  spelling (``generationId``, ``Generation-ID``);
* the ``id`` of an object under a key naming the kind (``"generation": {"id": …}``,
  ``"user_jobs": [{"id": …}]``, ``"cell": {…}``, ``"video_layers": […]``), or of an object that looks
  like a generation itself (an ``id`` beside ``status``, ``user_job_type``, ``output_resources``...:
  the body may be the generation object, as ``GET /v1/generations/{id}`` returns it);
* API paths in strings: ``…/generations/9001``, ``…/cells/3000``, ``…/layers/4000``.

Reading too much is cheap (an id that names none of our jobs matches nothing); reading too little
costs only the early poll. Ids are kept as text (GEN sends integers or numeric strings), and only if
they look like ids. The walk is bounded in depth, in nodes and in ids per kind, so a hostile body
costs little. :func:`shape` describes a body without its values, for logs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["generation", "cell", "layer", "sheet"]

#: Most nested levels walked, values visited, and ids kept per kind.
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_IDS = 32
#: Longest string searched for API paths.
MAX_PATH_TEXT = 2048

#: Keys (normalised: lower case, letters and digits only) whose scalar value is an id of a kind.
_ID_KEYS: dict[str, Kind] = {
    "generationid": "generation",
    "userjobid": "generation",
    "jobid": "generation",
    "generation": "generation",
    "userjob": "generation",
    "cellid": "cell",
    "spreadsheetcellid": "cell",
    "cell": "cell",
    "layerid": "layer",
    "videolayerid": "layer",
    "layer": "layer",
    "sheetid": "sheet",
    "spreadsheetid": "sheet",
    "vidsheetid": "sheet",
    "engineid": "sheet",
    "autocontentengineid": "sheet",
    "sheet": "sheet",
    "spreadsheet": "sheet",
}
#: Keys whose object (or list of objects) is a thing of a kind: its ``id`` is that kind's id.
_CONTAINER_KEYS: dict[str, Kind] = {
    "generation": "generation",
    "generations": "generation",
    "userjob": "generation",
    "userjobs": "generation",
    "defaultuserjob": "generation",
    "job": "generation",
    "cell": "cell",
    "cells": "cell",
    "spreadsheetcell": "cell",
    "layer": "layer",
    "layers": "layer",
    "videolayer": "layer",
    "videolayers": "layer",
    "sheet": "sheet",
    "spreadsheet": "sheet",
    "vidsheet": "sheet",
    "engine": "sheet",
}
#: Fields of GEN's generation object (§4): an object with an ``id`` and one of these is a generation.
_GENERATION_FIELDS = frozenset(
    {"status", "userjobtype", "outputresources", "failedreason", "executioncost", "generationtype"}
)
_PATHS: tuple[tuple[re.Pattern[str], Kind], ...] = (
    (re.compile(r"/generations/([A-Za-z0-9_-]{1,64})"), "generation"),
    (re.compile(r"/cells/([A-Za-z0-9_-]{1,64})"), "cell"),
    (re.compile(r"/layers/([A-Za-z0-9_-]{1,64})"), "layer"),
    (re.compile(r"/(?:vidsheet|autocontentengine)/([A-Za-z0-9_-]{1,64})"), "sheet"),
)
_ID_TEXT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass
class EventIds:
    """The ids an event names, by kind, in the order first seen, each once (at most MAX_IDS)."""

    generation: list[str] = field(default_factory=list)
    cell: list[str] = field(default_factory=list)
    layer: list[str] = field(default_factory=list)
    sheet: list[str] = field(default_factory=list)

    def add(self, kind: Kind, value: Any) -> None:
        text = _id_text(value)
        found: list[str] = getattr(self, kind)
        if text is not None and text not in found and len(found) < MAX_IDS:
            found.append(text)

    def names_anything(self) -> bool:
        """Whether it names a generation, a cell or a layer (a sheet alone names no job's target)."""
        return bool(self.generation or self.cell or self.layer)


class Unreadable(ValueError):
    """The body is not JSON (or nests deeper than the parser goes)."""


def parse(body: bytes) -> Any:
    """The JSON document in ``body``. Raises :class:`Unreadable`."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, undecodable bytes, deep nesting
        raise Unreadable(type(exc).__name__) from None


def read_ids(document: Any) -> EventIds:
    """Every generation, cell, layer and sheet id ``document`` names (see the module docstring)."""
    ids = EventIds()
    for kind, value in _walk(document):
        ids.add(kind, value)
    return ids


def _walk(document: Any) -> Iterator[tuple[Kind, Any]]:
    """(kind, id value) pairs, depth first, within the bounds. Iterative: no recursion to exhaust."""
    # Each entry: (value, the kind its enclosing key said it is (None: unknown), depth).
    stack: list[tuple[Any, Kind | None, int]] = [(document, None, 0)]
    visited = 0
    while stack and visited < MAX_NODES:
        value, kind, depth = stack.pop()
        visited += 1
        if isinstance(value, dict):
            yield from _read_object(value, kind)
            if depth < MAX_DEPTH:
                for key, child in reversed(list(value.items())):
                    if isinstance(child, dict | list):
                        stack.append((child, _CONTAINER_KEYS.get(_normal(key)), depth + 1))
        elif isinstance(value, list):
            if depth < MAX_DEPTH:
                # A list keeps the kind its key gave it: "user_jobs": [{"id": ...}, ...].
                stack.extend((child, kind, depth + 1) for child in reversed(value))
        elif isinstance(value, str):
            yield from _read_paths(value)


def _read_object(obj: dict[Any, Any], kind: Kind | None) -> Iterator[tuple[Kind, Any]]:
    normal = {_normal(key): child for key, child in obj.items()}
    if "id" in normal:
        if kind is not None:
            yield kind, normal["id"]
        elif _GENERATION_FIELDS & normal.keys():
            yield "generation", normal["id"]
    for key, child in normal.items():
        named = _ID_KEYS.get(key)
        if named is not None and not isinstance(child, dict | list):
            yield named, child
        elif isinstance(child, str):
            yield from _read_paths(child)


def _read_paths(text: str) -> Iterator[tuple[Kind, Any]]:
    if "/" not in text:
        return
    head = text[:MAX_PATH_TEXT]
    for pattern, kind in _PATHS:
        for match in pattern.finditer(head):
            yield kind, match.group(1)


def _normal(key: Any) -> str:
    return "".join(ch for ch in str(key)[:64].lower() if ch.isalnum())


def _id_text(value: Any) -> str | None:
    """An id as text, or None for what cannot be one (booleans, fractions, free text, huge values)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if 0 <= value < 10**18 else None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and 0 <= value < 1e15 else None
    if isinstance(value, str):
        text = value.strip()
        return text if _ID_TEXT.fullmatch(text) else None
    return None


# --------------------------------------------------------------------------------------------
# Describing a body without its values (for the log of one the receiver could not read)
# --------------------------------------------------------------------------------------------

#: Longest description logged.
MAX_SHAPE = 300
_SAFE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,40}/[a-z0-9!#$&^_.+-]{1,40}")


def shape(document: Any, depth: int = 4) -> str:
    """The structure of a JSON document with every value replaced by its type:
    ``{event: str, data: {id: int, status: str}}``. Keys that do not look like field names (they
    could be data) show as ``<key>``; lists as ``[n x first item]``. Truncated to MAX_SHAPE."""
    text = _shape(document, depth)
    return text if len(text) <= MAX_SHAPE else text[: MAX_SHAPE - 1] + "…"


def _shape(value: Any, depth: int) -> str:
    if isinstance(value, dict):
        if depth <= 0:
            return "{…}"
        items = list(value.items())
        parts = [f"{_key(k)}: {_shape(v, depth - 1)}" for k, v in items[:12]]
        if len(items) > 12:
            parts.append(f"… {len(items) - 12} more")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        return f"[{len(value)} x {_shape(value[0], depth - 1) if depth > 0 else '…'}]"
    if value is None:
        return "null"
    return type(value).__name__


def _key(key: Any) -> str:
    text = str(key)
    return text if _SAFE_KEY.fullmatch(text) else "<key>"


def describe_unparsed(body: bytes, content_type: str | None) -> str:
    """What is logged of a body that is not JSON: its media type (without parameters, which could
    carry anything) and its size, no bytes of it."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if not _MEDIA_TYPE.fullmatch(media_type):
        media_type = "no content type" if not media_type else "unusual content type"
    return f"not JSON ({media_type}, {len(body)} bytes)"
