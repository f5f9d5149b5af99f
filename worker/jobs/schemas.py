"""JSON Schemas of the public payloads, for producers and consumers in any language.

``lipsync-worker schema --out docs/schemas`` writes them; a test checks the committed copies match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from worker.batches.models import BatchFailure, BatchRequest, BatchResult
from worker.cards.models import Card, SourceChange
from worker.jobs.models import LipsyncFailure, LipsyncRequest, LipsyncResult, StageEventPayload

PUBLISHED: dict[str, type[BaseModel]] = {
    "lipsync-request": LipsyncRequest,
    "lipsync-result": LipsyncResult,
    "lipsync-failure": LipsyncFailure,
    "lipsync-event": StageEventPayload,
    # A batch (lipsync.run_batch's batch) and its one callback: the result, or the refusal.
    "batch-request": BatchRequest,
    "batch-result": BatchResult,
    "batch-failure": BatchFailure,
    # The Lipsync card (lipsync.configure_card) and a change of a target's sources (lipsync.source_changed).
    "card": Card,
    "change": SourceChange,
}

#: What callers write ("validation" mode: defaults are optional); the others are what we write.
_WRITTEN_BY_CALLERS: tuple[type[BaseModel], ...] = (LipsyncRequest, BatchRequest, Card, SourceChange)


def schema_of(name: str) -> dict[str, Any]:
    model = PUBLISHED[name]
    # The request is what callers write ("validation" mode: defaults are optional); the others are
    # what we write ("serialization" mode: every field is present).
    mode: Literal["validation", "serialization"] = (
        "validation" if model in _WRITTEN_BY_CALLERS else "serialization"
    )
    schema = model.model_json_schema(mode=mode)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://lipsync-worker.dev/schemas/{name}.json"
    return schema


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PUBLISHED:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(schema_of(name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
