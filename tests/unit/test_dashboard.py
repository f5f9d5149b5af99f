"""deploy/grafana/lipsync-worker.json: a Grafana dashboard whose queries ask for what the endpoint exports.

No Grafana or Prometheus is needed. The JSON is checked for what Grafana needs to import it (schema
version, the datasource variable, ids, a grid without overlaps); every panel's query is parsed with
the PromQL subset in deploy/grafana/promql_subset.py (a query outside it fails: keep the dashboard
checkable), its metric and label names are compared with a real scrape of the metrics endpoint, and
it is evaluated on two real scrapes with :func:`record_everything` run before each, so a matcher on a
label value the code never writes, or a legend naming a label the result lacks, fails too.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from deploy.grafana.promql_subset import (
    Aggregate,
    Binary,
    Call,
    Expr,
    Scrape,
    Series,
    evaluate,
    parse,
    selectors,
)
from deploy.grafana.promql_subset import Sample as PromSample
from tests.unit.ops.test_metrics_docs import Family, metrics_endpoint, record_everything

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PATH = ROOT / "deploy" / "grafana" / "lipsync-worker.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Grafana's $__rate_interval is at least four scrape intervals; the test's scrapes are seconds apart.
RANGES = {"$__rate_interval": 3600.0, "$__interval": 3600.0, "$__range": 3600.0}
#: Exported families no panel needs to chart.
NOT_CHARTED = {
    "process_cpu_seconds",
    "process_max_fds",
    "process_open_fds",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
}

Panel = dict[str, Any]


def all_panels() -> list[Panel]:
    """Every panel, rows and the panels inside collapsed rows included."""
    found: list[Panel] = []
    for panel in DASHBOARD["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def charts() -> list[Panel]:
    return [panel for panel in all_panels() if panel["type"] != "row"]


@dataclass(frozen=True)
class Target:
    panel: str
    ref: str
    expr: str
    legend: str


TARGETS = [
    Target(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
    for panel in charts()
    for target in panel["targets"]
]


def target_id(target: Target) -> str:
    return f"{target.panel} [{target.ref}]"


# -- the JSON as Grafana imports it -----------------------------------------------------------------


def test_dashboard_has_what_grafana_imports() -> None:
    assert DASHBOARD["schemaVersion"] >= 36
    assert DASHBOARD["uid"] == "lipsync-worker" and DASHBOARD["title"] == "lipsync-worker"
    (variable,) = [v for v in DASHBOARD["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    assert "id" not in DASHBOARD or DASHBOARD["id"] is None  # an export for import carries no instance id


def test_panel_ids_are_unique_and_every_chart_has_queries() -> None:
    ids = [panel["id"] for panel in all_panels()]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in all_panels()]
    assert len(titles) == len(set(titles))
    for panel in charts():
        assert panel["title"] and panel.get("description"), panel["id"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_every_panel_and_query_reads_the_datasource_variable() -> None:
    for panel in charts():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_row_holds_charts() -> None:
    rows = sorted((p for p in all_panels() if p["type"] == "row"), key=lambda p: p["gridPos"]["y"])
    assert [row["title"] for row in rows] == [
        "Overview",
        "Jobs",
        "GEN API",
        "Polling and recovery",
        "Queues and workers",
        "Callbacks",
        "GEN events",
        "Lipsync cards",
        "Batches",
    ]
    ends = [row["gridPos"]["y"] for row in rows[1:]] + [10**6]
    for row, end in zip(rows, ends, strict=True):
        inside = [p for p in charts() if row["gridPos"]["y"] < p["gridPos"]["y"] < end]
        assert inside, f"row {row['title']!r} is empty"


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_every_query_parses(target: Target) -> None:
    expr = parse(target.expr)
    assert selectors(expr), target.expr
    assert re.fullmatch(r"[^{}]*(\{\{\s*\w+\s*\}\}[^{}]*)*", target.legend), target.legend


# -- the queries against real scrapes -------------------------------------------------------------


@dataclass
class Scraped:
    families: list[Family]
    history: list[Scrape]

    def labels_of(self) -> dict[str, set[str]]:
        names: dict[str, set[str]] = {}
        for family in self.families:
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
        return names

    def family_of(self) -> dict[str, str]:
        return {sample.name: family.name for family in self.families for sample in family.samples}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    """Two scrapes of the real endpoint, each after a round of :func:`record_everything` (module
    scope: one endpoint and one Redis for all the queries)."""
    from worker.dev.embedded_redis import EmbeddedRedis

    with EmbeddedRedis() as server, metrics_endpoint(server.url) as endpoint:
        history: list[Scrape] = []
        families: list[Family] = []
        for round_no in range(2):
            record_everything(server.url, round_no=round_no)
            families = endpoint.scrape()
            samples = [PromSample(s.name, dict(s.labels), s.value) for f in families for s in f.samples]
            history.append(Scrape(time.time(), samples))
            time.sleep(0.2)
        yield Scraped(families, history)


def aggregation_labels(expr: Expr) -> list[tuple[tuple[str, ...], Expr]]:
    if isinstance(expr, Aggregate):
        return [(expr.labels, expr.expr), *aggregation_labels(expr.expr)]
    if isinstance(expr, Call):
        return [pair for arg in expr.args for pair in aggregation_labels(arg)]
    if isinstance(expr, Binary):
        return aggregation_labels(expr.lhs) + aggregation_labels(expr.rhs)
    return []


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_every_query_names_exported_metrics_and_labels(target: Target, scraped: Scraped) -> None:
    labels = scraped.labels_of()
    expr = parse(target.expr)
    for selector in selectors(expr):
        assert selector.name in labels, f"{selector.name} is not exported"
        for matcher in selector.matchers:
            assert matcher.label in labels[selector.name], f"{selector.name} has no label {matcher.label}"
    for grouping, inner in aggregation_labels(expr):
        available = {label for s in selectors(inner) for label in labels[s.name]}
        assert set(grouping) <= available, f"grouping by {grouping}, the series have {sorted(available)}"


def finite(series: Series) -> list[float]:
    return [value for value in series.values() if math.isfinite(value)]


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_every_query_evaluates_on_real_scrapes(target: Target, scraped: Scraped) -> None:
    result = evaluate(parse(target.expr), scraped.history, ranges=RANGES)
    assert finite(result), f"{target.expr} gives nothing on real data: {result}"
    wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.legend))
    for key in result:
        assert wanted <= {label for label, _ in key}, f"legend {target.legend!r}, series {dict(key)}"


def test_every_exported_family_is_charted(scraped: Scraped) -> None:
    family_of = scraped.family_of()
    charted = {family_of[s.name] for t in TARGETS for s in selectors(parse(t.expr))}
    exported = {family.name for family in scraped.families}
    assert sorted(exported - charted - NOT_CHARTED) == [], "exported but on no panel"


def one_panel(title: str) -> Panel:
    (panel,) = [p for p in charts() if p["title"] == title]
    return panel


def values(title: str, scraped: Scraped, ref: str = "A") -> dict[str, float]:
    """A panel's query on the scrapes, keyed by its legend (Grafana's ``{{label}}`` filled in)."""
    (target,) = [t for t in one_panel(title)["targets"] if t["refId"] == ref]
    result = evaluate(parse(target["expr"]), scraped.history, ranges=RANGES)
    return {legend(target["legendFormat"], dict(key)): value for key, value in result.items()}


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def test_gauge_panels_show_the_recorded_state(scraped: Scraped) -> None:
    # Two rounds of record_everything: two jobs in each stage, one of them overdue per round...
    assert values("Jobs in flight by stage", scraped) == {
        "queued": 2,
        "submitting": 2,
        "polling": 2,
        "fetching": 2,
    }
    assert values("Queue depth", scraped) == {"lipsync": 2, "lipsync.fetch": 4, "lipsync.callbacks": 2}
    assert values("Worker consumers", scraped) == {"alive": 2, "silent": 2}
    assert values("Overdue and undispatched jobs", scraped) == {"overdue": 2}
    assert values("Overdue and undispatched jobs", scraped, "B") == {
        "finished, callbacks not yet dispatched": 0
    }
    assert values("Webhooks pending", scraped) == {"pending": 2}
    assert values("Dead-lettered webhooks", scraped) == {"dead letters": 2}
    assert values("Misrouted lipsync messages", scraped) == {"waiting in celery": 2}


def test_rate_panels_count_what_happened_between_the_scrapes(scraped: Scraped) -> None:
    elapsed = scraped.history[1].time - scraped.history[0].time
    per_second = values("GEN calls per second, by endpoint and status", scraped)
    assert per_second["generate 202"] == pytest.approx(1 / elapsed)
    assert per_second["get_generation 200"] == pytest.approx(2 / elapsed)
    errors = values("GEN errors per second", scraped)
    assert set(errors) == {
        "generate 429",
        "get_generation 503",
        "get_generation error",
        "get_layer 404",
    }
    outcomes = values("Outcomes per minute, by status", scraped)
    assert outcomes["completed"] == pytest.approx(3 * 60 / elapsed)
    recoveries = values("Recoveries per minute, by cause", scraped)
    assert recoveries["dead_worker"] == pytest.approx(60 / elapsed)
    # 2 polling jobs; 4 get_generation calls per round (200, 200, 503 and no answer).
    poll_gap = values("Seconds between two polls of a job (derived)", scraped)["mean seconds between polls"]
    assert poll_gap == pytest.approx(2 / (4 / elapsed))


def test_share_and_quantile_panels(scraped: Scraped) -> None:
    (share,) = values("GEN error share", scraped).values()
    assert share == pytest.approx(4 / 10)
    latency = values("GEN latency", scraped)
    # generate: 0.3 s and 0.02 s per round: the p95 falls in the 0.25..0.5 bucket.
    assert 0.25 < latency["p95 generate"] <= 0.5
    durations = values("Job duration", scraped, "B")
    assert 60 < durations["p50 sync_so"] <= 1800


# -- the preview in the docs ------------------------------------------------------------------------


def svg_texts(svg: str) -> set[str]:
    root = ElementTree.fromstring(svg)
    return {element.text or "" for element in root.iter("{http://www.w3.org/2000/svg}text")}


def test_the_preview_draws_every_panel_from_real_scrapes(scraped: Scraped) -> None:
    from deploy.grafana.render_preview import draw

    texts = svg_texts(draw(DASHBOARD, scraped.history, interval=1.0))
    assert {panel["title"] for panel in all_panels()} <= texts
    assert "No data" not in texts


def test_the_committed_preview_shows_the_current_panels() -> None:
    # Redraw it after changing the panels: .venv/bin/python deploy/grafana/render_preview.py
    texts = svg_texts((ROOT / "docs" / "dashboard.svg").read_text())
    assert {panel["title"] for panel in all_panels()} <= texts
    assert any(text.startswith("Preview, not a Grafana screenshot") for text in texts)
