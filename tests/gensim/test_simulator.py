"""The GEN simulator, tested over real HTTP the way the worker uses it.

One simulator serves the whole module (starting a server per test would dominate the runtime);
the ``sim`` fixture resets it before every test. Durations are a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gensim import Fault, GenSimulator, media
from gensim.state import SimState
from gensim.stats import Stats

pytestmark = pytest.mark.timeout(60)

KEY = "test-key"
FAST = {"gen": 0.3, "sync_so": 0.5}
SIZE = 20_000
CELL = "/v1/autocontentengine/101/cells/3000"
LAYER = CELL + "/layers/4000"
V_CELL = "/v1/vidsheet/101/cells/3000"
V_LAYER = V_CELL + "/layers/4000"


@pytest.fixture(scope="module")
def server() -> Iterator[GenSimulator]:
    with GenSimulator(api_key=KEY, agent_ids=("42",), durations=FAST, output_size=SIZE) as sim:
        yield sim


@pytest.fixture
def sim(server: GenSimulator) -> GenSimulator:
    server.reset()
    server.strict_dialect = False
    server.output_size = SIZE
    server.durations = FAST
    return server


def call(
    sim: GenSimulator,
    method: str,
    path: str,
    *,
    key: str | None = KEY,
    agent: Any = "42",
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    """One request on a fresh connection, with the API key and agent_id unless told otherwise."""
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["X-API-Key"] = key
    params = {"agent_id": agent} if agent is not None else {}
    return requests.request(method, sim.base_url + path, headers=hdrs, params=params, timeout=10, **kwargs)


def old_body(video: Any = 5001, audio: Any = "6001", model: str | None = "gen") -> dict[str, Any]:
    data: dict[str, Any] = {"video_resource_id": video, "audio_resource_id": audio}
    if model is not None:
        data["model"] = model
    return {"generation_type": "lipsync", "data": data}


def new_body(
    sim: GenSimulator, video: str = "5001", model: str | None = None, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "talking_avatar_video_data": {
            "video": {"value": f"{sim.base_url}/cdn/uploads/{video}.mp4"},
            "audio": {"value": f"{sim.base_url}/cdn/uploads/6001.mp3"},
        },
        **extra,
    }
    if model is not None:
        data["lip_sync_model"] = model
    return {"generation_type": "lipsync", "data": data}


def generate(sim: GenSimulator, body: dict[str, Any], path: str = LAYER, **kwargs: Any) -> int:
    r = call(sim, "POST", path + "/generate", json=body, **kwargs)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending"
    return int(r.json()["generation_id"])


def poll(sim: GenSimulator, gen_id: int) -> dict[str, Any]:
    r = call(sim, "GET", f"/v1/generations/{gen_id}", agent=None)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_for(sim: GenSimulator, gen_id: int, status: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        gen = poll(sim, gen_id)
        if gen["status"] == status:
            return gen
        assert time.monotonic() < deadline, f"{gen_id} stuck in {gen['status']}"
        time.sleep(0.02)


def assert_error(r: requests.Response, status: int, code: str, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "error_code"}
    assert body["error_code"] == code
    if message is not None:
        assert body["error"] == message


# ------------------------------------------------------------------------------------------
# Auth, agent, not found
# ------------------------------------------------------------------------------------------


def test_api_key_is_required(sim: GenSimulator) -> None:
    assert_error(call(sim, "GET", CELL, key=None), 401, "unauthorized", "Unauthorized")
    assert_error(call(sim, "GET", CELL, key="wrong"), 401, "unauthorized")
    assert_error(call(sim, "GET", "/v1/generations/9001", key=None, agent=None), 401, "unauthorized")
    bearer = call(sim, "GET", CELL, key=None, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200
    assert call(sim, "GET", CELL).status_code == 200
    assert sim.stats()["unauthorized"] == 3


def test_agent_id_is_required_and_checked(sim: GenSimulator) -> None:
    assert_error(call(sim, "GET", CELL, agent=None), 422, "agent_not_found")
    assert_error(call(sim, "GET", CELL, agent="7"), 422, "agent_not_found")
    assert_error(call(sim, "POST", LAYER + "/generate", agent=None, json=old_body()), 422, "agent_not_found")
    assert_error(call(sim, "GET", "/v1/content_resources/5001", agent=None), 422, "agent_not_found")
    # GEN's MCP sends agent_id in the JSON body, as an integer.
    assert generate(sim, {**old_body(), "agent_id": 42}, agent=None)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/vidsheet/999/cells/3000"),
        ("GET", "/v1/vidsheet/101/cells/2999"),
        ("GET", "/v1/vidsheet/101/cells/abc"),
        ("GET", "/v1/vidsheet/101/cells/3000/layers/4001"),  # the layer of another cell
        ("GET", "/v1/vidsheet/102/cells/3099/layers/5099"),
        ("POST", "/v1/autocontentengine/103/cells/3000/generate"),
        ("POST", "/v1/autocontentengine/101/cells/3000/layers/4001/generate"),
    ],
)
def test_unknown_sheet_cell_layer(sim: GenSimulator, method: str, path: str) -> None:
    assert_error(
        call(sim, method, path, json=old_body()), 404, "not_found", "Sheet, cell, or layer not found"
    )


def test_unknown_generation_and_resource(sim: GenSimulator) -> None:
    for path in ("/v1/generations/123", "/v1/generations/x"):
        assert_error(call(sim, "GET", path, agent=None), 404, "not_found", "Generation not found")
    assert_error(call(sim, "POST", "/v1/generations/123/stop", agent=None), 404, "not_found")
    assert_error(call(sim, "POST", "/v1/generations/123/continue", agent=None), 404, "not_found")
    assert_error(call(sim, "GET", "/v1/content_resources/4242"), 404, "content_resource_not_found")
    assert_error(call(sim, "GET", "/v1/nothing/here"), 404, "not_found")
    assert_error(call(sim, "GET", "/cdn/outputs/nope.mp4", key=None), 404, "not_found")


# ------------------------------------------------------------------------------------------
# Generate: both prefixes, both bodies, validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["autocontentengine", "vidsheet"])
@pytest.mark.parametrize("dialect", ["old", "new"])
@pytest.mark.parametrize("on_layer", [False, True])
def test_both_prefixes_accept_both_bodies(
    sim: GenSimulator, prefix: str, dialect: str, on_layer: bool
) -> None:
    path = f"/v1/{prefix}/102/cells/3042" + ("/layers/4042" if on_layer else "")
    body = old_body(model="sync_so") if dialect == "old" else new_body(sim, model="sync.so")
    gen = sim.generation(generate(sim, body, path))
    assert (gen["model"], gen["dialect"], gen["prefix"]) == ("sync_so", dialect, prefix)
    assert (gen["sheet_id"], gen["cell_id"], gen["layer_id"]) == (102, 3042, 4042 if on_layer else None)


def test_new_body_defaults_to_gen_and_accepts_options(sim: GenSimulator) -> None:
    gen = sim.generation(generate(sim, new_body(sim, remove_background=True, remove_silence=False), V_CELL))
    assert gen["model"] == "gen"
    assert gen["options"] == {"remove_background": True, "remove_silence": False}
    voice = new_body(sim, voice_generation_data={"text": "hi", "voice_id": "v1"})
    del voice["data"]["talking_avatar_video_data"]["audio"]
    assert sim.generation(generate(sim, voice, V_CELL))["audio"] is None


def test_strict_dialect_binds_each_body_to_its_prefix(sim: GenSimulator) -> None:
    sim.strict_dialect = True
    assert_error(call(sim, "POST", V_LAYER + "/generate", json=old_body()), 422, "validation_error")
    assert_error(call(sim, "POST", LAYER + "/generate", json=new_body(sim)), 422, "validation_error")
    assert generate(sim, old_body(), LAYER)
    assert generate(sim, new_body(sim), V_LAYER)
    assert sim.stats()["generations_created"] == 2


OLD_RESOURCE_ERROR = "Missing or invalid video/audio resource"
NEW_INPUT_ERROR = "Missing video.value, or neither audio.value nor voice_generation_data supplied"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (old_body(video=4999), OLD_RESOURCE_ERROR),
        (old_body(video="6001"), OLD_RESOURCE_ERROR),  # an audio resource as the video
        (old_body(audio=5001), OLD_RESOURCE_ERROR),  # a video resource as the audio
        (old_body(audio=None), OLD_RESOURCE_ERROR),
        (old_body(video=True), OLD_RESOURCE_ERROR),
        (old_body(model="sync.so"), None),  # the new spelling in the old body
        (old_body(model="fast"), None),
        (old_body(model=None), None),  # no model and no lipSyncModel on the cell
        ({"generation_type": "image_from_text", "data": old_body()["data"]}, None),
        ({"data": old_body()["data"]}, None),
        ({"generation_type": "lipsync", "data": "x"}, None),
        ({}, None),
    ],
)
def test_old_body_validation(sim: GenSimulator, body: dict[str, Any], message: str | None) -> None:
    assert_error(call(sim, "POST", LAYER + "/generate", json=body), 422, "validation_error", message)
    assert sim.stats()["generations_created"] == 0


def _new_variants(sim: GenSimulator) -> list[tuple[dict[str, Any], str | None]]:
    def with_data(**changes: Any) -> dict[str, Any]:
        body = new_body(sim)
        body["data"].update(changes)
        return body

    no_audio = new_body(sim)
    del no_audio["data"]["talking_avatar_video_data"]["audio"]
    no_video = new_body(sim)
    del no_video["data"]["talking_avatar_video_data"]["video"]
    ftp_video = new_body(sim)
    ftp_video["data"]["talking_avatar_video_data"]["video"]["value"] = "ftp://example.com/a.mp4"
    return [
        (no_audio, NEW_INPUT_ERROR),
        (no_video, NEW_INPUT_ERROR),
        (with_data(talking_avatar_video_data=None), NEW_INPUT_ERROR),
        (ftp_video, None),
        (with_data(voice_generation_data={"text": "hi"}), None),  # both audio and voice
        (with_data(lip_sync_model="sync_so"), None),  # the old spelling in the new body
        (with_data(video_resource_id=5001), None),  # no other top-level fields
        (with_data(remove_background="yes"), None),
    ]


def test_new_body_validation(sim: GenSimulator) -> None:
    for body, message in _new_variants(sim):
        r = call(sim, "POST", V_CELL + "/generate", json=body)
        assert_error(r, 422, "validation_error", message)
    assert sim.stats()["generations_created"] == 0


def test_invalid_json_body(sim: GenSimulator) -> None:
    r = call(
        sim, "POST", LAYER + "/generate", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(r, 422, "validation_error")


def test_cell_lipsyncmodel_is_the_old_bodys_fallback(sim: GenSimulator) -> None:
    assert_error(call(sim, "POST", CELL + "/generate", json=old_body(model=None)), 422, "validation_error")
    nested = {
        "spreadsheet_cell": {"additional_attributes": {"lipSyncModel": "sync_so", "autoGenerate": False}}
    }
    r = call(sim, "PATCH", CELL, json=nested)
    assert r.status_code == 200
    assert r.json()["additional_attributes"] == {"lipSyncModel": "sync_so", "autoGenerate": False}
    assert sim.generation(generate(sim, old_body(model=None), CELL))["model"] == "sync_so"
    # Top-level additional_attributes merge too, and the newer "sync.so"/"gen" spelling is accepted.
    r = call(sim, "PATCH", CELL, json={"additional_attributes": {"lipSyncModel": "gen"}})
    assert r.json()["additional_attributes"] == {"lipSyncModel": "gen", "autoGenerate": False}
    assert sim.generation(generate(sim, old_body(model=None), LAYER))["model"] == "gen"
    # An explicit model still wins over the cell's.
    assert sim.generation(generate(sim, old_body(model="sync_so"), CELL))["model"] == "sync_so"
    assert_error(call(sim, "PATCH", CELL, json={"additional_attributes": 3}), 422, "validation_error")
    # Another sheet's cell 3000 is a different cell.
    other = call(sim, "GET", "/v1/vidsheet/102/cells/3000").json()
    assert other["additional_attributes"] == {}


# ------------------------------------------------------------------------------------------
# Idempotency-Key
# ------------------------------------------------------------------------------------------


def test_same_key_same_request_replays(sim: GenSimulator) -> None:
    hdr = {"Idempotency-Key": "job-1"}
    first = call(sim, "POST", LAYER + "/generate", json=old_body(video=5001, audio=6001), headers=hdr)
    # Same request after normalisation: ids as strings instead of ints.
    again = call(sim, "POST", LAYER + "/generate", json=old_body(video="5001", audio="6001"), headers=hdr)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    stats = sim.stats()
    assert (stats["generations_created"], stats["charges"], stats["replays"]) == (1, 1, 1)
    assert stats["generations_by_key"] == {"job-1": [first.json()["generation_id"]]}
    assert sim.generation(first.json()["generation_id"])["idempotency_key"] == "job-1"


def test_same_key_different_request_is_refused(sim: GenSimulator) -> None:
    hdr = {"Idempotency-Key": "job-2"}
    assert generate(sim, old_body(), headers=hdr)
    for body, path in ((old_body(audio=6002), LAYER), (old_body(), CELL), (new_body(sim), LAYER)):
        r = call(sim, "POST", path + "/generate", json=body, headers=hdr)
        assert_error(r, 422, "idempotency_key_reused")
    assert sim.stats()["generations_created"] == 1


def test_without_key_every_post_creates(sim: GenSimulator) -> None:
    ids = {generate(sim, old_body()) for _ in range(3)}
    assert len(ids) == 3
    assert sim.stats()["charges"] == 3


def test_concurrent_posts_with_one_key_create_one_generation(sim: GenSimulator) -> None:
    barrier = threading.Barrier(20)
    results: list[requests.Response] = []
    lock = threading.Lock()

    def post() -> None:
        barrier.wait()
        r = call(sim, "POST", LAYER + "/generate", json=old_body(), headers={"Idempotency-Key": "race"})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["generation_id"] for r in results}) == 1
    stats = sim.stats()
    assert (stats["generations_created"], stats["charges"], stats["counts"]["generate"]) == (1, 1, 20)


# ------------------------------------------------------------------------------------------
# Lifecycle, outputs, CDN
# ------------------------------------------------------------------------------------------


def test_lifecycle_and_output(sim: GenSimulator) -> None:
    sim.durations = {"gen": 1.0}
    sim.output_size = 30_000
    gen_id = generate(sim, old_body(model="gen"))
    first = poll(sim, gen_id)
    assert first == {
        "id": gen_id,
        "status": "pending",
        "user_job_type": "lipsync",
        "result": None,
        "failed_reason": None,
        "output_resources": [],
        "execution_cost": None,
    }
    token = sim.generation(gen_id)["token"]
    assert call(sim, "GET", f"/cdn/outputs/{token}.mp4", key=None).status_code == 404  # not produced yet
    assert wait_for(sim, gen_id, "processing")["output_resources"] == []
    done = wait_for(sim, gen_id, "completed")
    assert done["execution_cost"] == 100.0
    [out] = done["output_resources"]
    assert out["url"] == f"{sim.base_url}/cdn/outputs/{token}.mp4"
    assert out["thumbnail_url"] == f"{sim.base_url}/cdn/thumbnails/{token}.jpg"
    assert (out["object_type"], out["type"]) == ("video", "output")

    expected = sim.output_bytes(gen_id)
    assert len(expected) == 30_000
    r = requests.get(out["url"], timeout=10)  # no API key: a public CDN
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "video/mp4"
    assert int(r.headers["Content-Length"]) == 30_000
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(expected).digest()

    part = requests.get(out["url"], headers={"Range": "bytes=1000-"}, timeout=10)
    assert part.status_code == 206
    assert part.headers["Content-Range"] == "bytes 1000-29999/30000"
    assert part.content == expected[1000:]
    bounded = requests.get(out["url"], headers={"Range": "bytes=10-19"}, timeout=10)
    assert (bounded.status_code, bounded.content) == (206, expected[10:20])
    assert requests.get(out["url"], headers={"Range": "bytes=30000-"}, timeout=10).status_code == 416
    head = requests.head(out["url"], timeout=10)
    assert (head.status_code, head.headers["Content-Length"]) == (200, "30000")

    thumb = requests.get(out["thumbnail_url"], timeout=10)
    assert thumb.headers["Content-Type"] == "image/jpeg"
    assert thumb.content.startswith(b"\xff\xd8") and thumb.content.endswith(b"\xff\xd9")


def test_sync_so_costs_more_and_output_is_a_resource(sim: GenSimulator) -> None:
    gen_id = generate(sim, new_body(sim, model="sync.so"), V_CELL)
    done = wait_for(sim, gen_id, "completed")
    assert done["execution_cost"] == 200.0
    resource_id = done["output_resources"][0]["id"]
    r = call(sim, "GET", f"/v1/content_resources/{resource_id}")
    assert r.json()["generator"] == {"id": gen_id, "status": "completed", "type": "lipsync"}
    # A completed output can feed the next lipsync (old body, by resource id).
    assert generate(sim, old_body(video=resource_id))


def test_output_size_applies_to_new_generations(sim: GenSimulator) -> None:
    before = generate(sim, old_body())
    sim.output_size = 5_000
    after = generate(sim, old_body())
    assert len(sim.output_bytes(before)) == SIZE
    assert len(sim.output_bytes(after)) == 5_000
    assert sim.output_bytes(before) != sim.output_bytes(generate(sim, old_body()))[:SIZE]


def test_fail_next(sim: GenSimulator) -> None:
    sim.fail_next(n=2, reason="Audio too long")
    failed = [generate(sim, old_body()) for _ in range(2)]
    fine = generate(sim, old_body())
    for gen_id in failed:
        gen = wait_for(sim, gen_id, "failed")
        assert gen["failed_reason"] == "Audio too long"
        assert gen["output_resources"] == [] and gen["execution_cost"] is None
    assert wait_for(sim, fine, "completed")["failed_reason"] is None


def test_video_5099_has_no_face(sim: GenSimulator) -> None:
    ids = [generate(sim, old_body(video=5099)), generate(sim, new_body(sim, video="5099"), V_CELL)]
    for gen_id in ids:
        gen = wait_for(sim, gen_id, "failed")
        assert gen["failed_reason"] == "No face detected in the source video"


def test_video_5098_is_stuck(sim: GenSimulator) -> None:
    ids = [generate(sim, old_body(video="5098")), generate(sim, new_body(sim, video="5098"), V_CELL)]
    time.sleep(FAST["gen"] + 0.2)
    assert [poll(sim, g)["status"] for g in ids] == ["pending", "pending"]
    r = call(sim, "POST", f"/v1/generations/{ids[0]}/stop", agent=None)
    assert r.json() == {"generation_id": ids[0], "status": "stopped"}


def test_stop_and_continue(sim: GenSimulator) -> None:
    sim.durations = {"gen": 0.6}
    gen_id = generate(sim, old_body())
    wait_for(sim, gen_id, "processing")
    r = call(sim, "POST", f"/v1/generations/{gen_id}/stop", agent=None)
    assert (r.status_code, r.json()) == (200, {"generation_id": gen_id, "status": "stopped"})
    time.sleep(0.7)  # past the duration: a stopped job stays stopped
    assert poll(sim, gen_id)["status"] == "stopped"
    assert sim.generation(gen_id)["stopped_by_api"] is True
    assert_error(
        call(sim, "POST", f"/v1/generations/{gen_id}/stop", agent=None), 422, "job_cannot_be_stopped"
    )

    r = call(sim, "POST", f"/v1/generations/{gen_id}/continue", agent=None)
    assert (r.status_code, r.json()) == (200, {"generation_id": gen_id, "status": "pending"})
    assert poll(sim, gen_id)["status"] == "pending"  # the clock restarted
    wait_for(sim, gen_id, "completed")
    assert_error(
        call(sim, "POST", f"/v1/generations/{gen_id}/stop", agent=None), 422, "job_cannot_be_stopped"
    )
    cont = call(sim, "POST", f"/v1/generations/{gen_id}/continue", agent=None)
    assert_error(cont, 422, "validation_error", "Generation cannot be stopped/continued in its current state")

    stats = sim.stats()
    assert stats["stops"] == [gen_id, gen_id, gen_id]
    assert (stats["generations_created"], stats["charges"]) == (1, 2)
    assert sim.generation(gen_id)["continues"] == 1


def test_stop_a_failed_generation(sim: GenSimulator) -> None:
    sim.fail_next()
    gen_id = generate(sim, old_body())
    wait_for(sim, gen_id, "failed")
    assert_error(
        call(sim, "POST", f"/v1/generations/{gen_id}/stop", agent=None), 422, "job_cannot_be_stopped"
    )
    assert sim.generation(gen_id)["stopped_by_api"] is False


def test_cell_and_layer_history(sim: GenSimulator) -> None:
    cell_jobs = [generate(sim, old_body(), CELL) for _ in range(2)]
    layer_job = generate(sim, new_body(sim), V_LAYER)
    cell = call(sim, "GET", V_CELL).json()
    assert [j["id"] for j in cell["user_jobs"]] == cell_jobs[::-1]  # newest first
    assert cell["default_user_job"] is None
    assert {"id", "value", "additional_attributes", "cell_role", "created_at_ts", "updated_at_ts"} <= set(
        cell
    )
    assert cell["video_layers"][0]["id"] == 4000
    assert [j["id"] for j in cell["video_layers"][0]["user_jobs"]] == [layer_job]

    wait_for(sim, cell_jobs[1], "completed")
    sim.durations = {"gen": 30.0}  # a later, still running job must not become the default
    running = generate(sim, old_body(), CELL)
    cell = call(sim, "GET", CELL).json()
    assert cell["user_jobs"][0]["id"] == running
    assert cell["default_user_job"]["id"] == cell_jobs[1]
    assert cell["default_user_job"]["output_resources"]

    layer = call(sim, "GET", LAYER).json()
    assert layer["id"] == 4000 and layer["default_user_job"]["id"] == layer_job
    assert {"name", "position", "type", "additional_attributes", "execution_cost"} <= set(layer)


def test_content_resources_and_uploads(sim: GenSimulator) -> None:
    cases = [("5001", "video/mp4", "mp4"), ("video_res_123", "video/mp4", "mp4"), (6099, "audio/mpeg", "mp3")]
    for rid, ctype, ext in cases:
        r = call(sim, "GET", f"/v1/content_resources/{rid}")
        assert r.status_code == 200
        res = r.json()["content_resource"]
        assert res["content_type"] == ctype
        assert res["url"] == f"{sim.base_url}/cdn/uploads/{rid}.{ext}"
        assert r.json()["generator"] is None
        media_r = requests.get(res["url"], timeout=10)
        assert media_r.headers["Content-Type"] == ctype
    upload = requests.get(f"{sim.base_url}/cdn/uploads/5001.mp4", timeout=10).content
    assert media.walk_boxes(upload)[0].kind == "ftyp"
    assert requests.get(f"{sim.base_url}/cdn/uploads/5001.mp3", timeout=10).status_code == 404
    assert requests.get(f"{sim.base_url}/cdn/uploads/6001.mp3", timeout=10).content[:2] == b"\xff\xfb"


# ------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------


def test_429_with_and_without_retry_after(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="get_generation", status=429, retry_after=2))
    sim.add_fault(Fault(endpoint="get_generation", status=429))
    first = call(sim, "GET", "/v1/generations/1", agent=None)
    assert_error(first, 429, "rate_limited")
    assert first.headers["Retry-After"] == "2"
    second = call(sim, "GET", "/v1/generations/1", agent=None)
    assert_error(second, 429, "rate_limited")
    assert "Retry-After" not in second.headers
    assert call(sim, "GET", "/v1/generations/1", agent=None).status_code == 404  # faults used up


def test_5xx_burst_then_success(sim: GenSimulator) -> None:
    gen_id = generate(sim, old_body())
    fault = sim.add_fault(Fault(endpoint="get_generation", status=503, times=3))
    assert fault.times == 3
    codes = [call(sim, "GET", f"/v1/generations/{gen_id}", agent=None).status_code for _ in range(4)]
    assert codes == [503, 503, 503, 200]
    log = [r for r in sim.stats()["requests"] if r["endpoint"] == "get_generation"]
    assert [(r["status"], r["faulted"]) for r in log] == [(503, True)] * 3 + [(200, False)]
    assert sim.stats()["counts"]["get_generation"] == 4
    assert_error(call(sim, "GET", "/v1/generations/1", agent=None), 404, "not_found")


def test_fault_status_error_bodies(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="generate", status=500))
    sim.add_fault(Fault(endpoint="generate", status=502))
    assert_error(call(sim, "POST", LAYER + "/generate", json=old_body()), 500, "internal_error")
    assert_error(call(sim, "POST", LAYER + "/generate", json=old_body()), 502, "internal_error")
    assert sim.stats()["generations_created"] == 0  # a faulted submit never reached GEN


def test_delay(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="get_cell", delay=0.3))
    start = time.monotonic()
    r = call(sim, "GET", CELL)
    assert r.status_code == 200 and r.json()["id"] == 3000
    assert time.monotonic() - start >= 0.3
    with pytest.raises(requests.ReadTimeout):
        sim.add_fault(Fault(endpoint="get_cell", delay=1.0))
        requests.get(sim.base_url + CELL, params={"agent_id": 42}, headers={"X-API-Key": KEY}, timeout=0.2)


def test_drop(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="stop", drop=True))
    with pytest.raises(requests.ConnectionError):
        call(sim, "POST", "/v1/generations/9001/stop", agent=None)
    assert sim.stats()["requests"][-1] | {"t": 0} == {
        "t": 0,
        "method": "POST",
        "path": "/v1/generations/9001/stop",
        "endpoint": "stop",
        "status": None,
        "idempotency_key": None,
        "faulted": True,
    }
    assert sim.stats()["stops"] == []  # dropped before it reached GEN


def test_drop_on_a_pooled_connection_then_reconnect(sim: GenSimulator) -> None:
    with requests.Session() as session:
        session.headers["X-API-Key"] = KEY
        url = sim.base_url + CELL
        assert session.get(url, params={"agent_id": 42}, timeout=5).status_code == 200
        sim.add_fault(Fault(endpoint="get_cell", drop=True))
        with pytest.raises(requests.ConnectionError):
            session.get(url, params={"agent_id": 42}, timeout=5)
        assert session.get(url, params={"agent_id": 42}, timeout=5).status_code == 200


def test_malformed(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="get_generation", malformed=True))
    r = call(sim, "GET", "/v1/generations/9001", agent=None)
    assert r.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        r.json()


def test_body_override(sim: GenSimulator) -> None:
    gen_id = generate(sim, old_body())
    sim.add_fault(Fault(endpoint="get_generation", body={"id": 1, "status": "exploded"}))
    sim.add_fault(Fault(endpoint="get_generation", body=[1, 2]))
    assert poll(sim, gen_id) == {"id": 1, "status": "exploded"}
    assert call(sim, "GET", f"/v1/generations/{gen_id}", agent=None).json() == [1, 2]
    assert poll(sim, gen_id)["id"] == gen_id


def _completed_output(sim: GenSimulator) -> tuple[int, str]:
    gen_id = generate(sim, old_body())
    return gen_id, wait_for(sim, gen_id, "completed")["output_resources"][0]["url"]


def test_reset_after_bytes(sim: GenSimulator) -> None:
    _, url = _completed_output(sim)
    sim.add_fault(Fault(endpoint="cdn", reset_after_bytes=3000, times=2))
    with requests.get(url, stream=True, timeout=5) as r:
        assert r.status_code == 200 and r.headers["Content-Length"] == str(SIZE)
        received = bytearray()
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in r.iter_content(1024):
                received += chunk
        assert 0 < len(received) <= 3000  # urllib3 may discard the partial last chunk
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=5)
    assert len(requests.get(url, timeout=5).content) == SIZE


def test_trickle(sim: GenSimulator) -> None:
    sim.output_size = 5 * 1024
    gen_id, url = _completed_output(sim)
    sim.add_fault(Fault(endpoint="cdn", trickle=0.1))
    start = time.monotonic()
    body = requests.get(url, timeout=5).content
    assert time.monotonic() - start >= 0.35  # 5 chunks, 4 pauses
    assert body == sim.output_bytes(gen_id)
    # A client with a read timeout shorter than the gap between chunks gives up.
    sim.add_fault(Fault(endpoint="cdn", trickle=1.0))
    with pytest.raises(requests.ConnectionError), requests.get(url, stream=True, timeout=0.3) as r:
        r.content  # noqa: B018 - reading is the point


def test_accept_then_drop_is_an_ambiguous_submit(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="generate", accept_then_drop=True))
    hdr = {"Idempotency-Key": "ambiguous"}
    with pytest.raises(requests.ConnectionError):
        call(sim, "POST", LAYER + "/generate", json=old_body(), headers=hdr)
    stats = sim.stats()
    assert stats["generations_created"] == 1
    [created] = stats["generations_by_key"]["ambiguous"]
    assert stats["requests"][-1]["status"] is None and stats["requests"][-1]["faulted"] is True
    r = call(sim, "POST", LAYER + "/generate", json=old_body(), headers=hdr)
    assert (r.status_code, r.json()) == (201, {"generation_id": created, "status": "pending"})
    assert (sim.stats()["generations_created"], sim.stats()["charges"]) == (1, 1)


def test_fault_order_times_none_and_any(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="any", status=503, times=None))
    sim.add_fault(Fault(endpoint="get_cell", status=429))
    for path in (CELL, LAYER, "/v1/generations/1"):
        assert call(sim, "GET", path).status_code == 503  # the first armed fault wins every time
    assert len(sim.faults()) == 2 and sim.faults()[0]["remaining"] is None
    sim.clear_faults()
    assert call(sim, "GET", CELL).status_code == 200
    # An "any" stream fault waits for a CDN request instead of being spent on API calls.
    sim.add_fault(Fault(endpoint="any", reset_after_bytes=10))
    gen_id, url = _completed_output(sim)
    assert sim.faults()[0]["remaining"] == 1
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(url, timeout=5)
    assert sim.faults() == []
    assert poll(sim, gen_id)["status"] == "completed"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"endpoint": "nope", "status": 500},
        {"endpoint": "cdn"},
        {"endpoint": "cdn", "status": 500, "drop": True},
        {"endpoint": "get_generation", "reset_after_bytes": 10},
        {"endpoint": "get_generation", "accept_then_drop": True},
        {"endpoint": "cdn", "retry_after": 1},
        {"endpoint": "cdn", "status": 500, "times": 0},
        {"endpoint": "cdn", "trickle": 0},
    ],
)
def test_invalid_faults_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid Fault"):
        Fault(**kwargs)


# ------------------------------------------------------------------------------------------
# Admin API, stats, lifecycle of the server
# ------------------------------------------------------------------------------------------


def test_http_admin_api(sim: GenSimulator) -> None:
    admin = sim.base_url + "/_sim"
    r = requests.post(admin + "/faults", json={"endpoint": "get_cell", "status": 503, "times": 2}, timeout=5)
    assert r.status_code == 201 and r.json()["fault"]["status"] == 503
    assert requests.post(admin + "/faults", json={"endpoint": "x"}, timeout=5).status_code == 422
    assert (
        requests.post(admin + "/faults", json={"endpoint": "cdn", "bogus": 1}, timeout=5).status_code == 422
    )
    assert call(sim, "GET", CELL).status_code == 503
    assert requests.delete(admin + "/faults", timeout=5).json() == {"cleared": 1}
    assert call(sim, "GET", CELL).status_code == 200

    assert requests.post(admin + "/fail_next", json={"n": 1, "reason": "Bad audio"}, timeout=5).ok
    gen_id = generate(sim, old_body())
    assert wait_for(sim, gen_id, "failed")["failed_reason"] == "Bad audio"
    snap = requests.get(f"{admin}/generations/{gen_id}", timeout=5).json()
    assert snap["status"] == "failed" and snap["model"] == "gen"
    assert requests.get(f"{admin}/generations/1", timeout=5).status_code == 404

    stats = requests.get(admin + "/stats", timeout=5).json()
    assert stats["counts"]["get_cell"] == 2 and stats["generations_created"] == 1
    assert not any(r["path"].startswith("/_sim") for r in stats["requests"])  # admin is not logged

    config = requests.post(
        admin + "/config", json={"output_size": 4096, "durations": {"gen": 0.1}}, timeout=5
    )
    assert config.json()["output_size"] == 4096 and sim.output_size == 4096
    assert requests.post(admin + "/config", json={"output_size": -1}, timeout=5).status_code == 422

    assert requests.post(admin + "/reset", timeout=5).ok
    assert sim.stats()["generations_created"] == 0 and sim.stats()["requests"] == []
    assert_error(call(sim, "GET", f"/v1/generations/{gen_id}", agent=None), 404, "not_found")
    assert requests.get(admin + "/health", timeout=5).json() == {"ok": True, "base_url": sim.base_url}


def test_request_log(sim: GenSimulator) -> None:
    call(sim, "POST", LAYER + "/generate", json=old_body(), headers={"Idempotency-Key": "k1"})
    call(sim, "GET", CELL)
    call(sim, "PATCH", CELL, json={"additional_attributes": {"autoGenerate": True}})
    entries = sim.stats()["requests"]
    assert [(e["method"], e["path"], e["endpoint"], e["status"]) for e in entries] == [
        ("POST", LAYER + "/generate", "generate", 201),
        ("GET", CELL, "get_cell", 200),  # the query string is not part of the path
        ("PATCH", CELL, "patch_cell", 200),
    ]
    assert entries[0]["idempotency_key"] == "k1" and entries[1]["idempotency_key"] is None
    assert all(isinstance(e["t"], float) and e["faulted"] is False for e in entries)
    json.dumps(sim.stats())  # JSON-able


def test_stop_disconnects_clients() -> None:
    sim = GenSimulator(api_key=KEY).start()
    url = sim.base_url + CELL
    session = requests.Session()
    assert session.get(url, params={"agent_id": 42}, headers={"X-API-Key": KEY}, timeout=5).ok
    sim.stop()
    with pytest.raises(requests.ConnectionError):
        session.get(url, params={"agent_id": 42}, headers={"X-API-Key": KEY}, timeout=5)
    sim.stop()  # idempotent
    with pytest.raises(RuntimeError):
        GenSimulator().base_url  # noqa: B018 - the property raises before start


def test_cli_prints_base_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gensim", "--port", "0", "--api-key", "K", "--gen-seconds", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        r = requests.get(
            base_url + "/v1/vidsheet/101/cells/3000", params={"agent_id": 42}, headers={"X-API-Key": "K"}
        )
        assert r.status_code == 200
        assert requests.get(base_url + "/_sim/config", timeout=5).json()["durations"]["gen"] == 1.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------
# Pure logic and media
# ------------------------------------------------------------------------------------------


def test_lifecycle_boundaries_with_a_fake_clock() -> None:
    now = [100.0]
    state = SimState(stats=Stats(), durations={"gen": 10.0}, clock=lambda: now[0])

    def create(agent: Any) -> tuple[dict[str, Any], bool]:
        return state.create_generation(
            agent=agent,
            prefix="vidsheet",
            sheet="101",
            cell="3000",
            layer=None,
            body=old_body(),
            idempotency_key="k",
        )

    created, _ = create(42)
    gen_id = str(created["generation_id"])
    steps = [(101.99, "pending"), (102.0, "processing"), (109.99, "processing"), (110.0, "completed")]
    for t, status in steps:
        now[0] = t
        assert state.get_generation(gen_id)["status"] == status
    # Keys are remembered for 24 hours, then the same key makes a new generation.
    now[0] = 100.0 + 24 * 3600 - 1
    again, replayed = create("42")
    assert replayed and again == created
    now[0] = 100.0 + 24 * 3600 + 1
    later, replayed = create("42")
    assert not replayed and later["generation_id"] != created["generation_id"]


def _box_paths(boxes: tuple[media.Box, ...] | list[media.Box], parent: str = "") -> list[str]:
    paths: list[str] = []
    for box in boxes:
        paths.append(parent + box.kind)
        paths += _box_paths(box.children, f"{parent}{box.kind}/")
    return paths


def test_mp4_box_structure() -> None:
    data = media.build_mp4("lipsynced-9001-abc", 64_000)
    assert len(data) == 64_000
    boxes = media.walk_boxes(data)
    assert sum(b.size for b in boxes) == len(data)
    stbl = "moov/trak/mdia/minf/stbl"
    assert _box_paths(boxes) == [
        "ftyp",
        "free",
        "moov",
        "moov/mvhd",
        "moov/trak",
        "moov/trak/tkhd",
        "moov/trak/mdia",
        "moov/trak/mdia/mdhd",
        "moov/trak/mdia/hdlr",
        "moov/trak/mdia/minf",
        "moov/trak/mdia/minf/vmhd",
        "moov/trak/mdia/minf/dinf",
        "moov/trak/mdia/minf/dinf/dref",
        stbl,
        *(f"{stbl}/{kind}" for kind in ("stsd", "stts", "stsc", "stsz", "stco")),
        "mdat",
    ]

    # Every container's children tile it exactly.
    def check(box: media.Box) -> None:
        if box.children:
            assert box.children[0].offset == box.offset + 8
            assert sum(c.size for c in box.children) == box.size - 8
            for child in box.children:
                check(child)

    for box in boxes:
        check(box)
    ftyp = boxes[0]
    assert data[ftyp.offset + 8 : ftyp.offset + 12] == b"isom"
    assert b"mp42" in data[ftyp.offset + 16 : ftyp.offset + ftyp.size]
    assert b"lipsynced-9001-abc" in data[boxes[1].offset : boxes[1].offset + boxes[1].size]

    # stco points at the first sample, which sits at the start of mdat's payload, and stsz says
    # how long it is: a length-prefixed IDR NAL unit.
    stbl_box = boxes[2].children[1].children[1].children[2].children[2]
    stsz = next(b for b in stbl_box.children if b.kind == "stsz")
    stco = next(b for b in stbl_box.children if b.kind == "stco")
    (sample_size,) = struct.unpack_from(">I", data, stsz.offset + 20)
    (chunk_offset,) = struct.unpack_from(">I", data, stco.offset + 16)
    mdat = boxes[3]
    assert chunk_offset == mdat.offset + 8
    (nal_length,) = struct.unpack_from(">I", data, chunk_offset)
    assert nal_length + 4 == sample_size
    assert data[chunk_offset + 4] & 0x1F == 5  # IDR slice


def test_mp4_is_deterministic_and_sized() -> None:
    assert media.build_mp4("a", 10_000) == media.build_mp4("a", 10_000)
    assert media.build_mp4("a", 10_000) != media.build_mp4("b", 10_000)
    smallest = media.minimal_mp4_size("a")
    assert len(media.build_mp4("a", 10)) == smallest  # never smaller than a valid file
    assert len(media.build_mp4("a", smallest + 1)) == smallest + 1
    media.walk_boxes(media.build_mp4("a", smallest + 1))
    with pytest.raises(ValueError, match="bad size"):
        media.walk_boxes(media.build_mp4("a", 10_000)[:-1])


def test_jpeg_segments() -> None:
    data = media.build_jpeg()
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    pos, markers = 2, []
    while data[pos + 1] != 0xDA:  # walk the segments up to the scan
        assert data[pos] == 0xFF
        markers.append(data[pos + 1])
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
    assert markers == [0xE0, 0xDB, 0xC0, 0xC4, 0xC4]


def test_every_route_kind_is_a_fault_target_and_counted() -> None:
    from gensim.endpoints import ENDPOINT_KINDS
    from gensim.faults import FAULT_ENDPOINTS
    from gensim.server import ROUTES
    from gensim.stats import KNOWN_KINDS

    routed = {kind for _, _, kind in ROUTES}
    assert routed == set(ENDPOINT_KINDS)
    assert routed <= FAULT_ENDPOINTS and routed <= set(KNOWN_KINDS)


def test_a_fault_on_patch_cell(sim: GenSimulator) -> None:
    sim.add_fault(Fault(endpoint="patch_cell", status=503, times=1))
    first = call(sim, "PATCH", CELL, json={"additional_attributes": {"autoGenerate": True}})
    again = call(sim, "PATCH", CELL, json={"additional_attributes": {"autoGenerate": True}})
    assert (first.status_code, again.status_code) == (503, 200)


def test_a_duration_sampler_sets_each_new_generations_duration() -> None:
    now = [0.0]
    state = SimState(stats=Stats(), durations={"gen": 10.0}, clock=lambda: now[0])
    drawn = iter([3.0, 7.0])
    state.duration_sampler = lambda model: next(drawn) if model == "gen" else 99.0
    ids = []
    for cell in ("3000", "3001"):
        created, _ = state.create_generation(
            agent=42,
            prefix="vidsheet",
            sheet="101",
            cell=cell,
            layer=None,
            body=old_body(),
            idempotency_key=cell,
        )
        ids.append(str(created["generation_id"]))
    now[0] = 5.0  # 3 s + the 2 s pending phase: the first is done, the second (7 s) is not
    assert [state.get_generation(i)["status"] for i in ids] == ["completed", "processing"]
    state.duration_sampler = None
    assert state.duration_for("gen") == 10.0
