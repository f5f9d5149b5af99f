"""Unit tests of worker.gen.client against `responses` (no network)."""

from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
import requests
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from urllib3.exceptions import ReadTimeoutError

from worker.errors import ConfigurationError
from worker.gen import client as gc
from worker.gen.client import MAX_BODY_BYTES, GenClient, idempotency_key_for
from worker.gen.errors import (
    GenAPIError,
    GenAuthError,
    GenBadResponse,
    GenNotFound,
    GenNotStoppable,
    GenRateLimited,
    GenRejected,
    GenServerError,
    GenTimeout,
    GenTransportError,
)
from worker.gen.models import ContentResource, Generation, GenerationAccepted
from worker.retry import is_retryable
from worker.settings import Settings

BASE = "https://gen.test"
KEY = "sk-SECRET-123"
AGENT = "42"
ACE = f"{BASE}/v1/autocontentengine"
VS = f"{BASE}/v1/vidsheet"
GEN_URL = f"{BASE}/v1/generations"


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def client() -> Iterator[GenClient]:
    with GenClient(base_url=BASE, api_key=KEY, agent_id=AGENT) as c:
        yield c


@pytest.fixture
def vclient() -> Iterator[GenClient]:
    with GenClient(base_url=BASE + "/", api_key=KEY, agent_id=AGENT, dialect="vidsheet") as c:
        yield c


def _generate(c: GenClient, *, layer_id: str | None = None, key: str = "lipsync-job-1") -> GenerationAccepted:
    return c.generate_lipsync(
        sheet_id="101",
        cell_id="3000",
        layer_id=layer_id,
        model="sync_so",
        video_resource_id="5001",
        audio_resource_id="6001",
        idempotency_key=key,
    )


def _sent_json(call: Any) -> Any:
    return json.loads(call.request.body)


def _query(call: Any) -> dict[str, list[str]]:
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(call.request.url).query)


# --------------------------------------------------------------------------------------------
# Requests: paths, bodies, headers
# --------------------------------------------------------------------------------------------


