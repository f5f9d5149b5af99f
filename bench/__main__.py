"""``python -m bench`` (``./dev bench``): the performance figures of issue 10, each beside its reference
measured in the same run, as the median of >= 3 rounds with the range. See bench/README.md.

    python -m bench                      # everything at moderate scale (about 20 minutes on 2 cores)
    python -m bench latency              # the poll schedule: added latency / L and GEN calls per job
    python -m bench waiting-cost         # CPU of a poll vs a no-op task; the chain vs a plain chain
    python -m bench burst --jobs 1000    # p95 added latency of a burst on one -c 4 worker
    python -m bench waiting --jobs 10000 # memory and CPU of jobs waiting on GEN; does it take new work?
    python -m bench download             # the output download vs curl (bench/download.py)
    python -m bench batch --items 500    # 500 items as one batch vs 500 single jobs (bench/batch.py)

Everything runs on loopback: an embedded Redis per deployment, the GEN simulator, real Celery worker
processes. Benchmarks print figures; they are not tests, and a missed target does not fail the run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import batch, burst, cpu, latency, waiting
from bench.figures import MIN_ROUNDS, Figure, print_table
from bench.latency import SCENARIOS

Section = tuple[str, list[Figure], list[str]]


def _rounds(text: str) -> int:
    value = int(text)
    if value < MIN_ROUNDS:
        raise argparse.ArgumentTypeError(f"at least {MIN_ROUNDS} rounds (a median and a range need them)")
    return value


def _scenarios(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"scenarios are among {', '.join(SCENARIOS)}")
    return names


def _latency_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenarios", type=_scenarios, default=list(SCENARIOS), help=", ".join(SCENARIOS))
    parser.add_argument(
        "--warmup", type=int, default=20, help="jobs the fleet learns from first (default 20)"
    )
    parser.add_argument("--wave", type=int, default=8, help="jobs per measured wave, one wave per round")
    parser.add_argument(
        "--no-before", action="store_true", help="skip the LIPSYNC_POLL_LEARN=false reference"
    )


def _waiting_cost_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=300, help="jobs waiting while polls are measured")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per poll-cost round")
    parser.add_argument("--chains", type=int, default=100, help="jobs (and plain chains) per round")


def _burst_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=200, help="jobs started at once (the issue: 1000)")
    parser.add_argument("--latency", type=float, default=30.0, help="GEN's L in seconds")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)


def _waiting_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1000, help="jobs waiting at once (the issue: 10000)")
    parser.add_argument("--latency", type=float, default=900.0, help="GEN's L in seconds")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per round")
    parser.add_argument("--stall", type=float, default=60.0, help="no new generation this long: stalled")
    parser.add_argument("--fill-timeout", type=float, default=900.0)
    parser.add_argument("--settle", type=float, default=100.0, help="seconds between the fill and the rounds")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="LIPSYNC_NAME=VALUE",
        help="run the worker with this setting changed (repeatable; default: every setting at its default)",
    )


def run_latency(args: argparse.Namespace, tmp: Path) -> Section:
    figures, notes = latency.run(
        tmp,
        scenarios=args.scenarios,
        warmup=args.warmup,
        rounds=args.rounds,
        wave=args.wave,
        before=not args.no_before,
        seed=args.seed,
    )
    return "latency: the poll schedule (added latency / L, GEN calls per job / 3)", figures, notes


def run_waiting_cost(args: argparse.Namespace, tmp: Path) -> Section:
    figures, notes = cpu.poll_cost(tmp, jobs=args.jobs, rounds=args.rounds, window=args.window)
    more, more_notes = cpu.chain_cost(tmp, chains=args.chains, rounds=args.rounds, warmup=20)
    return (
        "waiting-cost: our worker vs plain Celery (same settings, -c 2)",
        figures + more,
        notes + more_notes,
    )


def run_burst(args: argparse.Namespace, tmp: Path) -> Section:
    figures, notes = burst.run(
        tmp,
        jobs=args.jobs,
        rounds=args.rounds,
        latency=args.latency,
        concurrency=args.concurrency,
        warmup=args.warmup,
    )
    return f"burst: {args.jobs} jobs at once on one -c {args.concurrency} worker", figures, notes


def run_waiting(args: argparse.Namespace, tmp: Path) -> Section:
    figures, notes = waiting.run(
        tmp,
        jobs=args.jobs,
        rounds=args.rounds,
        window=args.window,
        latency=args.latency,
        concurrency=args.concurrency,
        stall=args.stall,
        fill_timeout=args.fill_timeout,
        settle=args.settle,
        settings=dict(item.split("=", 1) for item in args.setting),
    )
    return f"waiting: {args.jobs} jobs waiting on GEN on one -c {args.concurrency} worker", figures, notes


def _batch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=500, help="items of the batch (and single jobs)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-parallel", type=int, default=None, help="default: LIPSYNC_BATCH_MAX_PARALLEL")


def run_batch(args: argparse.Namespace, tmp: Path) -> Section:
    figures, notes = batch.run(
        tmp,
        items=args.items,
        rounds=args.rounds,
        concurrency=args.concurrency,
        max_parallel=args.max_parallel,
    )
    return f"batch: {args.items} items with instant generations, one batch vs single jobs", figures, notes


def run_download(argv: Sequence[str]) -> int:
    """bench/download.py's own main, imported only now: the rest works without it."""
    try:
        download = importlib.import_module("bench.download")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.download":
            raise
        print("\n== download: MISSING (bench/download.py is not there yet); nothing measured")
        return 0
    print("\n== download: the output download vs curl (bench/download.py)", flush=True)
    code: int = download.main(list(argv))
    return code


