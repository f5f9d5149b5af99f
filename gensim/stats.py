"""What the simulator saw and did, kept exact so tests can assert on it.

Four kinds of facts: the request log (every request except the /_sim admin API, faulted or not,
recorded just before its response goes out so that a client which got an answer also finds it
here), the arrival log (the same requests, recorded the moment each one was read, before any fault
delays it: when a client that died mid-request had asked), and the generation bookkeeping that
:mod:`gensim.state` reports (creations, per Idempotency-Key and per target, charges, stop
requests), and the agents' events (each status change announced to a webhook: sent, with its
answer, or lost on purpose). Thread-safe; :meth:`Stats.snapshot` returns plain JSON-able data.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from gensim.endpoints import ENDPOINT_KINDS

#: Endpoint kinds that are always present in ``counts`` (zero until seen), so tests can index them.
KNOWN_KINDS = (*ENDPOINT_KINDS, "unknown")

#: The request log keeps the most recent entries only, so a long benchmark cannot exhaust memory.
MAX_LOGGED_REQUESTS = 100_000


def target_key(sheet_id: int | str, cell_id: int | str, layer_id: int | str | None) -> str:
    """How ``generations_by_target`` names a target: ``"<sheet>/<cell>/<layer>"``, ``-`` for no layer."""
    return f"{sheet_id}/{cell_id}/{'-' if layer_id is None else layer_id}"


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clear()

    def _clear(self) -> None:
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_LOGGED_REQUESTS)
        self._arrivals: deque[dict[str, Any]] = deque(maxlen=MAX_LOGGED_REQUESTS)
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_LOGGED_REQUESTS)
        self._counts: dict[str, int] = dict.fromkeys(KNOWN_KINDS, 0)
        self._unauthorized = 0
        self._generations_created = 0
        self._charges = 0
        self._replays = 0
        self._by_key: dict[str, list[int]] = {}
        self._by_target: dict[str, list[int]] = {}
        self._stops: list[int] = []

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def log_request(
        self,
        *,
        method: str,
        path: str,
        endpoint: str,
        status: int | None,
        idempotency_key: str | None,
        faulted: bool,
        gen_status: str | None = None,
    ) -> None:
        """``gen_status``: the generation's status as answered (a status read), so a test can tell
        the first request that saw it completed; the entry has the field only then."""
        entry: dict[str, Any] = {
            "t": time.time(),
            "method": method,
            "path": path,
            "endpoint": endpoint,
            "status": status,
            "idempotency_key": idempotency_key,
            "faulted": faulted,
        }
        if gen_status is not None:
            entry["gen_status"] = gen_status
        with self._lock:
            self._requests.append(entry)
            self._counts[endpoint] = self._counts.get(endpoint, 0) + 1
            if status == 401:
                self._unauthorized += 1

    def request_arrived(self, *, method: str, path: str, endpoint: str) -> None:
        """A request was read (before any fault acts on it)."""
        entry = {"t": time.time(), "method": method, "path": path, "endpoint": endpoint}
        with self._lock:
            self._arrivals.append(entry)

    def generation_created(
        self, generation_id: int, idempotency_key: str | None, *, target: str | None = None
    ) -> None:
        """A generation was created; ``target`` is its :func:`target_key` (what GEN itself shows on
        the cell or layer: one more job in its ``user_jobs``)."""
        with self._lock:
            self._generations_created += 1
            self._charges += 1
            if idempotency_key is not None:
                self._by_key.setdefault(idempotency_key, []).append(generation_id)
            if target is not None:
                self._by_target.setdefault(target, []).append(generation_id)

    def event_sent(self, entry: dict[str, Any]) -> None:
        """An event was announced: ``{"t", "generation_id", "status", "event", "lost", "http_status",
        "error"}`` (``lost``: dropped on purpose, never sent; else the receiver's answer or the error)."""
        with self._lock:
            self._events.append(dict(entry))

    def replayed(self) -> None:
        with self._lock:
            self._replays += 1

    def charged(self) -> None:
        with self._lock:
            self._charges += 1

    def stop_received(self, generation_id: int) -> None:
        with self._lock:
            self._stops.append(generation_id)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": [dict(r) for r in self._requests],
                "arrivals": [dict(r) for r in self._arrivals],
                "events": [dict(e) for e in self._events],
                "counts": dict(self._counts),
                "generations_created": self._generations_created,
                "charges": self._charges,
                "replays": self._replays,
                "generations_by_key": {k: list(v) for k, v in self._by_key.items()},
                "generations_by_target": {k: list(v) for k, v in self._by_target.items()},
                "stops": list(self._stops),
                "unauthorized": self._unauthorized,
            }
