"""Fault rules: what can go wrong on the way between the worker and GEN, and when it goes wrong.

A :class:`Fault` names an endpoint kind and one action (plus an optional delay). The
:class:`FaultBook` keeps the armed faults in the order they were added; each request takes the first
one that matches it, so ``times=N`` means "the next N matching requests" and later faults wait their
turn. Pure bookkeeping, no HTTP: the server decides how to carry an action out.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gensim.endpoints import ENDPOINT_KINDS

#: Endpoint kinds a fault can target. "any" matches every kind except the /_sim admin API.
FAULT_ENDPOINTS = frozenset({*ENDPOINT_KINDS, "any"})

#: Actions that shape a streamed CDN body; they make sense only where a file is served.
_STREAM_KINDS = frozenset({"cdn"})


@dataclass
class Fault:
    """One injected misbehaviour. Give an endpoint and one action; ``delay`` may accompany any action.

    Actions (at most one, except that ``reset_after_bytes`` and ``trickle`` may be combined):

    * ``status``: answer with this HTTP status and a GEN error body (``rate_limited`` for 429,
      ``internal_error`` for 5xx, ``simulated_fault`` otherwise); ``retry_after`` adds a
      ``Retry-After`` header.
    * ``drop``: read the request, then close the connection without answering.
    * ``malformed``: 200 with a body that is not JSON.
    * ``body``: 200 with this JSON instead of the real answer (wrong types, unknown statuses...).
    * ``reset_after_bytes``: (CDN) full headers, this many body bytes, then the connection closes.
    * ``trickle``: (CDN) the body in 1 KiB chunks, one every ``trickle`` seconds.
    * ``accept_then_drop``: (generate) handle the request for real, then drop the response.

    A fault with only ``delay`` answers normally, late. ``times=None`` keeps it until cleared.
    """

    endpoint: str
    times: int | None = 1
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0
    drop: bool = False
    malformed: bool = False
    body: dict[str, Any] | list[Any] | None = None
    reset_after_bytes: int | None = None
    trickle: float | None = None
    accept_then_drop: bool = False

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid Fault: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems: list[str] = []
        if self.endpoint not in FAULT_ENDPOINTS:
            problems.append(f"endpoint must be one of {sorted(FAULT_ENDPOINTS)}")
        if self.times is not None and (isinstance(self.times, bool) or self.times < 1):
            problems.append("times must be a positive integer or None")
        if self.status is not None and not 100 <= self.status <= 599:
            problems.append("status must be an HTTP status code")
        if self.retry_after is not None and (self.status is None or self.retry_after < 0):
            problems.append("retry_after needs a status and must be >= 0")
        if self.delay < 0:
            problems.append("delay must be >= 0")
        if self.reset_after_bytes is not None and self.reset_after_bytes < 0:
            problems.append("reset_after_bytes must be >= 0")
        if self.trickle is not None and self.trickle <= 0:
            problems.append("trickle must be > 0")
        streaming = self.reset_after_bytes is not None or self.trickle is not None
        if streaming and self.endpoint not in ("cdn", "any"):
            problems.append("reset_after_bytes/trickle apply only to endpoint 'cdn' (or 'any')")
        if self.accept_then_drop and self.endpoint not in ("generate", "any"):
            problems.append("accept_then_drop applies only to endpoint 'generate' (or 'any')")
        actions = [
            self.status is not None,
            self.drop,
            self.malformed,
            self.body is not None,
            streaming,
            self.accept_then_drop,
        ]
        if sum(actions) > 1:
            problems.append(
                "give at most one action (status, drop, malformed, body, stream, accept_then_drop)"
            )
        if sum(actions) == 0 and self.delay <= 0:
            problems.append("give an action or a delay")
        return problems

    def matches(self, kind: str) -> bool:
        """Whether this fault applies to a request of endpoint ``kind``.

        An "any" fault whose action only makes sense for one kind (a stream action, accept_then_drop)
        waits for a request of that kind instead of being used up on requests it cannot affect.
        """
        if self.endpoint not in ("any", kind):
            return False
        if (self.reset_after_bytes is not None or self.trickle is not None) and kind not in _STREAM_KINDS:
            return False
        return not (self.accept_then_drop and kind != "generate")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build from JSON (the HTTP admin API); unknown fields are an error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown Fault fields: {unknown}")
        if "endpoint" not in data:
            raise ValueError("Fault needs an 'endpoint'")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # a wrong JSON type reaching a comparison in the checks
            raise ValueError(f"invalid Fault: {exc}") from exc


@dataclass
class _Armed:
    fault: Fault
    remaining: int | None


class FaultBook:
    """The armed faults, consumed in the order added. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._armed.append(_Armed(fault, fault.times))
        return fault

    def clear(self) -> int:
        """Disarm everything; returns how many faults were still armed."""
        with self._lock:
            count = len(self._armed)
            self._armed.clear()
        return count

    def take(self, kind: str) -> Fault | None:
        """Use up one application of the first fault matching ``kind``, if any."""
        with self._lock:
            for index, armed in enumerate(self._armed):
                if not armed.fault.matches(kind):
                    continue
                if armed.remaining is not None:
                    armed.remaining -= 1
                    if armed.remaining <= 0:
                        del self._armed[index]
                return armed.fault
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        """The armed faults with how many uses each has left (None = until cleared)."""
        with self._lock:
            return [{**a.fault.to_dict(), "remaining": a.remaining} for a in self._armed]
