"""The GEN client against the local GEN simulator (real HTTP on 127.0.0.1, no external network)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from worker.gen.client import GenClient, idempotency_key_for
from worker.gen.errors import GenAuthError, GenNotFound, GenNotStoppable, GenRateLimited, GenRejected
from worker.gen.models import TERMINAL_STATUSES, Generation
from worker.names import Dialect, LipsyncModel

try:
    from gensim import GenSimulator
except ImportError:  # pragma: no cover - the simulator is optional for these unit tests
    pytest.skip("gensim.GenSimulator is not available", allow_module_level=True)

KEY = "sk-SIM-KEY"
AGENT = "42"
SHEET = "101"
DIALECTS: list[Dialect] = ["autocontentengine", "vidsheet"]

# Each test takes its own cell (3000-3099), so no two tests share a cell's generation history.
_cells = itertools.count(3000)


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    simulator = GenSimulator(
        api_key=KEY, agent_ids=(AGENT,), durations={"gen": 0.3, "sync_so": 0.6}, strict_dialect=True
    ).start()
    try:
        yield simulator
    finally:
        simulator.stop()


def _client(sim: Any, dialect: Dialect, *, api_key: str = KEY, agent_id: str = AGENT) -> GenClient:
    return GenClient(base_url=sim.base_url, api_key=api_key, agent_id=agent_id, dialect=dialect)


def _cell() -> str:
    cell = next(_cells)
    assert cell <= 3099, "the simulator seeds cells 3000-3099 only"
    return str(cell)


def _submit(
    client: GenClient, cell: str, *, layer: bool, model: LipsyncModel = "gen", key: str | None = None
) -> str:
    accepted = client.generate_lipsync(
        sheet_id=SHEET,
        cell_id=cell,
        layer_id=str(int(cell) + 1000) if layer else None,
        model=model,
        # 5001/6001: plain resources (the simulator makes 5098 hang and 5099 fail).
        video_resource_id="5001",
        audio_resource_id="6001",
        idempotency_key=key or idempotency_key_for(f"sim-{cell}-{layer}"),
    )
    assert accepted.status == "pending"
    return accepted.generation_id


def _wait(client: GenClient, generation_id: str, timeout: float = 15.0) -> Generation:
    deadline = time.monotonic() + timeout
    while True:
        generation = client.get_generation(generation_id)
        if generation.status in TERMINAL_STATUSES or time.monotonic() > deadline:
            return generation
        time.sleep(0.05)


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("layer", [False, True], ids=["cell", "layer"])
def test_generate_and_poll_to_completion(sim: Any, dialect: Dialect, layer: bool) -> None:
    cell = _cell()
    with _client(sim, dialect) as client:
        generation_id = _submit(client, cell, layer=layer)
        generation = _wait(client, generation_id)
        assert generation.id == generation_id
        assert generation.status == "completed"
        assert generation.output_resources
        assert generation.output_resources[0].url.startswith("http")

        target = (
            client.get_layer(SHEET, cell, str(int(cell) + 1000)) if layer else client.get_cell(SHEET, cell)
        )
        job_ids = {str(job.get("id")) for job in target.get("user_jobs") or [] if isinstance(job, dict)}
        assert generation_id in job_ids


@pytest.mark.parametrize("dialect", DIALECTS)
def test_same_idempotency_key_same_generation(sim: Any, dialect: Dialect) -> None:
    cell = _cell()
    with _client(sim, dialect) as client:
        key = idempotency_key_for(f"idem-{cell}")
        first = _submit(client, cell, layer=False, key=key)
        second = _submit(client, cell, layer=False, key=key)
        assert first == second


@pytest.mark.parametrize("dialect", DIALECTS)
def test_stop_then_not_stoppable(sim: Any, dialect: Dialect) -> None:
    cell = _cell()
    with _client(sim, dialect) as client:
        generation_id = _submit(client, cell, layer=False, model="sync_so")
        client.stop_generation(generation_id)
        assert _wait(client, generation_id).status == "stopped"
        with pytest.raises(GenNotStoppable) as info:
            client.stop_generation(generation_id)
        assert info.value.status_code == 422


@pytest.mark.parametrize("dialect", DIALECTS)
def test_error_mapping_against_the_simulator(sim: Any, dialect: Dialect) -> None:
    with _client(sim, dialect) as client:
        with pytest.raises(GenNotFound):
            client.get_generation("987654321")
        with pytest.raises(GenNotFound):
            client.get_cell(SHEET, "9999")
    with _client(sim, dialect, agent_id="999") as stranger, pytest.raises(GenRejected) as info:
        stranger.get_cell(SHEET, "3000")
    assert info.value.status_code == 422
    assert info.value.error_code == "agent_not_found"
    with _client(sim, dialect, api_key="wrong-key") as intruder, pytest.raises(GenAuthError) as auth:
        intruder.get_generation("1")
    assert auth.value.status_code == 401
    assert "wrong-key" not in str(auth.value)


# --------------------------------------------------------------------------------------------
# pacing: the caller's hook runs before every request (the job layer wires the fleet rate limit)
# --------------------------------------------------------------------------------------------


def test_the_pacer_is_asked_before_every_request_with_its_endpoint(sim: Any) -> None:
    asked: list[str] = []
    seen_before = len(sim.stats()["requests"])
    cell = _cell()
    with GenClient(
        base_url=sim.base_url, api_key=KEY, agent_id=AGENT, dialect="vidsheet", pace=asked.append
    ) as client:
        generation_id = _submit(client, cell, layer=False)
        client.get_generation(generation_id)
        client.stop_generation(generation_id)
        client.get_cell(SHEET, cell)
        client.get_layer(SHEET, cell, str(int(cell) + 1000))

    assert asked == [
        "get_content_resource",  # the vidsheet body takes URLs: two lookups, then generate
        "get_content_resource",
        "generate",
        "get_generation",
        "stop_generation",
        "get_cell",
        "get_layer",
    ]
    assert len(sim.stats()["requests"]) - seen_before == len(asked), "one request per pacer call"


def test_a_pacer_that_says_no_sends_nothing(sim: Any) -> None:
    def no_room(endpoint: str) -> None:
        raise GenRateLimited("no room in the fleet's budget", retry_after=3.0, endpoint=endpoint)

    seen_before = len(sim.stats()["requests"])
    with (
        GenClient(base_url=sim.base_url, api_key=KEY, agent_id=AGENT, pace=no_room) as client,
        pytest.raises(GenRateLimited) as info,
    ):
        client.get_content_resource("5001")
    assert info.value.retry_after == 3.0 and info.value.endpoint == "get_content_resource"
    assert len(sim.stats()["requests"]) == seen_before


def test_the_vidsheet_body_reuses_a_resource_url_for_a_few_minutes(sim: Any) -> None:
    client = _client(sim, "vidsheet")
    before = sim.stats()["counts"]["content_resource"]
    first = client.lipsync_body("gen", "5001", "6001")
    second = client.lipsync_body("gen", "5001", "6002")
    # Two lookups for the first body, one (the new audio) for the second: GEN saw three.
    assert sim.stats()["counts"]["content_resource"] - before == 3
    video = first["data"]["talking_avatar_video_data"]["video"]
    assert video == second["data"]["talking_avatar_video_data"]["video"]
