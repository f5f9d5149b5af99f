"""A local webhook receiver that verifies Standard Webhooks signatures, as a real receiver would."""

from __future__ import annotations

import json
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
    received: list[Received] = field(default_factory=list)
    attempts: int = 0

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k: v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.attempts += 1
                    failing = receiver.fail_next > 0
                    if failing:
                        receiver.fail_next -= 1
                    holding = receiver.hold_next > 0
                    if holding:
                        receiver.hold_next -= 1
                    dripping = receiver.drip_next > 0
                    if dripping:
                        receiver.drip_next -= 1
                if holding:
                    time.sleep(receiver.hold_seconds)
                if dripping:
                    self._drip(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                    return
                if failing:
                    self.send_response(receiver.fail_status)
                    self.end_headers()
                    return
                try:
                    msg_id = verify(receiver.secret, body, headers)
                    verified = True
                except WebhookVerificationError:
                    msg_id, verified = headers.get("webhook-id", ""), False
                with receiver._lock:
                    receiver.received.append(Received(msg_id, json.loads(body), verified, headers))
                self.send_response(204 if verified else 401)
                self.end_headers()

            def _drip(self, answer: bytes) -> None:
                try:
                    for byte in answer:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(receiver.drip_interval)
                except OSError:
                    return  # the sender gave up
                with receiver._lock:
                    receiver.drips_completed += 1
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

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
            self.received.clear()
            self.attempts = 0

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
