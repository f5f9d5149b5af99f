"""``lipsync-worker events``: the HTTP endpoint GEN's agent webhook posts its events to.

One route, ``POST /gen-events/<token>`` (:mod:`worker.events.tokens`), plus ``GET /healthz``. Each
event is read whatever its shape (:mod:`worker.events.payload`), and every job waiting on what it
names is polled now (:mod:`worker.jobs.nudge`). The poll stays the source of truth: an event moves a
poll earlier, nothing else.

What each POST gets back, and how it is counted (``lipsync_gen_events_total{outcome}``):

========================================  =====  ============
the request                               HTTP   outcome
========================================  =====  ============
wrong or missing token (any method)       404    ``refused``
right token, not POST                     405    ``refused``
no Content-Length                         411    ``refused``
body over ``LIPSYNC_EVENTS_MAX_BODY``      413    ``refused`` (not read)
body not JSON (or cut short)              400    ``unreadable``
JSON naming no generation, cell or layer  200    ``unreadable``
naming only things none of our jobs wait  200    ``unmatched``
naming a job we wait on                   200    ``matched``
Redis or the broker failing               503    (not counted: Redis is what counts)
========================================  =====  ============

An unreadable body is logged by its shape only (:func:`worker.events.payload.shape`: keys and
types, no values), at WARNING the first time each shape is seen and at DEBUG after that, so a
flood of junk cannot flood the log. The token is never logged: not in access lines, not in errors.
Bodies are read up to ``LIPSYNC_EVENTS_MAX_BODY``, each connection with a read timeout, so a slow or
huge sender holds one thread for a bounded time.

Stateless (the job records, the index and the counters are in Redis): run one or several replicas
behind the URL registered with GEN (``lipsync-worker gen-webhook register``).
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from worker.cards.flow import reread_named
from worker.events import payload
from worker.events.tokens import mask_text, token_matches
from worker.jobs.nudge import Named, nudge_jobs
from worker.jobs.resources import Resources
from worker.ops import metrics
from worker.taskqueue import TaskQueue

logger = logging.getLogger("lipsync.events")

#: Seconds a connection may take to send its request (a slow sender holds one thread this long).
READ_TIMEOUT = 10.0
#: Bodies refused as too large are still read (and dropped) up to this size, so the sender gets
#: its 413 instead of a connection reset mid-upload; larger ones are not read at all.
DRAIN_LIMIT = 1024 * 1024
#: Distinct unreadable shapes logged at WARNING (later ones, and repeats, at DEBUG).
MAX_SHAPES_WARNED = 256


@dataclass(frozen=True)
class Answer:
    status: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: str, document: dict[str, Any]) -> Answer:
        return cls(status, json.dumps(document).encode(), (("Content-Type", "application/json"),))

    @classmethod
    def text(cls, status: str, text: str, *headers: tuple[str, str]) -> Answer:
        return cls(status, text.encode(), (("Content-Type", "text/plain; charset=utf-8"), *headers))


@dataclass
class _ShapeLog:
    """Unreadable shapes already warned about, so each is a WARNING once."""

    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_time(self, shape: str) -> bool:
        with self.lock:
            if shape in self.seen or len(self.seen) >= MAX_SHAPES_WARNED:
                return False
            self.seen.add(shape)
            return True


class EventReceiver:
    """The WSGI application (see the module docstring for what each request gets)."""

    def __init__(self, queue: TaskQueue, res: Resources, *, token: str, max_body: int) -> None:
        self.queue = queue
        self.res = res
        self.token = token
        self.max_body = max_body
        self._shapes = _ShapeLog()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        answer = self.answer(environ)
        start_response(answer.status, [*answer.headers, ("Content-Length", str(len(answer.body)))])
        return [answer.body]

    def answer(self, environ: WSGIEnvironment) -> Answer:
        path = str(environ.get("PATH_INFO") or "/")
        method = str(environ.get("REQUEST_METHOD") or "GET")
        if path == "/healthz":
            # Liveness of this server only (like the metrics endpoint's): Redis is not its to fix.
            return Answer.text("200 OK", "ok")
        if not token_matches(path, self.token):
            return self._refused(Answer.text("404 Not Found", "not found"))
        if method != "POST":
            return self._refused(Answer.text("405 Method Not Allowed", "POST only", ("Allow", "POST")))
        length = _content_length(environ)
        if length is None:
            return self._refused(Answer.text("411 Length Required", "Content-Length required"))
        if length > self.max_body:
            if length <= DRAIN_LIMIT:
                # Read and dropped, so that the sender gets the 413 rather than a reset connection.
                _read(environ, length)
            return self._refused(Answer.text("413 Content Too Large", f"body over {self.max_body} bytes"))
        try:
            return self._event(_read(environ, length), environ.get("CONTENT_TYPE"))
        except Exception as exc:  # Redis or the broker failed: say so, never crash the server
            # One line per event (an outage must not fill the log with tracebacks); the trace at DEBUG.
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            logger.warning("GEN event not handled (Redis or the broker failing?): %s; answered 503", detail)
            logger.debug("GEN event not handled", exc_info=True)
            return Answer.text("503 Service Unavailable", "try again later")

    def _event(self, body: bytes | None, content_type: str | None) -> Answer:
        if body is None:
            return self._unreadable("a body cut short", "400 Bad Request")
        try:
            document = payload.parse(body)
        except payload.Unreadable:
            return self._unreadable(payload.describe_unparsed(body, content_type), "400 Bad Request")
        ids = payload.read_ids(document)
        if not ids.names_anything():
            return self._unreadable(payload.shape(document), "200 OK")
        report = nudge_jobs(
            self.queue,
            self.res,
            Named(tuple(ids.generation), tuple(ids.cell), tuple(ids.layer)),
        )
        # A Lipsync card on a cell or layer the event names: its sources are read again (worker.cards).
        reread = reread_named(self.queue, self.res, ids.cell, ids.layer)
        outcome = "matched" if report.matched or reread else "unmatched"
        metrics.record_gen_event(self.res.redis, outcome=outcome)
        logger.debug(
            "GEN event: %s (generations %s, cells %s, layers %s); polled now: %s",
            outcome,
            ids.generation,
            ids.cell,
            ids.layer,
            report.sent,
        )
        return Answer.json("200 OK", {"outcome": outcome, "polled_now": len(report.sent)})

    def _unreadable(self, shape: str, status: str) -> Answer:
        metrics.record_gen_event(self.res.redis, outcome="unreadable")
        level = logging.WARNING if self._shapes.first_time(shape) else logging.DEBUG
        logger.log(level, "GEN event not understood (%s); answered %s", shape, status.split()[0])
        return Answer.json(status, {"outcome": "unreadable"})

    def _refused(self, answer: Answer) -> Answer:
        metrics.record_gen_event(self.res.redis, outcome="refused")
        return answer


def _content_length(environ: WSGIEnvironment) -> int | None:
    raw = str(environ.get("CONTENT_LENGTH") or "").strip()
    return int(raw) if raw.isdigit() else None


def _read(environ: WSGIEnvironment, length: int) -> bytes | None:
    """Exactly ``length`` bytes of body, or None when the sender stops short (or times out)."""
    stream = environ["wsgi.input"]
    chunks: list[bytes] = []
    remaining = length
    try:
        while remaining > 0:
            chunk = stream.read(min(remaining, 64 * 1024))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError:  # the read timeout, a reset
        return None
    return b"".join(chunks)


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # Daemon threads: a stuck sender must not keep the process alive after SIGTERM.
    daemon_threads = True


def _handler_for(token: str) -> type[WSGIRequestHandler]:
    class Handler(WSGIRequestHandler):
        # A socket timeout for each connection: a sender that stalls is cut off.
        timeout = READ_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:
            # The request line holds the token: mask it in every line the server writes.
            logger.debug("events http: %s", mask_text(format % args, token))

    return Handler


class EventServer:
    """The receiver on ``host:port``, served from a daemon thread until :meth:`stop`."""

    def __init__(self, app: EventReceiver, host: str, port: int) -> None:
        # WSGIServer is AF_INET only; pick the family from the address so "::" works too.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Server(_ThreadingServer):
            address_family = family

        wsgi: WSGIApplication = app
        self._server = make_server(
            str(sockaddr[0]), port, wsgi, Server, handler_class=_handler_for(app.token)
        )
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="gen-events-http",
            daemon=True,
        )

    def start(self) -> EventServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(app: EventReceiver, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT (main thread only)."""
    server = EventServer(app, host, port).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The path is not logged: it holds the token.
    logger.info("receiving GEN events on http://%s:%d/gen-events/***", host, server.port)
    try:
        while not stop.wait(timeout=1.0):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("GEN event receiver stopped")
