"""Draw a preview of the Grafana dashboard from real metrics, without Grafana: docs/dashboard.svg.

It is not a Grafana screenshot. It runs the product for a few minutes on this machine and draws what
the dashboard's queries return:

1. starts an embedded Redis, the GEN simulator, a webhook receiver (some of its URLs fail, one is
   gone), one real worker process, the real metrics endpoint (``python -m worker.ops.metrics``) and
   the real GEN event receiver (``lipsync-worker events``), registered as the simulator's webhook
   (its events 0.2 s late, 20 % of them lost; now and then a junk or wrongly addressed POST);
2. enqueues jobs at a rising then falling pace, with webhook and task callbacks; along the way it
   makes GEN answer 429s, 503s and dropped connections, fails a few generations, sends two jobs to
   Celery's default queue as a misconfigured producer would, and twice kills the worker (SIGKILL)
   and starts another, so that the recovery panels have something to show;
3. scrapes ``/metrics`` every few seconds over HTTP;
4. evaluates every panel's query of deploy/grafana/lipsync-worker.json at every scrape with
   ``promql_subset`` (``$__rate_interval`` = four scrape intervals, as Grafana sets it) and draws the
   panels in the dashboard's grid as SVG: time series as lines (stacked where the panel stacks),
   stat panels as their last value coloured by the panel's thresholds.

Not a dependency of the worker: it needs the project's development install (the simulator, the
embedded Redis) and the standard library. Run from the repository root::

    .venv/bin/python deploy/grafana/render_preview.py --out docs/dashboard.svg

``--save-scrapes FILE`` keeps the scrapes as JSON and ``--load-scrapes FILE`` draws from such a file
without running anything (for changing the drawing or the dashboard without waiting minutes).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the checkout importable
    sys.path.insert(0, str(ROOT))

from deploy.grafana.promql_subset import Sample, Scrape, evaluate, parse  # noqa: E402

DASHBOARD = HERE / "lipsync-worker.json"
API_KEY = "preview-simulator-key"
#: Grafana's classic palette, in its order.
PALETTE = [
    "#7EB26D",
    "#EAB839",
    "#6ED0E0",
    "#EF843C",
    "#E24D42",
    "#1F78C1",
    "#BA43A9",
    "#705DA0",
    "#508642",
    "#CCA300",
    "#447EBC",
    "#C15C17",
]
THRESHOLD_COLORS = {"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C", "yellow": "#FADE2A"}


# =====================================================================================================
# Running the product and scraping it
# =====================================================================================================


class _Receiver(BaseHTTPRequestHandler):
    """``/ok`` takes every webhook; ``/flaky`` fails each webhook's first attempt; ``/down`` fails all
    of them (they end dead-lettered); ``/gone`` answers 410 (dead-lettered at once)."""

    seen: set[str] = set()
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        msg_id = self.headers.get("webhook-id", "")
        with self.lock:
            first = msg_id not in self.seen
            self.seen.add(msg_id)
        status = {"/ok": 204, "/down": 503, "/gone": 410}.get(self.path, 503 if first else 204)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            command,
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes], *, kill: bool = False) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _scrape(url: str) -> list[Sample]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url, timeout=10).text
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _request(n: int, receiver: str, stamp: str) -> dict[str, Any]:
    """The n-th job: both models, layer and cell endpoints, webhooks to every receiver URL, some
    task callbacks."""
    model = ("gen", "sync_so", "gen")[n % 3]
    request: dict[str, Any] = {
        "job_id": f"preview-{stamp}-{n}",
        "sheet_id": 101,
        "cell_id": 3000 + n % 100,
        "video_resource_id": 5001 + n % 90,
        "audio_resource_id": 6001 + n % 90,
        "model": model,
    }
    if n % 2:
        request["layer_id"] = 4000 + n % 100
    path = ("/ok", "/ok", "/flaky", "/ok", "/down", "/ok", "/flaky", "/ok", "/ok", "/gone")[n % 10]
    callback: dict[str, Any] = {"webhook_url": receiver + path}
    if n % 4 == 0:
        callback.update(task="pipeline.on_lipsync", queue="media")
    if n % 5 == 0:
        callback["events"] = ["submitted"]
    request["callback"] = callback
    return request


def _pace(t: float, minutes: float) -> float:
    """Jobs per second at ``t`` seconds into a run: a quiet start, a busy middle, a calmer end."""
    end = minutes * 60
    if t < end * 0.15:
        return 0.4
    if t < end * 0.7:
        return 1.2
    return 0.6


def run_and_scrape(minutes: float, interval: float, log_dir: Path) -> list[Scrape]:
    """Run the product for ``minutes`` and scrape it every ``interval`` seconds."""
    from celery import Celery

    from gensim import Fault, GenSimulator
    from worker.app import create_app
    from worker.dev.embedded_redis import EmbeddedRedis, free_port
    from worker.enqueue import enqueue
    from worker.settings import Settings

    with (
        EmbeddedRedis() as redis_server,
        GenSimulator(api_key=API_KEY, durations={"gen": 8.0, "sync_so": 15.0}) as sim,
        _receiver() as receiver,
    ):
        base = redis_server.url.rsplit("/", 1)[0]
        env = {
            "LIPSYNC_BROKER_URL": f"{base}/0",
            "LIPSYNC_RESULT_BACKEND": f"{base}/1",
            "LIPSYNC_REDIS_URL": f"{base}/2",
            "LIPSYNC_GEN_BASE_URL": sim.base_url,
            "LIPSYNC_GEN_API_KEY": API_KEY,
            "LIPSYNC_GEN_AGENT_ID": "42",
            "LIPSYNC_STORAGE_DIR": str(log_dir / "outputs"),
            "LIPSYNC_ALLOW_PRIVATE_URLS": "true",  # the simulator's CDN and the receiver are on loopback
            "LIPSYNC_WEBHOOK_SECRET": "whsec_"
            + base64.b64encode(b"preview-webhook-secret-0123456789").decode(),
            "LIPSYNC_POLL_INITIAL_DELAY": "2",
            "LIPSYNC_POLL_MAX_DELAY": "4",
            "LIPSYNC_RETRY_MAX_DELAY": "3",
            "LIPSYNC_WEBHOOK_RETRY_DELAYS": "2,4,8",
            "LIPSYNC_JOB_TIMEOUT": "300",
            "LIPSYNC_RECOVERY_GRACE": "30",
            "LIPSYNC_QUEUED_RECOVERY": "120",
            "LIPSYNC_SWEEP_INTERVAL": "2",
            "LIPSYNC_HEARTBEAT_INTERVAL": "1",
            "LIPSYNC_NODE_DEAD_AFTER": "6",
            "LIPSYNC_EVENTS_TOKEN": EVENTS_TOKEN,
        }
        worker_command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "-c",
            "4",
            "-l",
            "WARNING",
        ]
        workers: list[subprocess.Popen[bytes]] = []
        workers.append(_worker(worker_command, env, log_dir, workers))
        port = free_port()
        metrics_command = [
            sys.executable,
            "-m",
            "worker.ops.metrics",
            "--redis-url",
            env["LIPSYNC_REDIS_URL"],
        ]
        metrics_command += [
            "--broker-url",
            env["LIPSYNC_BROKER_URL"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        metrics = _spawn(metrics_command, env, log_dir / "metrics.log")
        events_url = _event_receiver(sim, env, log_dir)
        app = create_app(Settings.from_environ(env))
        misrouting = Celery(broker=env["LIPSYNC_BROKER_URL"])  # a producer without our routes
        stamp = time.strftime("%H%M%S")
        end = minutes * 60

        # What happens when, in seconds into the run: (time, what, action). One of each failure early
        # on, so that its series exists before the bursts (rate() cannot see a new series' first count,
        # in Prometheus as here); then bursts, spread over a few seconds so that scrapes see them grow.
        events: list[tuple[float, str, Callable[[], None]]] = [
            (5, "warm-up: one 429, one 503, one dropped connection", lambda: _warm_up(sim)),
            (
                10,
                "warm-up: a producer sends a job to Celery's default queue",
                lambda: _misroute(misrouting, stamp, 1),
            ),
        ]
        for wave in range(5):
            events += [
                (
                    end * 0.25 + 3 * wave,
                    "GEN answers 429 to 3 generate calls",
                    lambda: _fault(sim, Fault("generate", 3, 429, 1.0)),
                ),
                (
                    end * 0.35 + 3 * wave,
                    "GEN answers 503 to 5 polls",
                    lambda: _fault(sim, Fault("get_generation", 5, 503)),
                ),
                (
                    end * 0.45 + 3 * wave,
                    "GEN drops 2 connections",
                    lambda: _fault(sim, Fault("any", 2, drop=True)),
                ),
            ]
        for at in (15, end * 0.3, end * 0.6, end * 0.8):
            events.append(
                (at, "a junk POST and a wrong token at the event receiver", lambda: _junk(events_url))
            )
        events += [
            (end * 0.4, "3 generations fail", lambda: sim.fail_next(3)),
            (
                end * 0.5,
                "a producer sends 2 jobs to Celery's default queue",
                lambda: _misroute(misrouting, stamp, 2),
            ),
        ]
        # The worker is killed twice (the first time, early, so that the recovery counters exist).
        for at in (end * 0.1, end * 0.55):
            events += [
                (at, "the worker is killed (SIGKILL)", lambda: _stop(workers[-1], kill=True)),
                (
                    at + 8,
                    "another worker starts",
                    lambda: workers.append(_worker(worker_command, env, log_dir, workers)),
                ),
            ]
        events.sort(key=lambda event: event[0])
        scrapes: list[Scrape] = []
        start = time.time()
        next_scrape = start
        sent = 0.0
        n = 0
        try:
            while True:
                now = time.time()
                t = now - start
                while events and events[0][0] <= t:
                    _, what, action = events.pop(0)
                    print(f"{t:6.1f} s  {what}", flush=True)
                    action()
                sent += _pace(t, minutes) * 0.2
                while sent >= 1:
                    enqueue(_request(n, receiver, stamp), app=app)
                    n += 1
                    sent -= 1
                if now >= next_scrape:
                    with contextlib.suppress(OSError):
                        scrapes.append(Scrape(now, _scrape(f"http://127.0.0.1:{port}/metrics")))
                    next_scrape += interval
                if t > end:
                    break
                time.sleep(0.2)
        finally:
            for worker in workers:
                _stop(worker)
            _stop(metrics)
            for process in _event_receivers:
                _stop(process)
            misrouting.close()
            app.close()
        print(f"{n} jobs enqueued, {len(scrapes)} scrapes", flush=True)
        return scrapes


#: The event receiver's token (a throwaway, for this run only), and its process.
EVENTS_TOKEN = secrets.token_urlsafe(24)
_event_receivers: list[subprocess.Popen[bytes]] = []


def _event_receiver(sim: Any, env: dict[str, str], log_dir: Path) -> str:
    """Start ``lipsync-worker events`` and register it as the simulator's webhook; its URL."""
    from worker.dev.embedded_redis import free_port

    port = free_port()
    command = [sys.executable, "-m", "worker.cli", "events", "--host", "127.0.0.1", "--port", str(port)]
    _event_receivers.append(_spawn(command, env, log_dir / "events.log"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):  # noqa: S310 - our loopback URL
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    url = f"{base}/gen-events/{EVENTS_TOKEN}"
    patch = urllib.request.Request(  # noqa: S310 - the simulator on loopback
        f"{sim.base_url}/v1/agents/42/automation_config",
        data=json.dumps({"automation_config": {"webhook_url": url}}).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        method="PATCH",
    )
    with urllib.request.urlopen(patch, timeout=10):  # noqa: S310
        pass
    sim.event_delay, sim.event_loss = 0.2, 0.2
    return url


def _junk(url: str) -> None:
    """What the receiver must shrug off: a body that is not JSON, and a POST without the token."""
    for target, body in ((url, b"<not json/>"), (url.rsplit("/", 1)[0] + "/wrong-token-000000", b"{}")):
        request = urllib.request.Request(target, data=body, method="POST")  # noqa: S310 - loopback
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5).close()  # noqa: S310


