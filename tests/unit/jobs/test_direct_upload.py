"""Sources over the multipart limit (lowered here to a few KiB) go to GEN by its 3-step direct upload;
counted from what the simulator saw (its request log, the blobs and the headers of their PUTs)."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from gensim import Fault, GenSimulator
from tests.unit.conftest import API_KEY, ResFactory
from worker.gen.errors import GenRejected
from worker.jobs import steps
from worker.jobs.models import Job
from worker.jobs.resources import Resources
from worker.jobs.uploads import SourceTooLarge
from worker.retry import is_retryable

TARGET = {"sheet_id": 101, "cell_id": 3000, "layer_id": 4000}


def source_url(sim: GenSimulator) -> str:
    return f"{sim.base_url}/cdn/uploads/5001.mp4"


def kinds(sim: GenSimulator) -> list[str]:
    return [r["endpoint"] for r in sim.stats()["requests"] if r["endpoint"] != "cdn"]


def submit(res: Resources, request: dict[str, Any], job_id: str) -> Job:
    started = steps.create({**TARGET, "job_id": job_id, **request}, task_id=job_id, res=res)
    submitted = steps.submit(started.job, res, record=started.record)
    assert isinstance(submitted, Job)
    return submitted


def direct_res(make_res: ResFactory, sim: GenSimulator) -> tuple[Resources, bytes]:
    """Resources whose multipart limit is one byte below the video source's size."""
    source = requests.get(source_url(sim), timeout=10).content
    return make_res(gen_dialect="autocontentengine", gen_multipart_max_bytes=len(source) - 1), source


def test_a_source_just_over_the_multipart_limit_goes_through_the_three_steps(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    res, source = direct_res(make_res, sim)
    submitted = submit(res, {"video_url": source_url(sim), "audio_resource_id": 6001}, "du-1")

    assert kinds(sim) == ["direct_upload", "direct_upload_put", "create_content_resource", "generate"]
    (blob,) = sim.direct_uploads()
    md5 = base64.b64encode(hashlib.md5(source).digest()).decode()
    assert (blob["byte_size"], blob["checksum"], blob["content_type"]) == (len(source), md5, "video/mp4")
    assert blob["filename"] == "5001.mp4" and blob["uploaded"] is True
    (put_headers,) = blob["puts"]
    assert put_headers["Content-MD5"] == md5
    uploaded = submitted.request.video_resource_id
    assert uploaded is not None and submitted.request.video_url is None
    assert sim.uploaded(uploaded) == source
    assert submitted.generation_id is not None
    assert sim.generation(submitted.generation_id)["video"] == uploaded


def test_a_source_at_the_multipart_limit_is_still_uploaded_multipart(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    source = requests.get(source_url(sim), timeout=10).content
    res = make_res(gen_dialect="autocontentengine", gen_multipart_max_bytes=len(source))
    submitted = submit(res, {"video_url": source_url(sim), "audio_resource_id": 6001}, "du-2")
    assert kinds(sim) == ["upload_content_resource", "generate"]
    assert submitted.request.video_resource_id is not None
    assert sim.uploaded(submitted.request.video_resource_id) == source
    assert sim.direct_uploads() == []


def test_the_api_key_never_reaches_the_put(make_res: ResFactory, sim: GenSimulator) -> None:
    res, _ = direct_res(make_res, sim)
    submit(res, {"video_url": source_url(sim), "audio_resource_id": 6001}, "du-3")
    (blob,) = sim.direct_uploads()
    (put_headers,) = blob["puts"]
    assert put_headers  # the PUT did arrive, with headers to look at
    assert "x-api-key" not in {name.lower() for name in put_headers}
    assert not any(API_KEY in value for value in put_headers.values())
    assert put_headers["Content-Type"] == "video/mp4"


@pytest.mark.parametrize(
    ("endpoint", "status"),
    [
        ("direct_upload", 422),
        # What S3 answers when the bytes do not match Content-MD5 (BadDigest).
        ("direct_upload_put", 400),
        ("create_content_resource", 422),
    ],
)
def test_a_refused_step_fails_the_job_clearly_and_nothing_is_generated(
    make_res: ResFactory, sim: GenSimulator, endpoint: str, status: int
) -> None:
    res, _ = direct_res(make_res, sim)
    sim.add_fault(Fault(endpoint=endpoint, status=status, times=1))
    with pytest.raises(GenRejected) as refused:
        submit(res, {"video_url": source_url(sim), "audio_resource_id": 6001}, f"du-{endpoint}")
    assert (refused.value.status_code, refused.value.endpoint) == (status, endpoint)
    assert not is_retryable(refused.value)
    seen = kinds(sim)
    assert seen[-1] == endpoint and "generate" not in seen
    record = res.jobs.get(f"du-{endpoint}")
    assert record is not None and record.generation_id is None


def test_bytes_that_do_not_match_the_checksum_are_refused_by_the_put_and_fail_the_job(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    res, source = direct_res(make_res, sim)
    # GEN hands out a blob whose checksum is not the file's: the simulator's PUT checks Content-MD5
    # against the bytes it gets, as S3 does, and refuses them (400 bad_digest).
    wrong = base64.b64encode(hashlib.md5(b"another file").digest()).decode()
    blob = {"filename": "5001.mp4", "byte_size": len(source), "checksum": wrong, "content_type": "video/mp4"}
    answer = requests.post(
        f"{sim.base_url}/v1/direct_upload", json={"blob": blob}, headers={"X-API-Key": API_KEY}, timeout=10
    ).json()
    sim.add_fault(Fault(endpoint="direct_upload", body=answer, times=1))
    with pytest.raises(GenRejected) as refused:
        submit(res, {"video_url": source_url(sim), "audio_resource_id": 6001}, "du-md5")
    assert (refused.value.status_code, refused.value.endpoint) == (400, "direct_upload_put")
    assert "bad_digest" in str(refused.value)
    (seen,) = sim.direct_uploads()
    assert seen["uploaded"] is False and seen["puts"][0]["Content-MD5"] == wrong
    assert "create_content_resource" not in kinds(sim) and "generate" not in kinds(sim)


class _HugeSource(BaseHTTPRequestHandler):
    """Says it is 1 GiB + 1 byte long, then sends until the client hangs up (at most 64 MiB)."""

    sent = 0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.connection.settimeout(10)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(1024**3 + 1))
        self.end_headers()
        chunk = b"\0" * 65536
        try:
            while type(self).sent < 64 * 1024 * 1024:
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except OSError:
            self.close_connection = True


@pytest.fixture
def huge_source() -> Iterator[str]:
    _HugeSource.sent = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HugeSource)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/huge.mp4"
    finally:
        server.shutdown()
        server.server_close()


def test_a_source_over_one_gib_is_refused_without_downloading_it(
    make_res: ResFactory, sim: GenSimulator, huge_source: str
) -> None:
    res = make_res(gen_dialect="autocontentengine", gen_multipart_max_bytes=1024)
    with pytest.raises(SourceTooLarge) as refused:
        submit(res, {"video_url": huge_source, "audio_resource_id": 6001}, "du-huge")
    assert refused.value.error_code == "source_too_large"
    # Refused on its Content-Length: only what the socket buffers took was ever sent.
    assert _HugeSource.sent < 32 * 1024 * 1024
    assert kinds(sim) == []
