"""Property tests: whatever JSON a caller sends, validation answers with a request or a typed error."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import RequestInvalid
from worker.jobs.models import LipsyncRequest

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)

VALID: dict[str, Any] = {
    "sheet_id": 101,
    "cell_id": 3000,
    "layer_id": 4000,
    "video_resource_id": 5001,
    "audio_resource_id": 6001,
    "model": "gen",
}
FIELDS = [*VALID, "job_id", "callback", "metadata"]


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_is_a_request_or_a_typed_error(raw: Any) -> None:
    try:
        LipsyncRequest.parse(raw)
    except RequestInvalid as exc:
        assert exc.errors and all({"field", "message"} <= set(e) for e in exc.errors)


@settings(max_examples=300)
@given(st.sampled_from(FIELDS), json_values)
def test_one_bad_field_is_named(field: str, value: Any) -> None:
    raw = {**VALID, field: value}
    try:
        request = LipsyncRequest.parse(raw)
    except RequestInvalid as exc:
        assert any(e["field"].split(".")[0] == field for e in exc.errors), (field, exc.errors)
        if isinstance(value, str) and len(value) >= 8:
            assert value not in str(exc), "errors must not echo the input (it could be a secret)"
    else:
        assert isinstance(request, LipsyncRequest)


@given(st.sampled_from(list(VALID)))
def test_a_missing_field_is_named(field: str) -> None:
    raw = {k: v for k, v in VALID.items() if k != field}
    if field in ("layer_id", "model"):
        LipsyncRequest.parse(raw)  # optional
        return
    try:
        LipsyncRequest.parse(raw)
    except RequestInvalid as exc:
        assert [e["field"] for e in exc.errors] == [field]
    else:
        raise AssertionError(f"missing {field} was accepted")
