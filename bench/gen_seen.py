"""What GEN (the simulator) saw of each generation: when it was asked for it, how long it took, every
call made about it, and when its output was fetched.

Everything comes from the simulator's own records (its request and arrival logs and its
generations), never from the worker's bookkeeping: a generation is found by the ``Idempotency-Key``
its generate request carried, its status calls by their path, its download by its output URL.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_STATUS_PATH = re.compile(r"/v1/generations/(\d+)")
_OUTPUT_PATH = re.compile(r"/cdn/outputs/([^/]+)\.mp4")


@dataclass(frozen=True)
class GenerationSeen:
    generation_id: int
    #: Seconds GEN took (the simulator's duration for it): L.
    duration: float
    #: Wall-clock time GEN created it (its generate request was served).
    created_at: float
    #: Generate requests that carried its Idempotency-Key (1 unless a submit was retried).
    generate_calls: int
    #: ``GET /v1/generations/{id}`` requests for it (the polls).
    status_calls: int
    #: ``GET`` of its output video.
    output_calls: int
    #: When the first request for its output arrived (wall clock); None if never fetched.
    output_fetched_at: float | None
    #: When each of its status requests arrived (wall clock), in order.
    status_at: tuple[float, ...] = ()

    @property
    def ready_at(self) -> float:
        """When GEN finished it (wall clock)."""
        return self.created_at + self.duration

    def first_seen_done(self) -> float | None:
        """When the first status request after GEN finished arrived (None: no such poll). A request
        read just before the end can be answered just after it: 10 ms of slack."""
        return next((t for t in self.status_at if t >= self.ready_at - 0.01), None)

    @property
    def calls(self) -> int:
        """GEN API and CDN calls about this generation: generate + status + output."""
        return self.generate_calls + self.status_calls + self.output_calls


#: Calls a job needs at the least: one generate, one status that finds it done, one download.
MIN_CALLS = 3


def seen_by_key(
    stats: Mapping[str, Any], generations: Mapping[int, Mapping[str, Any]]
) -> dict[str, GenerationSeen]:
    """Per Idempotency-Key, the (first) generation made under it, from a simulator ``stats()`` and
    its ``generation(id)`` snapshots."""
    status_calls: Counter[int] = Counter()
    status_at: dict[int, list[float]] = {}
    output_calls: Counter[str] = Counter()
    output_first: dict[str, float] = {}
    for arrival in stats["arrivals"]:
        path = arrival["path"]
        if arrival["endpoint"] == "get_generation" and arrival["method"] == "GET":
            match = _STATUS_PATH.fullmatch(path)
            if match:
                status_calls[int(match.group(1))] += 1
                status_at.setdefault(int(match.group(1)), []).append(arrival["t"])
        elif arrival["endpoint"] == "cdn" and arrival["method"] == "GET":
            match = _OUTPUT_PATH.fullmatch(path)
            if match:
                token = match.group(1)
                output_calls[token] += 1
                output_first.setdefault(token, arrival["t"])
    generate_calls: Counter[str] = Counter(
        request["idempotency_key"]
        for request in stats["requests"]
        if request["endpoint"] == "generate" and request["idempotency_key"]
    )
    seen = {}
    for key, ids in stats["generations_by_key"].items():
        gen = generations[ids[0]]
        seen[key] = GenerationSeen(
            generation_id=int(gen["id"]),
            duration=float(gen["duration"]),
            created_at=float(gen["created_at"]),
            generate_calls=generate_calls[key],
            status_calls=status_calls[int(gen["id"])],
            output_calls=output_calls[gen["token"]],
            output_fetched_at=output_first.get(gen["token"]),
            status_at=tuple(sorted(status_at.get(int(gen["id"]), []))),
        )
    return seen


def snapshot(sim: Any, keys: Iterable[str] | None = None) -> dict[str, GenerationSeen]:
    """:func:`seen_by_key` of a live simulator, for ``keys`` only (all keys if None)."""
    stats = sim.stats()
    wanted = set(keys) if keys is not None else None
    by_key = {k: v for k, v in stats["generations_by_key"].items() if wanted is None or k in wanted}
    generations = {ids[0]: sim.generation(ids[0]) for ids in by_key.values()}
    return seen_by_key({**stats, "generations_by_key": by_key}, generations)


def added_latency(seen: GenerationSeen, started_at: float) -> float | None:
    """Seconds a job took beyond GEN's own time: from the moment the client asked for it
    (``started_at``, wall clock) to the moment GEN saw its output requested, minus L. None if the
    output was never fetched."""
    if seen.output_fetched_at is None:
        return None
    return seen.output_fetched_at - started_at - seen.duration


def count_in_window(stats: Mapping[str, Any], endpoint: str, start: float, end: float) -> int:
    """Requests to ``endpoint`` that arrived in ``[start, end)`` (wall clock)."""
    return sum(1 for a in stats["arrivals"] if a["endpoint"] == endpoint and start <= a["t"] < end)