def test_generate_autocontentengine_cell(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{ACE}/101/cells/3000/generate", json={"generation_id": 9001, "status": "pending"}, status=201)
    accepted = _generate(client)
    assert accepted == GenerationAccepted(generation_id="9001", status="pending")
    assert accepted.generation_id == "9001"  # int id normalised to str

    (call,) = rsps.calls
    assert call.request.method == "POST"
    assert _sent_json(call) == {
        "generation_type": "lipsync",
        "data": {"model": "sync_so", "video_resource_id": "5001", "audio_resource_id": "6001"},
    }
    assert _query(call) == {"agent_id": ["42"]}
    headers = call.request.headers
    assert headers["X-API-Key"] == KEY
    assert headers["Idempotency-Key"] == "lipsync-job-1"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"].startswith("lipsync-worker/")
    assert headers["User-Agent"].endswith("(+python-requests)")
    assert KEY not in str(call.request.url)


def test_generate_autocontentengine_layer_and_gen_model(
    client: GenClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(
        f"{ACE}/101/cells/3000/layers/4000/generate", json={"generation_id": "g-1", "status": "pending"}
    )
    accepted = client.generate_lipsync(
        sheet_id="101",
        cell_id="3000",
        layer_id="4000",
        model="gen",
        video_resource_id="5001",
        audio_resource_id="6001",
        idempotency_key="k",
    )
    assert accepted.generation_id == "g-1"
    assert _sent_json(rsps.calls[0])["data"]["model"] == "gen"
    assert _query(rsps.calls[0]) == {"agent_id": ["42"]}


def test_idempotency_key_identical_across_calls(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{ACE}/101/cells/3000/generate", json={"generation_id": 9001, "status": "pending"})
    key = idempotency_key_for("job-7")
    first = _generate(client, key=key)
    second = _generate(client, key=key)
    assert first == second
    keys = [call.request.headers["Idempotency-Key"] for call in rsps.calls]
    assert keys == ["lipsync-job-7", "lipsync-job-7"]
    assert _sent_json(rsps.calls[0]) == _sent_json(rsps.calls[1])


def test_idempotency_key_for_is_deterministic() -> None:
    assert idempotency_key_for("abc") == idempotency_key_for("abc") == "lipsync-abc"
    assert idempotency_key_for("abc") != idempotency_key_for("abd")
    with pytest.raises(ValueError):
        idempotency_key_for("")


def test_generate_requires_an_idempotency_key(client: GenClient, rsps: responses.RequestsMock) -> None:
    with pytest.raises(ValueError):
        _generate(client, key="")
    assert not rsps.calls


def _content_resource(rid: int, url: str) -> dict[str, Any]:
    return {
        "content_resource": {
            "id": rid,
            "url": url,
            "thumbnail_url": None,
            "file_name": f"{rid}.mp4",
            "content_type": "video/mp4",
        },
        "generator": None,
    }


@pytest.mark.parametrize(
    ("layer_id", "path", "model", "wire_model"),
    [
        (None, "/101/cells/3000/generate", "sync_so", "sync.so"),
        ("4000", "/101/cells/3000/layers/4000/generate", "gen", "gen"),
    ],
)
def test_generate_vidsheet(
    vclient: GenClient,
    rsps: responses.RequestsMock,
    layer_id: str | None,
    path: str,
    model: Any,
    wire_model: str,
) -> None:
    rsps.get(f"{BASE}/v1/content_resources/5001", json=_content_resource(5001, "https://cdn.test/v.mp4"))
    rsps.get(f"{BASE}/v1/content_resources/6001", json=_content_resource(6001, "https://cdn.test/a.mp3"))
    rsps.post(f"{VS}{path}", json={"generation_id": 9002, "status": "pending"}, status=201)
    accepted = vclient.generate_lipsync(
        sheet_id="101",
        cell_id="3000",
        layer_id=layer_id,
        model=model,
        video_resource_id="5001",
        audio_resource_id="6001",
        idempotency_key="lipsync-j",
    )
    assert accepted.generation_id == "9002"
    assert [c.request.method for c in rsps.calls] == ["GET", "GET", "POST"]
    for call in rsps.calls:
        assert _query(call) == {"agent_id": ["42"]}
        assert call.request.headers["X-API-Key"] == KEY
    post = rsps.calls[2]
    assert str(post.request.url).split("?")[0] == f"{VS}{path}"
    assert post.request.headers["Idempotency-Key"] == "lipsync-j"
    assert _sent_json(post) == {
        "generation_type": "lipsync",
        "data": {
            "talking_avatar_video_data": {
                "video": {"value": "https://cdn.test/v.mp4"},
                "audio": {"value": "https://cdn.test/a.mp3"},
            },
            "lip_sync_model": wire_model,
        },
    }


def test_vidsheet_unknown_resource_is_not_found(vclient: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(
        f"{BASE}/v1/content_resources/5001",
        json={"error": "Content resource not found", "error_code": "content_resource_not_found"},
        status=404,
    )
    with pytest.raises(GenNotFound) as info:
        _generate(vclient)
    assert info.value.error_code == "content_resource_not_found"
    assert info.value.endpoint == "get_content_resource"
    assert len(rsps.calls) == 1  # nothing was submitted


def test_get_content_resource(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/v1/content_resources/5012", json=_content_resource(5012, "https://cdn.test/x.png"))
    resource = client.get_content_resource("5012")
    assert resource == ContentResource(
        id="5012", url="https://cdn.test/x.png", file_name="5012.mp4", content_type="video/mp4"
    )
    assert _query(rsps.calls[0]) == {"agent_id": ["42"]}


@pytest.mark.parametrize(
    "body",
    [
        {"content_resource": {"id": 1}},  # no url
        {"content_resource": {"id": 1, "url": ""}},
        {"content_resource": None},
        {"content_resource": {"id": True, "url": "https://x"}},
    ],
)
def test_get_content_resource_malformed(client: GenClient, rsps: responses.RequestsMock, body: Any) -> None:
    rsps.get(f"{BASE}/v1/content_resources/1", json=body)
    with pytest.raises(GenBadResponse):
        client.get_content_resource("1")


def test_get_generation_has_no_agent_id(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(
        f"{GEN_URL}/9002",
        json={
            "id": 9002,
            "status": "completed",
            "output_resources": [{"id": 1502, "url": "https://cdn.test/out.mp4", "object_type": "video"}],
            "execution_cost": "2.5",
        },
    )
    generation = client.get_generation("9002")
    assert isinstance(generation, Generation)
    assert generation.id == "9002"
    assert generation.output_resources[0].id == "1502"
    assert generation.execution_cost == 2.5
    assert _query(rsps.calls[0]) == {}
    assert rsps.calls[0].request.headers["X-API-Key"] == KEY


def test_unknown_status_is_not_an_error(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/1", json={"id": 1, "status": "warming_up"})
    assert client.get_generation("1").status == "warming_up"


def test_stop_generation(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{GEN_URL}/9000/stop", json={"generation_id": 9000, "status": "stopped"})
    client.stop_generation("9000")
    call = rsps.calls[0]
    assert _query(call) == {}
    assert not call.request.body


def test_stop_ignores_the_body(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{GEN_URL}/9000/stop", body="OK", status=200)
    client.stop_generation("9000")


@pytest.mark.parametrize(
    ("layer_id", "url"),
    [(None, f"{ACE}/101/cells/3000"), ("4000", f"{ACE}/101/cells/3000/layers/4000")],
)
def test_get_cell_and_layer(
    client: GenClient, rsps: responses.RequestsMock, layer_id: str | None, url: str
) -> None:
    rsps.get(url, json={"id": 3000, "user_jobs": [], "default_user_job": None})
    data = client.get_cell("101", "3000") if layer_id is None else client.get_layer("101", "3000", layer_id)
    assert data["user_jobs"] == []
    assert str(rsps.calls[0].request.url).split("?")[0] == url
    assert _query(rsps.calls[0]) == {"agent_id": ["42"]}


def test_get_cell_vidsheet_prefix(vclient: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{VS}/101/cells/3000", json={"id": 3000})
    assert vclient.get_cell("101", "3000") == {"id": 3000}


def test_get_cell_not_an_object(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{ACE}/101/cells/3000", json=[1, 2])
    with pytest.raises(GenBadResponse, match="expected a JSON object"):
        client.get_cell("101", "3000")


def test_ids_are_quoted_into_paths(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/a%2F..%2Fb%3Fx", json={"id": "ab", "status": "pending"})
    client.get_generation("a/../b?x")
    assert rsps.calls[0].request.url == f"{GEN_URL}/a%2F..%2Fb%3Fx"


def test_empty_id_is_refused(client: GenClient, rsps: responses.RequestsMock) -> None:
    with pytest.raises(ValueError):
        client.get_generation("")
    assert not rsps.calls


class _RecordingSession(requests.Session):
    def __init__(self) -> None:
        super().__init__()
        self.kwargs: list[dict[str, Any]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        self.kwargs.append(kwargs)
        return super().request(method, url, *args, **kwargs)


def test_timeouts_and_no_redirects(rsps: responses.RequestsMock) -> None:
    session = _RecordingSession()
    c = GenClient(
        base_url=BASE, api_key=KEY, agent_id=AGENT, connect_timeout=2.5, read_timeout=11, session=session
    )
    rsps.get(f"{GEN_URL}/1", json={"id": 1, "status": "pending"})
    rsps.post(f"{GEN_URL}/1/stop", json={})
    rsps.get(f"{ACE}/101/cells/3000", json={})
    c.get_generation("1")
    c.stop_generation("1")
    c.get_cell("101", "3000")
    assert len(session.kwargs) == 3
    for kwargs in session.kwargs:
        assert kwargs["timeout"] == (2.5, 11.0)
        assert kwargs["allow_redirects"] is False
    # The key travels per request; a shared session is never given it.
    assert "X-API-Key" not in session.headers
    c.close()  # a passed-in session is not closed by the client


def test_redirect_is_not_followed(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/1", status=302, headers={"Location": "https://evil.test/steal"})
    rsps.get("https://evil.test/steal", json={"id": 1, "status": "pending"})
    with pytest.raises(GenRejected) as info:
        client.get_generation("1")
    assert info.value.status_code == 302
    assert len(rsps.calls) == 1
    assert not is_retryable(info.value)


def test_custom_user_agent(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/1", json={"id": 1, "status": "pending"})
    GenClient(base_url=BASE, api_key=KEY, agent_id=AGENT, user_agent="ua/1").get_generation("1")
    assert rsps.calls[0].request.headers["User-Agent"] == "ua/1"


# --------------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------------


def _err(code: str, message: str = "boom") -> dict[str, str]:
    return {"error": message, "error_code": code}


ERROR_CASES: list[tuple[str, int, Any, dict[str, str], type[GenAPIError], str | None, bool]] = [
    # (id, status, body, headers, class, error_code, retryable)
    ("401", 401, _err("unauthorized", "Unauthorized"), {}, GenAuthError, "unauthorized", False),
    ("403", 403, _err("permission_denied"), {}, GenAuthError, "permission_denied", False),
    ("404", 404, _err("not_found", "Generation not found"), {}, GenNotFound, "not_found", False),
    ("408", 408, None, {}, GenServerError, None, True),
    ("422-validation", 422, _err("validation_error"), {}, GenRejected, "validation_error", False),
    ("422-agent", 422, _err("agent_not_found", "Agent not found"), {}, GenRejected, "agent_not_found", False),
    (
        "422-credits",
        422,
        _err("usable_gen_credit_required"),
        {},
        GenRejected,
        "usable_gen_credit_required",
        False,
    ),
    ("409", 409, _err("conflict"), {}, GenRejected, "conflict", False),
    ("429", 429, _err("rate_limited"), {}, GenRateLimited, "rate_limited", True),
    ("429-no-body", 429, None, {"Retry-After": "7"}, GenRateLimited, None, True),
    ("500", 500, _err("internal"), {}, GenServerError, "internal", True),
    ("502-html", 502, "<html>Bad Gateway</html>", {}, GenServerError, None, True),
    ("503", 503, None, {"Retry-After": "3"}, GenServerError, None, True),
    ("504", 504, "", {}, GenServerError, None, True),
    ("500-error-not-str", 500, {"error": {"nested": 1}, "error_code": 5}, {}, GenServerError, None, True),
    ("500-json-list", 500, [1, 2], {}, GenServerError, None, True),
]


@pytest.mark.parametrize(
    ("status", "body", "headers", "cls", "error_code", "retryable"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_error_mapping(
    client: GenClient,
    rsps: responses.RequestsMock,
    status: int,
    body: Any,
    headers: dict[str, str],
    cls: type[GenAPIError],
    error_code: str | None,
    retryable: bool,
) -> None:
    kwargs: dict[str, Any] = {"status": status, "headers": headers}
    if isinstance(body, dict | list):
        kwargs["json"] = body
    elif body is not None:
        kwargs["body"] = body
    rsps.get(f"{GEN_URL}/9", **kwargs)
    with pytest.raises(GenAPIError) as info:
        client.get_generation("9")
    exc = info.value
    assert type(exc) is cls
    assert exc.status_code == status
    assert exc.error_code == error_code
    assert exc.endpoint == "get_generation"
    assert is_retryable(exc) is retryable
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        assert exc.message == body["error"]
    else:
        assert exc.message == f"HTTP {status}"
    expected_retry_after = float(headers["Retry-After"]) if "Retry-After" in headers else None
    assert exc.retry_after == expected_retry_after
    assert len(rsps.calls) == 1  # the client never retries


def test_429_retry_after_seconds(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.post(
        f"{ACE}/101/cells/3000/generate", status=429, json=_err("rate_limited"), headers={"Retry-After": "12"}
    )
    with pytest.raises(GenRateLimited) as info:
        _generate(client)
    assert info.value.retry_after == 12.0
    assert info.value.endpoint == "generate"
    assert is_retryable(info.value)


def test_429_retry_after_http_date(client: GenClient, rsps: responses.RequestsMock) -> None:
    when = datetime.fromtimestamp(time.time() + 90, tz=UTC)
    rsps.get(f"{GEN_URL}/9", status=429, headers={"Retry-After": format_datetime(when, usegmt=True)})
    with pytest.raises(GenRateLimited) as info:
        client.get_generation("9")
    assert info.value.retry_after is not None
    assert 80 <= info.value.retry_after <= 91


def test_429_unparseable_retry_after(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/9", status=429, headers={"Retry-After": "soon"})
    with pytest.raises(GenRateLimited) as info:
        client.get_generation("9")
    assert info.value.retry_after is None


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (422, _err("job_cannot_be_stopped", "Generation already completed or failed"), GenNotStoppable),
        (422, _err("validation_error", "Generation cannot be stopped in its current state"), GenNotStoppable),
        (422, _err("agent_not_found"), GenRejected),
        (422, None, GenRejected),
        (404, _err("not_found"), GenNotFound),
        (503, None, GenServerError),
    ],
)
def test_stop_error_mapping(
    client: GenClient, rsps: responses.RequestsMock, status: int, body: Any, cls: type[GenAPIError]
) -> None:
    rsps.post(f"{GEN_URL}/9000/stop", status=status, json=body)
    with pytest.raises(GenAPIError) as info:
        client.stop_generation("9000")
    assert type(info.value) is cls
    assert info.value.endpoint == "stop_generation"


def test_validation_error_on_generate_is_not_not_stoppable(
    client: GenClient, rsps: responses.RequestsMock
) -> None:
    rsps.post(f"{ACE}/101/cells/3000/generate", status=422, json=_err("validation_error"))
    with pytest.raises(GenRejected) as info:
        _generate(client)
    assert type(info.value) is GenRejected


def test_error_message_is_truncated(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/9", status=422, json=_err("validation_error", "x" * 10_000))
    with pytest.raises(GenRejected) as info:
        client.get_generation("9")
    assert len(str(info.value)) < 300


def test_huge_error_body_falls_back_to_status(client: GenClient, rsps: responses.RequestsMock) -> None:
    big = json.dumps({"error": "y" * (2 * MAX_BODY_BYTES), "error_code": "x"})
    rsps.get(f"{GEN_URL}/9", status=500, body=big)
    with pytest.raises(GenServerError) as info:
        client.get_generation("9")
    assert info.value.message == "HTTP 500"


# --------------------------------------------------------------------------------------------
# Transport errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "cls"),
    [
        (requests.ConnectionError("connection refused"), GenTransportError),
        (requests.ConnectTimeout("connect timed out"), GenTimeout),
        (requests.ReadTimeout("read timed out"), GenTimeout),
        (requests.exceptions.ChunkedEncodingError("broken chunk"), GenTransportError),
        (requests.exceptions.SSLError("bad handshake"), GenTransportError),
        (requests.ConnectionError(ReadTimeoutError(None, "/x", "read timed out")), GenTimeout),  # type: ignore[arg-type]
        (requests.RequestException("other"), GenTransportError),
    ],
    ids=["connection", "connect-timeout", "read-timeout", "chunked", "ssl", "stream-read-timeout", "other"],
)
def test_transport_errors(
    client: GenClient, rsps: responses.RequestsMock, raised: Exception, cls: type[GenAPIError]
) -> None:
    rsps.get(f"{GEN_URL}/9", body=raised)
    with pytest.raises(GenAPIError) as info:
        client.get_generation("9")
    exc = info.value
    assert type(exc) is cls
    assert isinstance(exc, GenTransportError)
    assert exc.status_code is None
    assert exc.endpoint == "get_generation"
    assert is_retryable(exc)
    assert exc.__cause__ is None and exc.__suppress_context__
    assert len(rsps.calls) == 1


def test_transport_error_during_generate(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{ACE}/101/cells/3000/generate", body=requests.ReadTimeout("read timed out"))
    with pytest.raises(GenTimeout) as info:
        _generate(client)
    assert info.value.endpoint == "generate"
    assert len(rsps.calls) == 1


# --------------------------------------------------------------------------------------------
# Malformed 2xx bodies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("<html>oops</html>", "not JSON"),
        ("", "empty"),
        ("   ", "empty"),
        ("null", "expected a JSON object"),
        ("[1, 2]", "expected a JSON object"),
        ('"pending"', "expected a JSON object"),
        ("{}", "generation_id"),
        ('{"status": "pending"}', "generation_id"),
        ('{"generation_id": 1}', "status"),
        ('{"generation_id": null, "status": "pending"}', "generation_id"),
        ('{"generation_id": true, "status": "pending"}', "generation_id"),
        ('{"generation_id": {"a": 1}, "status": "pending"}', "generation_id"),
        ('{"generation_id": 1, "status": 5}', "status"),
        ('{"generation_id": "a b/c", "status": "pending"}', "generation_id"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        ('{"generation_id": 1e999999999, "status": "x"}', "generation_id"),
        (b"\xff\xfe\x00garbage", "not JSON"),
    ],
)
def test_generate_malformed_2xx(
    client: GenClient, rsps: responses.RequestsMock, body: str | bytes, fragment: str
) -> None:
    rsps.post(f"{ACE}/101/cells/3000/generate", body=body, status=201)
    with pytest.raises(GenBadResponse) as info:
        _generate(client)
    assert fragment in info.value.message
    assert info.value.endpoint == "generate"
    assert is_retryable(info.value)
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "body",
    [
        {"status": "completed"},
        {"id": 1},
        {"id": 1, "status": None},
        {"id": [1], "status": "completed"},
        {"id": 1, "status": "completed", "output_resources": "nope"},
        {"id": 1, "status": "completed", "output_resources": [{"id": 2}]},
        {"id": 1, "status": "completed", "execution_cost": "lots"},
    ],
)
def test_get_generation_malformed(client: GenClient, rsps: responses.RequestsMock, body: Any) -> None:
    rsps.get(f"{GEN_URL}/1", json=body)
    with pytest.raises(GenBadResponse) as info:
        client.get_generation("1")
    assert "unexpected Generation" in info.value.message


def test_non_json_body_is_truncated_in_the_message(client: GenClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/1", body="<" + "x" * 50_000)
    with pytest.raises(GenBadResponse) as info:
        client.get_generation("1")
    assert len(info.value.message) < 300


@pytest.mark.parametrize("declare_length", [True, False])
def test_five_mib_body(client: GenClient, rsps: responses.RequestsMock, declare_length: bool) -> None:
    body = b'{"id": 1, "status": "pending", "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    headers = {"Content-Length": str(len(body))} if declare_length else {}
    rsps.get(f"{GEN_URL}/1", body=body, headers=headers)
    with pytest.raises(GenBadResponse, match="larger than"):
        client.get_generation("1")


def test_body_read_stops_at_the_cap() -> None:
    consumed = 0

    class _Endless:
        headers: dict[str, str] = {}

        def iter_content(self, chunk_size: int) -> Iterator[bytes]:
            nonlocal consumed
            while True:
                consumed += chunk_size
                yield b"x" * chunk_size

    assert gc._read_capped(_Endless()) is None  # type: ignore[arg-type]
    assert consumed <= MAX_BODY_BYTES + 64 * 1024


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def test_repr_and_str_omit_the_key(client: GenClient) -> None:
    for text in (repr(client), str(client), repr(vars(client)), str(vars(client))):
        assert KEY not in text
    assert "gen.test" in repr(client)


def _all_error_texts(exc: BaseException) -> list[str]:
    texts = [str(exc), repr(exc), repr(exc.__dict__)]
    texts.append(pickle.dumps(exc).decode("latin-1"))
    return texts


@pytest.mark.parametrize(
    "setup",
    [
        lambda r: r.get(f"{GEN_URL}/1", status=401, json=_err("unauthorized", f"bad key {KEY}")),
        lambda r: r.get(f"{GEN_URL}/1", status=500, json={"error": "e", "error_code": KEY}),
        lambda r: r.get(f"{GEN_URL}/1", body=f"not json, key={KEY}"),
        lambda r: r.get(
            f"{GEN_URL}/1", body=requests.ConnectionError(f"refused, headers={{'X-API-Key': '{KEY}'}}")
        ),
        lambda r: r.get(f"{GEN_URL}/1", body=requests.ReadTimeout(f"timed out {KEY}")),
        lambda r: r.get(f"{GEN_URL}/1", json={"id": KEY + " x", "status": 1}),
    ],
    ids=["401-echo", "500-code-echo", "not-json-echo", "transport-echo", "timeout-echo", "validation"],
)
def test_no_exception_text_contains_the_key(
    client: GenClient, rsps: responses.RequestsMock, setup: Any, caplog: pytest.LogCaptureFixture
) -> None:
    setup(rsps)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GenAPIError) as info:
        client.get_generation("1")
    for text in _all_error_texts(info.value):
        assert KEY not in text
    assert info.value.__cause__ is None
    for record in caplog.records:
        assert KEY not in record.getMessage()


def test_debug_log_line(
    client: GenClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    rsps.post(f"{ACE}/101/cells/3000/generate", json={"generation_id": 1, "status": "pending"}, status=201)
    caplog.set_level(logging.DEBUG, logger="lipsync.gen")
    _generate(client)
    records = [r for r in caplog.records if r.name == "lipsync.gen"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "POST /v1/autocontentengine/101/cells/3000/generate -> 201" in message
    assert "ms" in message
    assert KEY not in message
    assert "X-API-Key" not in message


@pytest.mark.parametrize("bad_key", [f"{KEY} x", f"{KEY}\nInjected: 1", f"\t{KEY}\x00"])
def test_bad_key_is_refused_without_echo(bad_key: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        GenClient(base_url=BASE, api_key=bad_key, agent_id=AGENT)
    assert KEY not in str(info.value)
    assert "LIPSYNC_GEN_API_KEY" in str(info.value)


def test_surrounding_whitespace_in_key_is_stripped(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{GEN_URL}/1", json={"id": 1, "status": "pending"})
    GenClient(base_url=BASE, api_key=f"{KEY}\n", agent_id=AGENT).get_generation("1")
    assert rsps.calls[0].request.headers["X-API-Key"] == KEY


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"base_url": "ftp://gen.test"}, "LIPSYNC_GEN_BASE_URL"),
        ({"api_key": ""}, "LIPSYNC_GEN_API_KEY"),
        ({"agent_id": " "}, "LIPSYNC_GEN_AGENT_ID"),
        ({"dialect": "v2"}, "LIPSYNC_GEN_DIALECT"),
        ({"read_timeout": 0}, "timeouts"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], fragment: str) -> None:
    args: dict[str, Any] = {"base_url": BASE, "api_key": KEY, "agent_id": AGENT, **kwargs}
    with pytest.raises(ConfigurationError, match=fragment):
        GenClient(**args)


# --------------------------------------------------------------------------------------------
# Settings, retryability, per-process cache
# --------------------------------------------------------------------------------------------


def _settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "gen_base_url": BASE,
        "gen_api_key": SecretStr(KEY),
        "gen_agent_id": AGENT,
        "gen_dialect": "autocontentengine",
        "gen_connect_timeout": 3.0,
        "gen_read_timeout": 20.0,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def test_from_settings() -> None:
    c = GenClient.from_settings(_settings(gen_dialect="vidsheet"))
    assert c.base_url == BASE
    assert c.agent_id == AGENT
    assert c.dialect == "vidsheet"
    assert KEY not in repr(c)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"gen_api_key": None}, ["LIPSYNC_GEN_API_KEY"]),
        ({"gen_api_key": SecretStr("  ")}, ["LIPSYNC_GEN_API_KEY"]),
        ({"gen_agent_id": None}, ["LIPSYNC_GEN_AGENT_ID"]),
        ({"gen_api_key": None, "gen_agent_id": None}, ["LIPSYNC_GEN_API_KEY", "LIPSYNC_GEN_AGENT_ID"]),
    ],
)
def test_from_settings_missing(overrides: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        GenClient.from_settings(_settings(**overrides))
    for name in names:
        assert name in str(info.value)
    assert not is_retryable(info.value)


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (GenTransportError("x"), True),
        (GenTimeout("x"), True),
        (GenRateLimited("x", status_code=429), True),
        (GenServerError("x", status_code=503), True),
        (GenBadResponse("x"), True),
        (GenAuthError("x", status_code=401), False),
        (GenNotFound("x", status_code=404), False),
        (GenRejected("x", status_code=422), False),
        (GenNotStoppable("x", status_code=422), False),
        (ConfigurationError("x"), False),
        (ValueError("x"), False),
    ],
)
def test_is_retryable(exc: BaseException, retryable: bool) -> None:
    assert is_retryable(exc) is retryable


def test_from_settings_names_the_missing_setting() -> None:
    with pytest.raises(ConfigurationError, match="LIPSYNC_GEN_API_KEY"):
        GenClient.from_settings(_settings(gen_api_key=None))


# --------------------------------------------------------------------------------------------
# Property: get_generation returns a Generation or raises GenBadResponse, nothing else
# --------------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_field_values = st.one_of(
    _json, st.sampled_from(["completed", "pending", "9001", "https://cdn.test/o.mp4", "2.5"])
)
_output_resource = st.dictionaries(
    st.sampled_from(["id", "url", "thumbnail_url", "object_type", "type"]), _field_values, max_size=5
)
_generation_like = st.dictionaries(
    st.sampled_from(["id", "status", "user_job_type", "failed_reason", "execution_cost", "result", "extra"]),
    _field_values,
    max_size=7,
) | st.fixed_dictionaries(
    {"id": st.one_of(st.integers(), st.text(max_size=70)), "status": _field_values},
    optional={
        "output_resources": st.one_of(_json, st.lists(_output_resource, max_size=3)),
        "execution_cost": _field_values,
        "failed_reason": _field_values,
    },
)
_bodies = st.one_of(
    _json.map(json.dumps),
    _generation_like.map(json.dumps),
    st.text(max_size=50),
    st.binary(max_size=50),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies, status=st.sampled_from([200, 201, 203]))
def test_get_generation_only_returns_generation_or_bad_response(body: str | bytes, status: int) -> None:
    with (
        responses.RequestsMock() as mock,
        GenClient(base_url=BASE, api_key=KEY, agent_id=AGENT) as c,
    ):
        mock.get(f"{GEN_URL}/1", body=body, status=status)
        try:
            result = c.get_generation("1")
        except GenBadResponse as exc:
            assert KEY not in str(exc)
        else:
            assert isinstance(result, Generation)
