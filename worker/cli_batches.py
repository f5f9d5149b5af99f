"""The batch commands of ``lipsync-worker``: ``submit --batch FILE.jsonl [--wait]``, and ``status`` /
``cancel`` given a batch id (:mod:`worker.cli` hands them over when the id names a batch)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from worker.batches.models import BatchInvalid
from worker.batches.progress import store_of
from worker.batches.store import BatchRecord

#: Exit codes, as worker.cli's: every item completed; an item did not, or no such batch; still running.
EXIT_OK, EXIT_FAILED, EXIT_STILL_RUNNING = 0, 1, 3


def read_items(path: str) -> list[Any]:
    """One request per non-blank line of a JSON Lines file (``-``: stdin)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    items: list[Any] = []
    errors: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            errors.append({"index": len(items), "field": "line", "message": f"line {number}: {exc.msg}"})
            items.append(None)
    if errors:
        raise BatchInvalid(errors)
    return items


def submit_batch(batch: dict[str, Any], *, wait: bool, timeout: float) -> int:
    from worker.app import app
    from worker.enqueue import enqueue_batch

    result = enqueue_batch(batch, app=app)
    print(f"enqueued batch {result.id} ({len(batch['items'])} items)", file=sys.stderr)
    if not wait:
        print(json.dumps({"batch_id": result.id}))
        return EXIT_OK
    return wait_for_batch(result.id, timeout=timeout)


def wait_for_batch(batch_id: str, *, timeout: float, interval: float = 0.5) -> int:
    """Show the batch's progress on stderr until every item ended; print the batch result."""
    from worker.enqueue import batch_status

    deadline = time.monotonic() + timeout
    last = ""
    record = batch_status(batch_id)
    while (record is None or record.outcome is None) and time.monotonic() < deadline:
        line = progress_line(batch_id, record)
        if line != last:
            print(line, file=sys.stderr)
            last = line
        time.sleep(interval)
        record = batch_status(batch_id)
    if record is None or record.outcome is None:
        print(
            f"batch {batch_id} still running after {timeout:g} s; see `lipsync-worker status {batch_id}`",
            file=sys.stderr,
        )
        return EXIT_STILL_RUNNING
    print(progress_line(batch_id, record), file=sys.stderr)
    print(json.dumps(record.outcome, indent=2))
    return EXIT_OK if _all_completed(record) else EXIT_FAILED


def progress_line(batch_id: str, record: BatchRecord | None) -> str:
    if record is None:
        return f"  batch {batch_id}: waiting for a worker to record it"
    bar_width = 30
    filled = bar_width * record.ended // max(1, record.total)
    counts = ", ".join(f"{status} {n}" for status, n in sorted(record.counts.items())) or "none ended"
    return (
        f"  batch {batch_id}: [{'#' * filled}{'.' * (bar_width - filled)}] {record.ended}/{record.total} "
        f"ended ({counts}); {record.in_flight} in flight, {record.total - record.admitted} waiting"
    )


def _all_completed(record: BatchRecord) -> bool:
    return record.counts.get("completed", 0) == record.total


def print_batch_status(batch_id: str) -> int | None:
    """Print the batch's counts, items in flight and failures with their reasons, as JSON. None
    when no batch has this id (the caller tries a job)."""
    from worker.jobs.resources import resources

    res = resources()
    store = store_of(res)
    record = store.get(batch_id)
    if record is None:
        return None
    results = store.results(batch_id)
    open_indexes = [i for i in range(record.admitted) if i not in results]
    in_flight = []
    for index, job_id in zip(open_indexes, store.job_ids_at(batch_id, open_indexes), strict=True):
        job = res.jobs.get(job_id)
        in_flight.append(
            {
                "index": index,
                "job_id": job_id,
                "state": job.state if job else "starting",
                "generation_id": job.generation_id if job else None,
                "gen_status": job.gen_status if job else None,
            }
        )
    failures = [
        {
            "index": index,
            "job_id": outcome.get("job_id"),
            "status": outcome.get("status"),
            "error_code": outcome.get("error_code"),
            "message": outcome.get("message"),
        }
        for index, outcome in sorted(results.items())
        if outcome.get("status") != "completed"
    ]
    summary = {
        "batch_id": batch_id,
        "state": "finished" if record.outcome is not None else record.state,
        "total": record.total,
        "max_parallel": record.max_parallel,
        "counts": record.counts,
        "ended": record.ended,
        "in_flight": record.in_flight,
        "waiting": record.total - record.admitted,
        "created_at": record.created_at,
        "callback_dispatched": record.dispatched,
        "metadata": record.metadata,
    }
    print(json.dumps({"batch": summary, "in_flight": in_flight, "failures": failures}, indent=2))
    return EXIT_OK


def cancel_batch(batch_id: str, *, reason: str) -> int | None:
    """Cancel every unfinished item of the batch; print the batch's result. None: no such batch."""
    from worker.enqueue import cancel_batch as cancel

    if store_of_default().get(batch_id) is None:
        return None
    record = cancel(batch_id, reason=reason)
    if record is None:
        return None
    print(
        json.dumps(record.outcome if record.outcome is not None else record.model_dump(mode="json"), indent=2)
    )
    return EXIT_OK


def store_of_default() -> Any:
    from worker.jobs.resources import resources

    return store_of(resources())
