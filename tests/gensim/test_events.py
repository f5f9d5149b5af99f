"""The simulator's agent events (gensim.events): automation_config, test_webhook, and a POST on each
status change, late by event_delay, lost at event_loss. Counted by a real HTTP collector on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from gensim import GenSimulator
from worker.dev.embedded_redis import free_port

pytestmark = pytest.mark.timeout(60)

KEY = "events-key"
CONFIG = "/v1/agents/42/automation_config"
DURATIONS = {"gen": 0.4, "sync_so": 0.8}
LAYER = "/v1/autocontentengine/101/cells/3000/layers/4000"
BODY = {
    "generation_type": "lipsync",
    "data": {"video_resource_id": 5001, "audio_resource_id": 6001, "model": "gen"},
}


@dataclass
class Collector:
    """An HTTP server that keeps every POST (arrival time, JSON body) and answers ``status``."""

    status: int = 204
    received: list[tuple[float, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def events(self) -> list[tuple[float, Any]]:
        with self.lock:
            return list(self.received)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    found = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with found.lock:
                found.received.append((time.time(), json.loads(body)))
            self.send_response(found.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    found.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=found.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[GenSimulator]:
    with GenSimulator(api_key=KEY, agent_ids=("42",), durations=DURATIONS) as sim:
        yield sim


@pytest.fixture
def sim(server: GenSimulator, collector: Collector) -> Iterator[GenSimulator]:
    server.reset()
    server.durations = DURATIONS
    server.event_delay, server.event_loss = 0.0, 0.0
    server.seed_events(None)
    collector.status = 204
    with collector.lock:
        collector.received.clear()
    yield server
    server.reset()


def call(sim: GenSimulator, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(
        method, sim.base_url + path, headers={"X-API-Key": KEY}, params={"agent_id": 42}, timeout=15, **kwargs
    )


def register(sim: GenSimulator, url: str | None) -> requests.Response:
    return call(sim, "PATCH", CONFIG, json={"automation_config": {"webhook_url": url}})


def generate(sim: GenSimulator) -> int:
    answer = call(sim, "POST", LAYER + "/generate", json=BODY)
    assert answer.status_code == 201
    return int(answer.json()["generation_id"])


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


# -- the automation config ----------------------------------------------------------------------


def test_the_webhook_url_is_set_shown_and_cleared(sim: GenSimulator, collector: Collector) -> None:
    assert call(sim, "GET", CONFIG).json()["automation_config"]["webhook_url"] is None
    answer = register(sim, collector.url)
    assert answer.status_code == 200
    assert answer.json() == {
        "automation_config": {"webhook_url": collector.url, "callback_url": None, "polling_enabled": True}
    }
    assert call(sim, "GET", CONFIG).json()["automation_config"]["webhook_url"] == collector.url
    assert register(sim, None).json()["automation_config"]["webhook_url"] is None
    counts = sim.stats()["counts"]
    assert (counts["automation_config"], counts["set_automation_config"]) == (2, 2)


@pytest.mark.parametrize(
    "body",
    [
        {"automation_config": {"webhook_url": "ftp://x.example/hook"}},
        {"automation_config": {"webhook_url": "not a url"}},
        {"automation_config": {"polling_enabled": "yes"}},
        {"automation_config": {}},
        ["not", "an", "object"],
    ],
)
def test_gen_refuses_what_it_would_refuse(sim: GenSimulator, body: Any) -> None:
    answer = call(sim, "PATCH", CONFIG, json=body)
    assert answer.status_code == 422 and answer.json()["error_code"] == "validation_error"
    assert call(sim, "GET", CONFIG).json()["automation_config"]["webhook_url"] is None


def test_an_unknown_agent_is_not_found(sim: GenSimulator, collector: Collector) -> None:
    path = "/v1/agents/999/automation_config"
    assert call(sim, "PATCH", path, json={"webhook_url": collector.url}).status_code == 404
    assert call(sim, "POST", path + "/test_webhook").status_code == 404


def test_reset_forgets_the_webhook(sim: GenSimulator, collector: Collector) -> None:
    register(sim, collector.url)
    sim.reset()
    assert call(sim, "GET", CONFIG).json()["automation_config"]["webhook_url"] is None


# -- test_webhook ---------------------------------------------------------------------------------


def test_test_webhook_posts_a_test_event(sim: GenSimulator, collector: Collector) -> None:
    assert call(sim, "POST", CONFIG + "/test_webhook").status_code == 422, "nothing configured yet"
    register(sim, collector.url)
    answer = call(sim, "POST", CONFIG + "/test_webhook")
    assert (answer.status_code, answer.json()) == (200, {"success": True})
    [(_, event)] = collector.events()
    assert event["event"] == "test" and event["agent_id"] == "42"


def test_test_webhook_reports_what_went_wrong(sim: GenSimulator, collector: Collector) -> None:
    register(sim, f"http://127.0.0.1:{free_port()}/nobody-listens")
    assert call(sim, "POST", CONFIG + "/test_webhook").json() == {
        "success": False,
        "error": "Connection refused",
    }
    register(sim, collector.url)
    collector.status = 500
    assert call(sim, "POST", CONFIG + "/test_webhook").json() == {"success": False, "error": "HTTP 500"}


# -- events on status changes -----------------------------------------------------------------------


def test_each_status_change_is_posted_after_the_delay(sim: GenSimulator, collector: Collector) -> None:
    register(sim, collector.url)
    sim.event_delay = 0.3
    gen_id = generate(sim)
    ready_at = sim.generation(gen_id)["ready_at"]
    wait_until(lambda: len(collector.events()) == 2)

    (processing_at, processing), (completed_at, completed) = collector.events()
    assert processing["event"] == "generation.processing" and completed["event"] == "generation.completed"
    assert completed["generation"]["id"] == gen_id and completed["generation"]["status"] == "completed"
    assert completed["generation"]["output_resources"][0]["url"].endswith(".mp4")
    assert (completed["spreadsheet_id"], completed["cell_id"], completed["layer_id"]) == (101, 3000, 4000)
    # Late by the delay (and not much more), never early.
    assert ready_at + 0.3 <= completed_at < ready_at + 2.0
    assert processing_at < completed_at
    logged = sim.stats()["events"]
    assert [(e["generation_id"], e["status"], e["lost"], e["http_status"]) for e in logged] == [
        (gen_id, "processing", False, 204),
        (gen_id, "completed", False, 204),
    ]


def test_failed_and_stopped_generations_are_posted_too(sim: GenSimulator, collector: Collector) -> None:
    register(sim, collector.url)
    sim.fail_next()
    failed = generate(sim)
    sim.durations = {"gen": 30.0}
    stopped = generate(sim)
    assert call(sim, "POST", f"/v1/generations/{stopped}/stop").status_code == 200
    wait_until(
        lambda: {e["event"] for _, e in collector.events()} >= {"generation.failed", "generation.stopped"}
    )
    by_event = {e["event"]: e for _, e in collector.events()}
    assert by_event["generation.failed"]["generation"]["id"] == failed
    assert by_event["generation.failed"]["generation"]["failed_reason"]
    assert by_event["generation.stopped"]["generation"]["id"] == stopped
    # The stopped generation never announces processing or completion afterwards.
    time.sleep(0.2)
    assert [e["event"] for _, e in collector.events() if e["generation"]["id"] == stopped] == [
        "generation.stopped"
    ]


def test_without_a_webhook_nothing_is_posted(sim: GenSimulator, collector: Collector) -> None:
    gen_id = generate(sim)
    wait_until(lambda: sim.generation(gen_id)["status"] == "completed")
    time.sleep(0.2)
    assert collector.events() == [] and sim.stats()["events"] == []


def test_lost_events_are_never_posted_and_the_losses_reproducible(
    sim: GenSimulator, collector: Collector
) -> None:
    register(sim, collector.url)
    sim.durations = {"gen": 0.1}

    def run(seed: int) -> list[bool]:
        sim.seed_events(seed)
        with collector.lock:
            collector.received.clear()
        before = len(sim.stats()["events"])
        ids = [generate(sim) for _ in range(10)]
        wait_until(
            lambda: (
                len(sim.stats()["events"]) - before == 20
                and all(e["lost"] or e["http_status"] for e in sim.stats()["events"][before:])
            )
        )
        logged = sim.stats()["events"][before:]
        posted = {(e["generation"]["id"], e["event"]) for _, e in collector.events()}
        assert posted == {(e["generation_id"], e["event"]) for e in logged if not e["lost"]}
        assert {e["generation_id"] for e in logged} == set(ids)
        return [e["lost"] for e in sorted(logged, key=lambda e: (e["generation_id"], e["status"]))]

    sim.event_loss = 0.3
    first = run(7)
    assert 0 < sum(first) < len(first)
    assert run(7) == first
    sim.event_loss = 1.0
    assert all(run(3))


def test_the_admin_api_sets_delay_loss_and_seed(sim: GenSimulator) -> None:
    answer = requests.post(
        sim.base_url + "/_sim/config", json={"event_delay": 0.5, "event_loss": 0.25, "event_seed": 1}
    )
    assert answer.status_code == 200
    assert (answer.json()["event_delay"], answer.json()["event_loss"]) == (0.5, 0.25)
    assert (sim.event_delay, sim.event_loss) == (0.5, 0.25)
    for bad in ({"event_loss": 1.5}, {"event_delay": -1}, {"event_seed": "x"}):
        assert requests.post(sim.base_url + "/_sim/config", json=bad).status_code == 422
    assert (sim.event_delay, sim.event_loss) == (0.5, 0.25)


def test_status_reads_are_logged_with_the_status_they_saw(sim: GenSimulator) -> None:
    gen_id = generate(sim)
    call(sim, "GET", f"/v1/generations/{gen_id}")
    wait_until(lambda: sim.generation(gen_id)["status"] == "completed")
    call(sim, "GET", f"/v1/generations/{gen_id}")
    seen = [r.get("gen_status") for r in sim.stats()["requests"] if r["endpoint"] == "get_generation"]
    assert seen[0] in ("pending", "processing") and seen[1] == "completed"
    assert all("gen_status" not in r for r in sim.stats()["requests"] if r["endpoint"] != "get_generation")
