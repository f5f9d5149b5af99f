"""GEN's agent events, simulated: the automation config, ``test_webhook``, and a POST to the agent's
``webhook_url`` each time a generation changes status, late by a delay and lost at a rate.

GEN documents that it POSTs "when generations complete, rows change, or other events occur" and
that the test payload "matches the same format as real event payloads", but not the format itself,
nor retries or guarantees (gen-api.md §3.10). The body sent here is a plausible guess, which is why
the worker's receiver reads any shape::

    {"event": "generation.completed", "agent_id": "42", "spreadsheet_id": 101, "cell_id": 3000,
     "layer_id": 4000, "generation": {...the object GET /v1/generations/{id} returns...}}

An event goes out for ``processing``, ``completed``, ``failed`` (at the moments the generation's
clock reaches them: :class:`EventSender` is a scheduler thread, since the state computes status
lazily) and ``stopped`` (at the stop). Each is sent ``delay`` seconds after the change, once, with
no retry: with probability ``loss`` it is not sent at all (GEN promises no delivery). What happened
to every event is in the stats (``events``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: GEN's test reports "Timeout after 10s": the same limit for every POST.
POST_TIMEOUT = 10.0
#: Longest a scheduler wait lasts, so a clock moved by hand (the tests' fake clock) is noticed.
MAX_WAIT = 0.25


def validate_event_delay(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise ValueError("event_delay must be a number of seconds in [0, 3600]")
    return float(value)


def validate_event_loss(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("event_loss must be a probability in [0, 1]")
    return float(value)


@dataclass
class AutomationConfig:
    """One agent's ``automation_config``."""

    webhook_url: str | None = None
    callback_url: str | None = None
    polling_enabled: bool = True

    def view(self) -> dict[str, Any]:
        return {
            "webhook_url": self.webhook_url,
            "callback_url": self.callback_url,
            "polling_enabled": self.polling_enabled,
        }


def apply_patch(config: AutomationConfig, body: object) -> str | None:
    """Apply a PATCH body (``{"automation_config": {...}}``, or the fields at the top level) to
    ``config``. Returns the validation error GEN would answer with, or None."""
    if not isinstance(body, dict):
        return "Request body must be a JSON object"
    inner = body.get("automation_config", body)
    if not isinstance(inner, dict):
        return "automation_config must be an object"
    changes: dict[str, Any] = {}
    for name in ("webhook_url", "callback_url"):
        if name in inner:
            url = inner[name]
            if url is not None and not _valid_url(url):
                return f"{name} must be a valid http(s) URL or null"
            changes[name] = url
    if "polling_enabled" in inner:
        if not isinstance(inner["polling_enabled"], bool):
            return "polling_enabled must be a boolean"
        changes["polling_enabled"] = inner["polling_enabled"]
    if not changes:
        return "Nothing to update: give webhook_url, callback_url or polling_enabled"
    for name, value in changes.items():
        setattr(config, name, value)
    return None


def _valid_url(url: object) -> bool:
    if not isinstance(url, str) or len(url) > 2048:
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def post_json(
    url: str, payload: dict[str, Any], timeout: float = POST_TIMEOUT
) -> tuple[int | None, str | None]:
    """POST ``payload`` as JSON: (HTTP status, None) when answered, (None, GEN's kind of error text)
    when not. Never follows a proxy from the environment (the receiver is usually on loopback)."""
    if not _valid_url(url):  # http(s) only: never file: or another scheme urllib would open
        return None, "invalid URL"
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "GenSimulator/1.0 (events)"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        return int(exc.code), None
    except TimeoutError:
        return None, f"Timeout after {timeout:g}s"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return None, f"Timeout after {timeout:g}s"
        if isinstance(reason, ConnectionRefusedError):
            return None, "Connection refused"
        return None, f"{type(reason).__name__}: {reason}"[:200]


@dataclass(order=True)
class _Due:
    """A status change to announce at ``at`` (the simulator's clock)."""

    at: float
    seq: int
    generation_id: int = field(compare=False)
    status: str = field(compare=False)
    #: The generation's ``continues`` when scheduled: a continue makes older changes void.
    epoch: int = field(compare=False)


#: Given (generation id, status, epoch), the webhook URL and the body to send, or None when the
#: change no longer holds (stopped, continued) or the agent has no webhook URL.
EventSource = Callable[[int, str, int], tuple[str, dict[str, Any]] | None]
#: Told what became of each event (the stats' ``event_sent``).
EventLog = Callable[[dict[str, Any]], None]


class EventSender:
    """Sends each status change when the clock reaches it (plus ``delay``), or loses it (``loss``)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        source: EventSource,
        log: EventLog,
        post: Callable[[str, dict[str, Any]], tuple[int | None, str | None]] = post_json,
    ) -> None:
        self._clock = clock
        self._source = source
        self._log = log
        self._post = post
        #: Seconds between a status change and its POST.
        self.delay = 0.0
        #: Probability in [0, 1] that an event is not sent at all.
        self.loss = 0.0
        self._random = random.Random()
        self._due: list[_Due] = []
        self._seq = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def seed(self, seed: int | None) -> None:
        """Make the losses reproducible (None: unpredictable again)."""
        with self._changed:
            self._random = random.Random(seed)

    def schedule(self, generation_id: int, status: str, at: float, epoch: int) -> None:
        with self._changed:
            heapq.heappush(self._due, _Due(at, next(self._seq), generation_id, status, epoch))
            self._changed.notify()

    def clear(self) -> None:
        with self._changed:
            self._due.clear()

    def start(self) -> None:
        with self._changed:
            if self._thread is not None:
                return
            self._stopping = False
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gen-sim-event-post")
            self._thread = threading.Thread(target=self._run, name="gen-sim-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._changed:
            thread, pool = self._thread, self._pool
            self._stopping = True
            self._thread = self._pool = None
            self._changed.notify()
        if thread is not None:
            thread.join(timeout=5)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._stopping:
                    if not self._due:
                        self._changed.wait(timeout=1.0)
                        continue
                    wait = self._due[0].at + self.delay - self._clock()
                    if wait <= 0:
                        break
                    self._changed.wait(timeout=min(MAX_WAIT, wait))
                if self._stopping:
                    return
                due = heapq.heappop(self._due)
                pool = self._pool
            self._announce(due, pool)

    def _announce(self, due: _Due, pool: ThreadPoolExecutor | None) -> None:
        found = self._source(due.generation_id, due.status, due.epoch)
        if found is None:
            return
        url, body = found
        with self._changed:
            lost = self._random.random() < self.loss
        entry: dict[str, Any] = {
            "t": time.time(),
            "generation_id": due.generation_id,
            "status": due.status,
            "event": body.get("event"),
            "lost": lost,
            "http_status": None,
            "error": None,
        }
        if lost or pool is None:
            self._log(entry)
            return

        def send() -> None:
            entry["http_status"], entry["error"] = self._post(url, body)
            self._log(entry)

        with contextlib.suppress(RuntimeError):  # the pool shut down: the simulator is stopping
            pool.submit(send)