def _fault(sim: Any, fault: Any) -> None:
    sim.add_fault(fault)


def _worker(
    command: list[str], env: dict[str, str], log_dir: Path, workers: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    name = f"preview{len(workers) + 1}"
    return _spawn([*command, "-n", f"{name}@%h"], env, log_dir / f"{name}.log")


def _warm_up(sim: Any) -> None:
    from gensim import Fault

    for fault in (
        Fault("generate", 1, 429, 1.0),
        Fault("get_generation", 1, 503),
        Fault("any", 1, drop=True),
    ):
        sim.add_fault(fault)


def _misroute(producer: Any, stamp: str, count: int) -> None:
    for _ in range(count):
        request = {
            "job_id": f"preview-{stamp}-misrouted-{time.monotonic_ns()}",
            "sheet_id": 101,
            "cell_id": 3900,
            "video_resource_id": 5001,
            "audio_resource_id": 6001,
        }
        producer.send_task("lipsync.run", kwargs={"request": request})


def save(scrapes: Sequence[Scrape], path: Path) -> None:
    data = [
        {"time": s.time, "samples": [[x.name, dict(x.labels), x.value] for x in s.samples]} for s in scrapes
    ]
    path.write_text(json.dumps(data))


def load(path: Path) -> list[Scrape]:
    return [
        Scrape(item["time"], [Sample(name, labels, value) for name, labels, value in item["samples"]])
        for item in json.loads(path.read_text())
    ]


# =====================================================================================================
# Evaluating the panels
# =====================================================================================================


@dataclass
class Line:
    legend: str
    #: One value per scrape (NaN where the query returned nothing for this series).
    values: list[float]


def panel_lines(panel: dict[str, Any], scrapes: Sequence[Scrape], interval: float) -> list[Line]:
    ranges = {"$__rate_interval": 4 * interval, "$__interval": interval, "$__range": 4 * interval}
    lines: dict[str, list[float]] = {}
    for target in panel["targets"]:
        expr = parse(target["expr"])
        legend_format = target.get("legendFormat") or ""
        for i in range(len(scrapes)):
            for key, value in evaluate(expr, scrapes[: i + 1], ranges=ranges).items():
                legend = _legend(legend_format, dict(key)) or target["expr"]
                lines.setdefault(legend, [math.nan] * len(scrapes))[i] = value
    return [Line(legend, values) for legend, values in lines.items()]


def _legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for label, value in labels.items():
        out = out.replace("{{" + label + "}}", value)
    return out


# =====================================================================================================
# Drawing
# =====================================================================================================

WIDTH = 1440
UNIT_H = 30  # Grafana's grid row height in pixels
HEADER = 76
GAP = 6
BG, PANEL, BORDER, TEXT, DIM, GRID = "#111217", "#181b1f", "#2c3235", "#ccccdc", "#8e8e9e", "#24272b"


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        if abs(value) < 1:
            return f"{value * 1000:.0f} ms"
        if abs(value) < 120:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    suffix = " req/s" if unit == "reqps" else ""
    for bound, letter in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= bound:
            return f"{value / bound:.3g}{letter}{suffix}"
    if value == int(value):
        return f"{int(value)}{suffix}"
    return f"{value:.3g}{suffix}"


def nice_max(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        bound = step * 10**exponent
        if bound >= value:
            return float(bound)
    return float(10 ** (exponent + 1))


class Svg:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def rect(
        self, x: float, y: float, w: float, h: float, fill: str, stroke: str = "none", rx: float = 0
    ) -> None:
        self.add(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{rx}" fill="{fill}" '
            f'stroke="{stroke}"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        size: float = 12,
        fill: str = TEXT,
        anchor: str = "start",
        weight: str = "",
    ) -> None:
        bold = f' font-weight="{weight}"' if weight else ""
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" text-anchor="{anchor}"{bold}>'
            f"{escape(content)}</text>"
        )

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str, dash: str = "") -> None:
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{dashed}/>')

    def render(self) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" font-family="Inter, Helvetica, Arial, sans-serif">'
        )
        return "\n".join([head, *self.parts, "</svg>\n"])