MEASURES: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[..., Section], str]] = {
    "latency": (_latency_options, run_latency, "the poll schedule vs 2 s polling and the old schedule"),
    "waiting-cost": (_waiting_cost_options, run_waiting_cost, "CPU per poll and per job vs plain Celery"),
    "burst": (_burst_options, run_burst, "p95 added latency of jobs started at once"),
    "waiting": (_waiting_options, run_waiting, "memory and CPU of jobs waiting on GEN"),
    "batch": (_batch_options, run_batch, "wall time and worker CPU of a batch vs single jobs"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--rounds", type=_rounds, default=MIN_ROUNDS, help=f"rounds per figure (>= {MIN_ROUNDS})"
    )
    common.add_argument("--seed", type=int, default=7, help="seed of the simulated GEN durations")
    sub = top.add_subparsers(dest="command")
    for name, (options, _, help_text) in MEASURES.items():
        options(sub.add_parser(name, parents=[common], help=help_text))
    download = sub.add_parser(
        "download", help="the output download vs curl (bench/download.py)", add_help=False
    )
    download.add_argument("download_args", nargs=argparse.REMAINDER)
    sub.add_parser("all", parents=[common], help="every measure at moderate scale (the default)")
    return top


def parse(arguments: Sequence[str]) -> argparse.Namespace:
    """The command line; no measure named (``python -m bench [--rounds N]``) means ``all``."""
    if not arguments or (arguments[0].startswith("-") and arguments[0] not in ("-h", "--help")):
        arguments = ["all", *arguments]
    return parser().parse_args(arguments)


def measure_defaults(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """What ``all`` runs measure ``name`` with: its own defaults, and the common options given."""
    defaults = argparse.ArgumentParser(add_help=False)
    MEASURES[name][0](defaults)
    return defaults.parse_args([], namespace=argparse.Namespace(**vars(args)))


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["download"]:  # its options are bench/download.py's own
        return run_download(arguments[1:])
    args = parse(arguments)
    command = args.command or "all"
    from bench.common import machine

    print(machine(), flush=True)
    started = time.monotonic()
    sections: list[Section] = []
    names = list(MEASURES) if command == "all" else [command]
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-") as tmp:
        for name in names:
            _, measure, _ = MEASURES[name]
            measure_args = args if command != "all" else measure_defaults(args, name)
            print(f"\n-- running {name} ...", flush=True)
            section = measure(measure_args, Path(tmp) / name)
            sections.append(section)
            print_table(*section)
    code = run_download([]) if command == "all" else 0
    missed = [figure.name for _, figures, _ in sections for figure in figures if figure.missed()]
    print(f"\n{len(missed)} target(s) missed{': ' if missed else ''}{'; '.join(missed)}")
    print(f"took {(time.monotonic() - started) / 60:.1f} min")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
