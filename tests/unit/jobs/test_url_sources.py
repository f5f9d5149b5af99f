"""Sources given by URL (``video_url`` / ``audio_url``): sent as they are in the vidsheet dialect,
refused up front in autocontentengine and by the URL guard; counted from what the simulator got."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from gensim import GenSimulator
from tests.unit.conftest import ResFactory
from worker.cards import flow
from worker.errors import RequestInvalid
from worker.jobs import steps
from worker.jobs.models import Job
from worker.jobs.resources import Resources

TARGET = {"sheet_id": 101, "cell_id": 3000, "layer_id": 4000}
VIDEO_URL = "https://media.example/takes/episode-12-take-3.mp4"


def fields_of(refused: pytest.ExceptionInfo[RequestInvalid]) -> list[str]:
    return [e["field"] for e in refused.value.errors]


def test_vidsheet_sends_a_source_url_to_gen_as_it_is(res: Resources, sim: GenSimulator) -> None:
    request: dict[str, Any] = {**TARGET, "job_id": "url-1", "video_url": VIDEO_URL, "audio_resource_id": 6001}
    started = steps.create(request, task_id="url-1", res=res)
    submitted = steps.submit(started.job, res, record=started.record)
    assert isinstance(submitted, Job) and submitted.generation_id is not None
    seen = sim.generation(submitted.generation_id)
    assert seen["video"] == VIDEO_URL
    assert seen["audio"].endswith("/6001.mp3")


def test_autocontentengine_uploads_a_source_url_to_gen_first_and_generates_with_its_id(
    make_res: ResFactory, sim: GenSimulator
) -> None:
    res = make_res(gen_dialect="autocontentengine")
    speech = f"{sim.base_url}/cdn/uploads/6001.mp3"
    request: dict[str, Any] = {**TARGET, "job_id": "up-1", "video_resource_id": 5001, "audio_url": speech}
    started = steps.create(request, task_id="up-1", res=res)
    submitted = steps.submit(started.job, res, record=started.record)
    assert isinstance(submitted, Job) and submitted.generation_id is not None
    uploaded = submitted.request.audio_resource_id
    assert uploaded is not None and submitted.request.audio_url is None
    assert sim.uploaded(uploaded) == requests.get(speech, timeout=10).content
    seen = sim.generation(submitted.generation_id)
    assert (seen["dialect"], seen["video"], seen["audio"]) == ("old", "5001", uploaded)
    # Recorded before the generate went out: a re-driven submit finds the id, never uploads again.
    record = res.jobs.get("up-1")
    assert record is not None and record.job is not None
    assert record.job["request"]["audio_resource_id"] == uploaded
    uploads = [r for r in sim.stats()["requests"] if r["endpoint"] == "upload_content_resource"]
    assert len(uploads) == 1


def test_autocontentengine_refuses_source_urls_when_uploads_are_off(make_res: ResFactory) -> None:
    res = make_res(gen_dialect="autocontentengine", gen_upload_sources=False)
    with pytest.raises(RequestInvalid) as refused:
        steps.create({**TARGET, "video_resource_id": 5001, "audio_url": VIDEO_URL}, task_id="u2", res=res)
    assert fields_of(refused) == ["audio_url"]
    assert res.jobs.get("u2") is None
    with pytest.raises(RequestInvalid) as refused_change:
        flow.record_change(res, {**TARGET, "audio_url": VIDEO_URL})
    assert fields_of(refused_change) == ["audio_url"]


@pytest.mark.parametrize(
    "url",
    ["ftp://media.example/take.mp4", "https://user:pw@media.example/take.mp4", "http://127.0.0.1:9/take.mp4"],
)
def test_a_source_url_must_pass_the_url_guard(make_res: ResFactory, url: str) -> None:
    res = make_res(allow_private_urls=False)
    with pytest.raises(RequestInvalid) as refused:
        steps.create({**TARGET, "video_url": url, "audio_resource_id": 6001}, task_id="u3", res=res)
    assert fields_of(refused) == ["video_url"]
    assert "URL guard" in str(refused.value)


def test_each_side_needs_a_resource_id_or_a_url_not_both(res: Resources) -> None:
    with pytest.raises(RequestInvalid) as missing:
        steps.create({**TARGET, "video_url": VIDEO_URL}, task_id="u4", res=res)
    assert fields_of(missing) == ["audio_resource_id"]
    both = {**TARGET, "video_url": VIDEO_URL, "video_resource_id": 5001, "audio_resource_id": 6001}
    with pytest.raises(RequestInvalid) as doubled:
        steps.create(both, task_id="u5", res=res)
    assert fields_of(doubled) == ["video_url"]