def _box(panel: dict[str, Any]) -> tuple[float, float, float, float]:
    grid = panel["gridPos"]
    col = (WIDTH - GAP) / 24
    x = GAP + grid["x"] * col
    y = HEADER + grid["y"] * UNIT_H
    return x, y, grid["w"] * col - GAP, grid["h"] * UNIT_H - GAP


@dataclass
class Plot:
    """A time series panel's plot area and scales."""

    left: float
    top: float
    right: float
    bottom: float
    times: list[float]
    top_value: float

    def x(self, i: int) -> float:
        t0, t1 = self.times[0], max(self.times[-1], self.times[0] + 1)
        return self.left + (self.times[i] - t0) / (t1 - t0) * (self.right - self.left)

    def y(self, value: float) -> float:
        return self.bottom - min(value, self.top_value) / self.top_value * (self.bottom - self.top)


def draw_timeseries(svg: Svg, panel: dict[str, Any], lines: list[Line], times: list[float]) -> None:
    x, y, w, h = _box(panel)
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "short")
    stacked = defaults.get("custom", {}).get("stacking", {}).get("mode") == "normal"
    lines = sorted(lines, key=lambda line: line.legend)
    legend_rows = _legend_rows(lines, w - 16)
    drawn = _stack(lines) if stacked else [line.values for line in lines]
    peak = max((v for values in drawn for v in values if math.isfinite(v)), default=0.0)
    steps = defaults.get("thresholds", {}).get("steps", [])
    thresholds = [step["value"] for step in steps if step.get("value") is not None]
    top_value = nice_max(max([peak, *thresholds]) if thresholds and peak > 0 else peak)
    plot = Plot(x + 52, y + 30, x + w - 10, y + h - 20 - 15 * len(legend_rows), times, top_value)
    _axes(svg, plot, unit)
    for value in thresholds:
        if value <= top_value:
            svg.line(plot.left, plot.y(value), plot.right, plot.y(value), THRESHOLD_COLORS["red"], "4,3")
    previous = [plot.bottom] * len(times)
    for index, values in enumerate(drawn):
        color = PALETTE[index % len(PALETTE)]
        for segment in _segments(values):
            path = " ".join(f"{plot.x(i):.1f},{plot.y(values[i]):.1f}" for i in segment)
            if stacked:
                base = " ".join(f"{plot.x(i):.1f},{previous[i]:.1f}" for i in reversed(segment))
                svg.add(f'<polygon points="{path} {base}" fill="{color}" fill-opacity="0.35" stroke="none"/>')
            svg.add(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if stacked:
            previous = [plot.y(v) if math.isfinite(v) else p for v, p in zip(values, previous, strict=True)]
    if not lines:
        svg.text(x + w / 2, y + h / 2, "No data", 14, DIM, "middle")
    ly = plot.bottom + 30
    for row in legend_rows:
        lx = x + 10
        for index, text in row:
            svg.rect(lx, ly - 8, 12, 4, PALETTE[index % len(PALETTE)], rx=1)
            svg.text(lx + 16, ly - 3, text, 10, TEXT)
            lx += 22 + 6 * len(text)
        ly += 15


def _stack(lines: list[Line]) -> list[list[float]]:
    """Grafana's normal stacking: each series drawn on top of the ones before it."""
    running = [0.0] * len(lines[0].values) if lines else []
    stacked = []
    for line in lines:
        running = [r + (v if math.isfinite(v) else 0.0) for r, v in zip(running, line.values, strict=True)]
        stacked.append(list(running))
    return stacked


def _axes(svg: Svg, plot: Plot, unit: str) -> None:
    for k in range(5):
        value = plot.top_value * k / 4
        svg.line(plot.left, plot.y(value), plot.right, plot.y(value), GRID)
        svg.text(plot.left - 6, plot.y(value) + 4, fmt(value, unit), 10, DIM, "end")
    t0, t1 = plot.times[0], max(plot.times[-1], plot.times[0] + 1)
    minute = 0
    while t0 + 60 * minute <= t1 + 0.1:
        tx = plot.left + 60 * minute / (t1 - t0) * (plot.right - plot.left)
        svg.line(tx, plot.top, tx, plot.bottom, GRID)
        svg.text(tx, plot.bottom + 13, f"{minute}:00", 10, DIM, "middle")
        minute += 1


def _legend_rows(lines: list[Line], width: float) -> list[list[tuple[int, str]]]:
    rows: list[list[tuple[int, str]]] = [[]]
    used = 0.0
    for index, line in enumerate(lines):
        size = 22 + 6 * len(line.legend)
        if rows[-1] and used + size > width:
            rows.append([])
            used = 0.0
        rows[-1].append((index, line.legend))
        used += size
    return rows if rows[0] else []


def _segments(values: list[float]) -> Iterator[list[int]]:
    current: list[int] = []
    for i, value in enumerate(values):
        if math.isfinite(value):
            current.append(i)
        elif current:
            yield current
            current = []
    if current:
        yield current


def draw_stat(svg: Svg, panel: dict[str, Any], lines: list[Line], times: list[float]) -> None:
    x, y, w, h = _box(panel)
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "short")
    values = lines[0].values if lines else []
    last = next((v for v in reversed(values) if math.isfinite(v)), math.nan)
    color = THRESHOLD_COLORS["green"]
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step.get("value") is None or (math.isfinite(last) and last >= step["value"]):
            color = THRESHOLD_COLORS.get(step["color"], step["color"])
    finite = [v for v in values if math.isfinite(v)]
    if finite and len(times) > 1:
        top = max(max(finite), 1e-9)
        points = [
            (x + (times[i] - times[0]) / (times[-1] - times[0]) * w, y + h - (values[i] / top) * (h * 0.45))
            for i in range(len(values))
            if math.isfinite(values[i])
        ]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
        svg.add(
            f'<polygon points="{points[0][0]:.1f},{y + h:.1f} {path} {points[-1][0]:.1f},{y + h:.1f}" '
            f'fill="{color}" fill-opacity="0.15" stroke="none"/>'
        )
    decimals = defaults.get("decimals")
    shown = fmt(last, unit) if decimals is None or unit != "short" else f"{last:.{decimals}f}"
    svg.text(x + w / 2, y + h / 2 + 20, shown, 34, color, "middle", "500")


