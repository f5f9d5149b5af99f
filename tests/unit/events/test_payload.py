"""Reading GEN's undocumented event bodies (worker.events.payload): plausible shapes, junk, hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.events.payload import (
    MAX_IDS,
    MAX_SHAPE,
    EventIds,
    Unreadable,
    describe_unparsed,
    parse,
    read_ids,
    shape,
)

#: The generation object as GET /v1/generations/{id} returns it (gen-api.md §4).
GENERATION = {
    "id": 9001,
    "status": "completed",
    "user_job_type": "lipsync",
    "result": None,
    "failed_reason": None,
    "output_resources": [{"id": 1009001, "url": "https://cdn.gen.pro/o/x.mp4", "object_type": "video"}],
    "execution_cost": 100.0,
}


def ids(document: Any) -> tuple[list[str], list[str], list[str], list[str]]:
    found = read_ids(document)
    return found.generation, found.cell, found.layer, found.sheet


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {
                "event": "generation.completed",
                "generation": GENERATION,
                "spreadsheet_id": 101,
                "cell_id": 3000,
                "layer_id": 4000,
            },
            (["9001"], ["3000"], ["4000"], ["101"]),
            id="the simulator's envelope",
        ),
        pytest.param(GENERATION, (["9001"], [], [], []), id="the bare generation object"),
        pytest.param(
            {"type": "user_job.updated", "data": {"user_job": {"id": "9001", "status": "processing"}}},
            (["9001"], [], [], []),
            id="nested user_job with a string id",
        ),
        pytest.param(
            {"event": "row.changed", "sheetId": "101", "cell": {"id": 3000, "video_layers": [{"id": 4000}]}},
            ([], ["3000"], ["4000"], ["101"]),
            id="a row change in camelCase with nested layers",
        ),
        pytest.param(
            {"generationId": 9001, "Cell-ID": "3000", "videoLayerId": 4000},
            (["9001"], ["3000"], ["4000"], []),
            id="ids in other spellings",
        ),
        pytest.param(
            [{"generation_id": 9001}, {"generation_id": 9002}, {"generation_id": 9001}],
            (["9001", "9002"], [], [], []),
            id="a batch of events, each id once",
        ),
        pytest.param(
            {"event": "completed", "links": {"self": "https://api.gen.pro/v1/generations/9001"}},
            (["9001"], [], [], []),
            id="only an API URL",
        ),
        pytest.param(
            {"resource": "/v1/vidsheet/101/cells/3000/layers/4000"},
            ([], ["3000"], ["4000"], ["101"]),
            id="a target path",
        ),
        pytest.param(
            {"cell": {"id": 3000, "user_jobs": [{"id": 9003, "status": "processing"}, {"id": 9001}]}},
            (["9003", "9001"], ["3000"], [], []),
            id="a cell with its user_jobs",
        ),
    ],
)
def test_plausible_shapes_give_their_ids(document: Any, expected: tuple[list[str], ...]) -> None:
    assert ids(document) == expected
    # The same document as GEN would send it, bytes on the wire.
    assert ids(parse(json.dumps(document).encode())) == expected


@pytest.mark.parametrize(
    "document",
    [
        {},
        [],
        "generation completed",
        42,
        None,
        {"event": "test", "message": "hello"},
        {"id": "evt_1", "type": "ping"},  # an id of something unnamed is nobody's
        {"generation_id": True, "cell_id": 3.5, "layer_id": "not an id!", "sheet_id": ""},
        {"generation_id": {"nested": "object"}, "cell_id": ["list"]},
        {"generation_id": 10**30},
    ],
)
def test_documents_naming_nothing_name_nothing(document: Any) -> None:
    assert not read_ids(document).names_anything()


def test_a_sheet_alone_names_no_job() -> None:
    found = read_ids({"spreadsheet_id": 101})
    assert found.sheet == ["101"] and not found.names_anything()


def test_ids_per_kind_are_capped() -> None:
    found = read_ids({"user_jobs": [{"id": n} for n in range(1000)]})
    assert found.generation == [str(n) for n in range(MAX_IDS)]


def test_deep_nesting_neither_recurses_nor_hangs() -> None:
    deep: Any = {"generation_id": 1}
    for _ in range(5000):
        deep = {"a": [deep]}
    # Past the depth bound the id is not reached, and nothing blows the stack.
    assert read_ids(deep).generation == []
    with pytest.raises(Unreadable):
        parse(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe", b'{"a": ', b"<xml/>"])
def test_bodies_that_are_not_json_are_unreadable(body: bytes) -> None:
    with pytest.raises(Unreadable):
        parse(body)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda children: (
            st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
        ),
        max_leaves=40,
    )
)
def test_any_json_document_is_read_without_error(document: Any) -> None:
    found = read_ids(document)
    assert isinstance(found, EventIds)
    for kind in (found.generation, found.cell, found.layer, found.sheet):
        assert len(kind) <= MAX_IDS and len(set(kind)) == len(kind)
    assert len(shape(document)) <= MAX_SHAPE


def test_shape_shows_structure_and_types_never_values() -> None:
    secretive = {
        "event": "generation.completed",
        "token": "sk-live-SECRET-123",
        "data": {"id": 9001, "owner@example.com": "x", "items": [{"url": "https://x/SECRET"}]},
    }
    described = shape(secretive)
    assert described == "{event: str, token: str, data: {id: int, <key>: str, items: [1 x {url: str}]}}"
    assert "SECRET" not in described and "example.com" not in described
    assert "SECRET" not in describe_unparsed(b"SECRET body", "text/plain; SECRET=1\r\nX: y")


def test_shape_is_bounded() -> None:
    assert len(shape({f"k{n}": {"x": [1, 2]} for n in range(1000)})) <= MAX_SHAPE
    assert shape({"a": {"b": {"c": {"d": {"e": 1}}}}}) == "{a: {b: {c: {d: {…}}}}}"
