"""A local webhook receiver that verifies Standard Webhooks signatures, as a real receiver would."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from worker.callbacks.signing import WebhookVerificationError, verify


@dataclass
class Received:
    msg_id: str
    payload: dict[str, Any]
    verified: bool
    headers: dict[str, str]
    #: When the receiver took it (epoch seconds): the webhook's delivery time.
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Arrival:
    """One POST as it arrived, before the receiver decided anything (taken, failed, held, hung)."""

    at: float
    msg_id: str


@dataclass
class WebhookReceiver:
    secret: str
    #: Answer this status to the next N requests (e.g. 503 to simulate an endpoint that is down).
    fail_next: int = 0
    fail_status: int = 503
    #: Hold the next N requests this long before handling them (a slow receiver, a POST in flight).
    hold_next: int = 0
    hold_seconds: float = 0.0
    #: Answer the next N requests one byte per ``drip_interval`` (never taking the webhook): each
    #: read is quick, the whole answer is not.
    drip_next: int = 0
    drip_interval: float = 1.0
    drips_completed: int = 0
    #: Hang on the next N requests: never answer and never take the webhook, until the sender hangs
    #: up, ``hang_seconds`` pass or the receiver closes (a receiver stuck mid-request).
    hang_next: int = 0
    hang_seconds: float = 300.0
    received: list[Received] = field(default_factory=list)
    #: Every POST, when it arrived (``webhook-id`` header), whatever became of it.
    arrivals: list[Arrival] = field(default_factory=list)
    attempts: int = 0

    def __post_init__(self) -> None:
        handler = type("Handler", (_Handler,), {"receiver": self})
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _arrived(self, msg_id: str) -> set[str]:
        """Count a POST and use up one of each armed misbehaviour: which ones apply to it."""
        modes = set()
        with self._lock:
            self.attempts += 1
            self.arrivals.append(Arrival(time.time(), msg_id))
            for mode in ("hang", "fail", "hold", "drip"):
                armed = getattr(self, f"{mode}_next")
                if armed > 0:
                    setattr(self, f"{mode}_next", armed - 1)
                    modes.add(mode)
        return modes

    def hang(self, count: int = 1) -> int:
        """Hang on the next ``count`` POSTs (see ``hang_next``); returns the index in ``arrivals``
        the first of them will have."""
        with self._lock:
            if self.hang_next:
                raise RuntimeError("already hanging on the next POSTs")
            self.hang_next = count
            return len(self.arrivals)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/lipsync"

    def ids(self) -> list[str]:
        with self._lock:
            return [r.msg_id for r in self.received]

    def reset(self) -> None:
        """Forget what was received and answer every webhook normally again (one receiver can serve
        many tests: closing one takes about half a second)."""
        with self._lock:
            self.fail_next, self.fail_status = 0, 503
            self.hold_next, self.hold_seconds = 0, 0.0
            self.drip_next, self.drips_completed = 0, 0
            self.hang_next, self.hang_seconds = 0, 300.0
            self.received.clear()
            self.arrivals.clear()
            self.attempts = 0

    def deliveries(self) -> dict[str, list[Received]]:
        """What the receiver took, by the payload's ``job_id``."""
        by_job: dict[str, list[Received]] = {}
        with self._lock:
            for received in self.received:
                by_job.setdefault(str(received.payload.get("job_id", "?")), []).append(received)
        return by_job

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    receiver: WebhookReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in self.headers.items()}
        modes = self.receiver._arrived(headers.get("webhook-id", ""))
        if "hang" in modes:
            self._hang()
            return
        if "hold" in modes:
            time.sleep(self.receiver.hold_seconds)
        if "drip" in modes:
            self._drip(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            return
        if "fail" in modes:
            self.send_response(self.receiver.fail_status)
            self.end_headers()
            return
        try:
            msg_id = verify(self.receiver.secret, body, headers)
            verified = True
        except WebhookVerificationError:
            msg_id, verified = headers.get("webhook-id", ""), False
        with self.receiver._lock:
            self.receiver.received.append(Received(msg_id, json.loads(body), verified, headers))
        self.send_response(204 if verified else 401)
        self.end_headers()

    def _hang(self) -> None:
        # Wait for the sender to hang up (its socket becomes readable at EOF), the time to
        # pass, or the receiver to close; then close without an answer.
        deadline = time.monotonic() + self.receiver.hang_seconds
        self.connection.settimeout(0.2)
        while time.monotonic() < deadline and not self.receiver._closing.is_set():
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self.close_connection = True

    def _drip(self, answer: bytes) -> None:
        try:
            for byte in answer:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(self.receiver.drip_interval)
        except OSError:
            return  # the sender gave up
        with self.receiver._lock:
            self.receiver.drips_completed += 1
        self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass
