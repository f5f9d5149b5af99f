"""The benchmark's own helpers: medians and ranges, targets, reading CPU and memory from /proc, what
GEN saw per generation, the SDK-like reference client, the plain Celery config, and the command line.

No figure is asserted here: benchmarks print figures, they are not timed tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as umbrella
from bench.figures import DASH, Figure, Spread, Target, median, p95, percent, print_table, ratios
from bench.gen_seen import added_latency, seen_by_key
from bench.plain_celery import BACKEND, NOT_COPIED, plain_config
from bench.polling_client import FixedIntervalPoller
from bench.proc import CLOCK_TICKS, parse_stat, parse_vmrss, tree, tree_cpu_seconds, tree_rss_bytes
from bench.waiting import poll_gaps
from gensim import GenSimulator
from tests.conftest import REPO
from worker.app import celery_config
from worker.settings import Settings

# ---------------------------------------------------------------------------- figures


def test_spread_is_the_median_with_the_lowest_and_highest() -> None:
    spread = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (spread.median, spread.low, spread.high, spread.n) == (2.5, 1.0, 10.0, 4)
    assert spread.text() == f"2.50 [1.00{DASH}10.00]"
    with pytest.raises(ValueError):
        Spread.of([])


def test_p95_is_the_nearest_rank_and_nothing_gives_nan() -> None:
    assert p95([float(v) for v in range(1, 101)]) == 95.0
    assert p95([3.0, 1.0, 2.0]) == 3.0
    assert math.isnan(p95([])) and math.isnan(median([]))
    assert median([4.0, 1.0, 2.0]) == 2.0


def test_ratios_are_taken_round_by_round() -> None:
    assert ratios([2.0, 3.0, 4.0], [1.0, 3.0, 8.0]) == [2.0, 1.0, 0.5]
    assert ratios([1.0], [0.0]) == [float("inf")]
    with pytest.raises(ValueError):
        ratios([1.0, 2.0], [1.0])


def test_a_target_says_when_the_median_meets_it_but_a_round_does_not() -> None:
    at_most = Target(0.05, label="<= 5 % of L")
    assert at_most.verdict([0.01, 0.02, 0.03]) == "target <= 5 % of L: met"
    assert at_most.verdict([0.01, 0.02, 0.09]) == "target <= 5 % of L: met (median; 1 of 3 rounds miss)"
    assert at_most.verdict([0.06, 0.07, 0.01]) == "target <= 5 % of L: MISSED"
    at_least = Target(0.5, kind="at least", on="ratio")
    assert at_least.verdict([0.6, 0.7, 0.8]) == "target >= 0.5: met"
    assert at_least.verdict([0.1, 0.2, 0.8]) == "target >= 0.5: MISSED"


def test_a_figure_prints_ours_each_reference_and_the_ratio_range() -> None:
    figure = Figure(
        "added latency / L",
        [0.02, 0.03, 0.04],
        percent,
        {"2 s polling": [0.04, 0.05, 0.04], "before": [0.20, 0.20, 0.40]},
        Target(0.05, label="<= 5 % of L"),
    )
    out = io.StringIO()
    print_table("latency", [figure], ["a note"], out=out)
    text = out.getvalue()
    first, second = [line for line in text.splitlines() if "ratio " in line and "median" not in line]
    assert first.startswith("added latency / L")
    assert "3.0 %" in first and "2 s polling 4.0 %" in first
    assert f"ratio 0.60x [0.50x{DASH}1.00x] over 3 rounds" in first
    assert first.endswith("target <= 5 % of L: met")
    assert "before 20.0 %" in second and f"ratio 0.10x [0.10x{DASH}0.15x] over 3 rounds" in second
    assert "  a note" in text
    assert not figure.missed()


def test_a_ratio_target_is_checked_on_the_ratio_to_the_first_reference() -> None:
    figure = Figure("cpu", [3.0, 3.0, 3.0], percent, {"no-op": [1.0, 1.0, 1.0]}, Target(2.0, on="ratio"))
    assert figure.missed()
    assert "ours" not in figure.lines(10)[0]  # a reference row, not a figure without one


# ---------------------------------------------------------------------------- /proc


def test_stat_fields_are_counted_from_the_last_parenthesis() -> None:
    # A command name with spaces and parentheses of its own, as a process may set.
    fields = ["S", "41", *["0"] * 9, "250", "130", "7", "3", *["0"] * 30]
    stat = parse_stat(f"1234 (celery (worker) x) {' '.join(fields)}")
    assert (stat.pid, stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (
        1234,
        41,
        250,
        130,
        7,
        3,
    )
    assert stat.ticks == 390


def test_vmrss_is_read_in_bytes() -> None:
    assert parse_vmrss("Name:\tcelery\nVmRSS:\t  2048 kB\nVmSwap:\t0 kB\n") == 2048 * 1024
    assert parse_vmrss("Name:\tzombie\nState:\tZ (zombie)\n") == 0


def _fake_proc(root: Path, processes: dict[int, tuple[int, int, int]]) -> None:
    """pid -> (ppid, utime+stime ticks, VmRSS kB) as /proc/<pid>/{stat,status}."""
    for pid, (ppid, ticks, rss_kb) in processes.items():
        (root / str(pid)).mkdir()
        fields = ["S", str(ppid), *["0"] * 9, str(ticks), "0", "0", "0", *["0"] * 30]
        (root / str(pid) / "stat").write_text(f"{pid} (p{pid}) {' '.join(fields)}\n")
        (root / str(pid) / "status").write_text(f"Name:\tp{pid}\nVmRSS:\t{rss_kb} kB\n")
    (root / "self").mkdir()  # not a pid: skipped


def test_a_tree_is_the_root_and_all_its_descendants(tmp_path: Path) -> None:
    # 10 -> 11 -> 12, and 10 -> 13; 20 is someone else's.
    _fake_proc(
        tmp_path, {10: (1, 100, 1000), 11: (10, 50, 200), 12: (11, 5, 100), 13: (10, 0, 300), 20: (1, 999, 9)}
    )
    assert sorted(stat.pid for stat in tree(10, tmp_path)) == [10, 11, 12, 13]
    assert tree_cpu_seconds(10, tmp_path) == pytest.approx(155 / CLOCK_TICKS)
    assert tree_rss_bytes(10, tmp_path) == 1600 * 1024
    assert tree(99, tmp_path) == []


def test_the_real_proc_sees_a_child_and_the_cpu_it_burns() -> None:
    code = (
        "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while tree_cpu_seconds(child.pid) < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in {stat.pid for stat in tree(os.getpid())}
        assert tree_cpu_seconds(child.pid) >= 0.25
        assert tree_rss_bytes(child.pid) > 1024 * 1024
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------- what GEN saw


def test_calls_and_the_output_fetch_are_attributed_to_their_generation() -> None:
    def arrival(t: float, endpoint: str, path: str) -> dict[str, Any]:
        return {"t": t, "method": "GET", "endpoint": endpoint, "path": path}

    stats = {
        "generations_by_key": {"k1": [9001], "k2": [9002]},
        "requests": [
            {"endpoint": "generate", "idempotency_key": "k1"},
            {"endpoint": "generate", "idempotency_key": "k1"},  # a retried submit
            {"endpoint": "generate", "idempotency_key": "k2"},
        ],
        "arrivals": [
            arrival(1.0, "get_generation", "/v1/generations/9001"),
            arrival(2.0, "get_generation", "/v1/generations/9001"),
            arrival(2.5, "get_generation", "/v1/generations/9002"),
            arrival(3.0, "cdn", "/cdn/outputs/tok1.mp4"),
            arrival(4.0, "cdn", "/cdn/outputs/tok1.mp4"),  # a resumed download
            arrival(4.5, "cdn", "/cdn/thumbnails/tok1.jpg"),
            arrival(5.0, "content_resource", "/v1/content_resources/5001"),
        ],
    }
    generations = {
        9001: {"id": 9001, "duration": 2.0, "created_at": 0.5, "token": "tok1"},
        9002: {"id": 9002, "duration": 9.0, "created_at": 0.6, "token": "tok2"},
    }
    seen = seen_by_key(stats, generations)
    one, two = seen["k1"], seen["k2"]
    assert (one.generate_calls, one.status_calls, one.output_calls, one.calls) == (2, 2, 2, 6)
    assert one.output_fetched_at == 3.0
    assert one.status_at == (1.0, 2.0) and one.ready_at == 2.5
    assert one.first_seen_done() is None  # no poll after GEN finished at 2.5
    assert dataclasses.replace(one, duration=1.0).first_seen_done() == 2.0
    assert added_latency(one, started_at=0.4) == pytest.approx(3.0 - 0.4 - 2.0)
    assert (two.calls, two.output_fetched_at, added_latency(two, 0.0)) == (2, None, None)


def test_poll_gaps_are_between_polls_of_the_same_generation_ending_in_the_window() -> None:
    def status(t: float, gen: int) -> dict[str, Any]:
        return {"t": t, "method": "GET", "endpoint": "get_generation", "path": f"/v1/generations/{gen}"}

    stats = {"arrivals": [status(0.0, 1), status(5.0, 2), status(30.0, 1), status(40.0, 2), status(95.0, 1)]}
    # Window [20, 60): 1's poll at 30 (gap 30) and 2's at 40 (gap 35); 1's poll at 95 is after it.
    assert sorted(poll_gaps(stats, 20.0, 60.0)) == [30.0, 35.0]
    assert poll_gaps(stats, 41.0, 60.0) == []


def test_the_reference_client_polls_at_its_interval_and_fetches_the_output_once() -> None:
    with GenSimulator(api_key="k", durations={"gen": 0.3}) as sim:
        with FixedIntervalPoller(sim.base_url, "k", "42", interval=0.1) as poller:
            job = poller.start((101, 3000), (5001, 6001))
            deadline = time.monotonic() + 10
            while not job.done and time.monotonic() < deadline:
                time.sleep(0.02)
        assert job.done and job.error is None
        seen = seen_by_key(
            sim.stats(), {int(g): sim.generation(g) for g in sim.stats()["generations_by_key"][job.key]}
        )
    generation = seen[job.key]
    assert generation.generate_calls == 1 and generation.output_calls == 1
    # Status at once, then every 0.1 s until 0.3 s: 4 or 5 polls, never a backoff's 2.
    assert 3 <= generation.status_calls <= 6


# ---------------------------------------------------------------------------- the plain reference


def test_the_plain_app_has_every_celery_setting_of_ours_but_routing_and_our_classes() -> None:
    settings = Settings.from_environ(
        {"LIPSYNC_BROKER_URL": "redis://127.0.0.1:1/0", "LIPSYNC_RESULT_TTL": "120"}
    )
    ours = {k: v for k, v in celery_config(settings).items() if k not in NOT_COPIED}
    plain = plain_config(settings)
    # The same Redis for results; Celery's own backend class for the plain app (see bench.plain_celery).
    assert str(ours.pop(BACKEND)) == f"worker.ops.results:ResultBackend+{plain.pop(BACKEND)}"
    assert plain == ours


# ---------------------------------------------------------------------------- the command


def test_python_m_bench_help_lists_every_measure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for command in ("latency", "waiting-cost", "burst", "waiting", "download", "all"):
        assert command in done.stdout


def test_fewer_than_three_rounds_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_info:
        umbrella.main(["burst", "--rounds", "2"])
    assert exit_info.value.code == 2


def test_the_umbrella_says_when_the_download_bench_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert umbrella.run_download([]) == 0
    assert "download: MISSING" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["--rounds", "4"], ["all"], ["latency", "--rounds", "3"]])
def test_no_measure_named_means_all_with_the_common_options(argv: list[str]) -> None:
    # `python -m bench` alone once failed: the common options live on the subcommands.
    args = umbrella.parse(argv)
    assert (args.command or "all") == (argv[0] if argv and not argv[0].startswith("-") else "all")
    assert args.rounds >= 3 and args.seed == 7


@pytest.mark.parametrize("name", sorted(umbrella.MEASURES))
def test_all_gives_each_measure_its_own_options_and_the_common_ones(name: str) -> None:
    args = umbrella.measure_defaults(umbrella.parse(["--rounds", "4"]), name)
    alone = umbrella.parse([name])
    assert set(vars(alone)) <= set(vars(args))
    assert args.rounds == 4 and args.seed == alone.seed
