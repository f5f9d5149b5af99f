"""A GEN event naming a card's cell or layer: its sources are read from GEN (the simulator, where a
test changes them) and acted on as a change; what GEN shows already changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gensim import GenSimulator
from tests.unit.conftest import queued
from worker.cards import flow
from worker.cards.gen_sources import sources_in
from worker.cards.models import Sources, Target
from worker.cards.store import CardStore
from worker.celery_queue import CeleryQueue
from worker.events.receiver import EventReceiver, EventServer
from worker.jobs.resources import Resources
from worker.names import QUEUE_JOBS, TASK_REREAD

TOKEN = "unit-cards-TOKEN-51aa0c7e"
LAYER = Target(sheet_id="101", cell_id="3000", layer_id="4000")
CELL = Target(sheet_id="101", cell_id="3001")


def card(res: Resources, target: Target) -> None:
    flow.configure(res, {**target.model_dump(exclude_none=True), "autoGenerate": True, "debounce_seconds": 1})


def test_sources_are_read_from_the_cards_attributes() -> None:
    newer = {"additional_attributes": {"talking_avatar_video_data": {"video": {"value": "https://a/v.mp4"}}}}
    assert sources_in(newer) == Sources(video_url="https://a/v.mp4")
    older = {"additional_attributes": {"video_resource_id": 5001, "audio_resource_id": "6001"}}
    assert sources_in(older) == Sources(video_resource_id="5001", audio_resource_id="6001")
    nothing: list[dict[str, Any]] = [
        {},
        {"additional_attributes": {"lipSyncModel": "gen"}},
        {"additional_attributes": []},
    ]
    for document in nothing:
        assert sources_in(document) is None


def test_rereading_acts_on_what_gen_shows_and_only_when_it_changed(res: Resources, sim: GenSimulator) -> None:
    card(res, LAYER)
    assert flow.reread(res, LAYER).action == "no_sources"
    sim.set_sources(101, 3000, 4000, video=5001, audio=6001)
    first = flow.reread(res, LAYER)
    assert (first.action, first.seq) == ("scheduled", 1)
    sources = CardStore(res.redis).state(LAYER).sources
    assert sources is not None and sources.video_url is not None and sources.video_url.endswith("/5001.mp4")
    assert flow.reread(res, LAYER).action == "unchanged"
    sim.set_sources(101, 3000, 4000, audio=6002)
    assert (flow.reread(res, LAYER).action, CardStore(res.redis).state(LAYER).seq) == ("scheduled", 2)


def test_the_simulator_changes_sources_over_http(sim: GenSimulator) -> None:
    answer = requests.post(
        f"{sim.base_url}/_sim/sources", json={"sheet_id": 101, "cell_id": 3001, "audio": 6003}
    )
    assert answer.status_code == 200
    assert sources_in(answer.json()) == Sources(audio_url=f"{sim.base_url}/cdn/uploads/6003.mp3")
    refused = requests.post(f"{sim.base_url}/_sim/sources", json={"sheet_id": 101, "cell_id": 3001})
    assert refused.status_code == 422


@pytest.fixture
def server(res: Resources, queue: CeleryQueue) -> Iterator[EventServer]:
    running = EventServer(EventReceiver(queue, res, token=TOKEN, max_body=4096), "127.0.0.1", 0).start()
    yield running
    running.stop()


def rereads(res: Resources) -> list[dict[str, Any]]:
    return [m for m in queued(res, QUEUE_JOBS) if m["task"] == TASK_REREAD]


def test_a_gen_event_naming_a_cards_cell_or_layer_rereads_it(server: EventServer, res: Resources) -> None:
    card(res, LAYER)
    card(res, CELL)
    url = f"http://127.0.0.1:{server.port}/gen-events/{TOKEN}"
    answer = requests.post(url, json={"event": "cell.updated", "cell_id": 3001}, timeout=10)
    assert answer.json()["outcome"] == "matched"
    requests.post(url, json={"event": "layer.updated", "layer": {"id": 4000}}, timeout=10)
    requests.post(url, json={"event": "cell.updated", "cell_id": 3050}, timeout=10)
    assert [m["kwargs"]["target"] for m in rereads(res)] == ["101.3001", "101.3000.4000"]
