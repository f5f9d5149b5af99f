"""The simulator's direct upload (GEN's 3 steps), over real HTTP: the blob, the PUT, the resource."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gensim import GenSimulator

pytestmark = pytest.mark.timeout(60)

KEY = "test-key"
DATA = bytes(range(256)) * 300
MD5 = base64.b64encode(hashlib.md5(DATA).digest()).decode()


@pytest.fixture(scope="module")
def server() -> Iterator[GenSimulator]:
    with GenSimulator(api_key=KEY, agent_ids=("42",)) as sim:
        yield sim


@pytest.fixture
def sim(server: GenSimulator) -> GenSimulator:
    server.reset()
    return server


def blob(**changes: Any) -> dict[str, Any]:
    fields = {"filename": "take.mp4", "byte_size": len(DATA), "checksum": MD5, "content_type": "video/mp4"}
    return {"blob": {**fields, **changes}}


def create_blob(sim: GenSimulator, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{sim.base_url}/v1/direct_upload", json=body, headers={"X-API-Key": KEY}, timeout=10
    )


def put(answer: dict[str, Any], data: bytes, **header_changes: str) -> requests.Response:
    target = answer["direct_upload"]
    return requests.put(target["url"], data=data, headers={**target["headers"], **header_changes}, timeout=10)


def create_resource(sim: GenSimulator, signed_id: str) -> requests.Response:
    return requests.post(
        f"{sim.base_url}/v1/content_resources",
        params={"agent_id": "42"},
        json={"content_resource": {"file": signed_id}},
        headers={"X-API-Key": KEY},
        timeout=10,
    )


def test_three_steps_make_a_content_resource_whose_url_serves_the_bytes(sim: GenSimulator) -> None:
    answer = create_blob(sim, blob())
    assert answer.status_code == 200
    step1 = answer.json()
    assert step1["direct_upload"]["headers"] == {"Content-Type": "video/mp4", "Content-MD5": MD5}
    assert step1["direct_upload"]["url"].startswith(sim.base_url + "/storage/direct_uploads/")
    assert put(step1, DATA).status_code == 200
    created = create_resource(sim, step1["signed_id"])
    assert created.status_code == 201
    resource = created.json()["content_resource"]
    assert resource["file_name"] == "take.mp4" and resource["content_type"] == "video/mp4"
    assert requests.get(resource["url"], timeout=10).content == DATA
    assert sim.uploaded(resource["id"]) == DATA
    kinds = [r["endpoint"] for r in sim.stats()["requests"]]
    assert kinds == ["direct_upload", "direct_upload_put", "create_content_resource", "cdn"]


def test_the_put_takes_no_api_key_and_its_headers_are_kept(sim: GenSimulator) -> None:
    step1 = create_blob(sim, blob()).json()
    target = step1["direct_upload"]
    answer = requests.put(
        target["url"], data=DATA, headers={**target["headers"], "X-Trace": "t-1"}, timeout=10
    )
    assert answer.status_code == 200
    (seen,) = sim.direct_uploads()
    assert seen["uploaded"] is True
    (headers,) = seen["puts"]
    assert headers["Content-MD5"] == MD5 and headers["X-Trace"] == "t-1"
    assert "X-API-Key" not in headers


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"content_type": "text/html"}, 422, "invalid_content_type"),
        ({"byte_size": 1024**3 + 1}, 422, "file_size_exceeded"),
        ({"byte_size": 0}, 422, "validation_error"),
        ({"checksum": "not-md5"}, 422, "validation_error"),
        ({"filename": ""}, 422, "validation_error"),
    ],
)
def test_a_bad_blob_is_refused(sim: GenSimulator, changes: dict[str, Any], status: int, code: str) -> None:
    answer = create_blob(sim, blob(**changes))
    assert (answer.status_code, answer.json()["error_code"]) == (status, code)
    assert sim.direct_uploads() == []


def test_direct_upload_needs_the_api_key(sim: GenSimulator) -> None:
    answer = requests.post(f"{sim.base_url}/v1/direct_upload", json=blob(), timeout=10)
    assert answer.status_code == 401


@pytest.mark.parametrize(
    ("data", "headers", "status", "code"),
    [
        (DATA, {"Content-MD5": base64.b64encode(b"\0" * 16).decode()}, 400, "bad_digest"),
        (DATA[:-1] + b"x", {}, 400, "bad_digest"),
        (DATA[:-1], {}, 400, "incomplete_body"),
        (DATA, {"Content-Type": "audio/mpeg"}, 403, "signature_does_not_match"),
    ],
)
def test_a_put_that_does_not_match_the_blob_is_refused_and_makes_no_resource(
    sim: GenSimulator, data: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    step1 = create_blob(sim, blob()).json()
    answer = put(step1, data, **headers)
    assert (answer.status_code, answer.json()["error_code"]) == (status, code)
    created = create_resource(sim, step1["signed_id"])
    assert (created.status_code, created.json()["error_code"]) == (422, "direct_upload_failed")


def test_an_unknown_signed_id_makes_no_resource(sim: GenSimulator) -> None:
    created = create_resource(sim, "sim-signed-nothing")
    assert (created.status_code, created.json()["error_code"]) == (422, "direct_upload_failed")