def draw(dashboard: dict[str, Any], scrapes: Sequence[Scrape], interval: float) -> str:
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    svg = Svg(WIDTH, HEADER + bottom * UNIT_H + 30)
    svg.rect(0, 0, WIDTH, svg.height, BG)
    minutes = (scrapes[-1].time - scrapes[0].time) / 60
    svg.text(GAP + 4, 26, f"{dashboard['title']}", 18, TEXT, weight="600")
    notes = [
        "Preview, not a Grafana screenshot: the panels of deploy/grafana/lipsync-worker.json evaluated on "
        f"{len(scrapes)} real scrapes of the lipsync-worker metrics endpoint, "
        "drawn by deploy/grafana/render_preview.py.",
        f"A {minutes:.0f} min run on one machine: GEN simulator with injected 429s, 503s and dropped "
        "connections, failing webhook receivers, the worker killed twice, GEN's events 20 % lost. "
        "Axes: minutes into the run.",
    ]
    for n, note in enumerate(notes):
        svg.text(GAP + 4, 44 + 14 * n, note, 11, DIM)
    times = [s.time for s in scrapes]
    for panel in panels:
        if panel["type"] == "row":
            _, y, _, _ = _box(panel)
            svg.text(GAP + 4, y + 20, panel["title"], 14, TEXT, weight="600")
            continue
        x, y, w, h = _box(panel)
        svg.rect(x, y, w, h, PANEL, BORDER, rx=3)
        svg.text(x + 10, y + 18, panel["title"], 12, TEXT, weight="500")
        lines = panel_lines(panel, scrapes, interval)
        if panel["type"] == "stat":
            draw_stat(svg, panel, lines, times)
        else:
            draw_timeseries(svg, panel, lines, times)
    return svg.render()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.svg")
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the run (default: %(default)s)")
    parser.add_argument(
        "--interval", type=float, default=3.0, help="seconds between scrapes (default: %(default)s)"
    )
    parser.add_argument("--save-scrapes", type=Path, help="also write the scrapes to this JSON file")
    parser.add_argument("--load-scrapes", type=Path, help="draw from these scrapes instead of running")
    args = parser.parse_args(argv)
    if args.load_scrapes:
        scrapes = load(args.load_scrapes)
    else:
        with tempfile.TemporaryDirectory(prefix="lipsync-preview-") as tmp:
            scrapes = run_and_scrape(args.minutes, args.interval, Path(tmp))
    if args.save_scrapes:
        save(scrapes, args.save_scrapes)
    if len(scrapes) < 2:
        print("not enough scrapes to draw", file=sys.stderr)
        return 1
    dashboard = json.loads(DASHBOARD.read_text())
    args.out.write_text(draw(dashboard, scrapes, args.interval))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
