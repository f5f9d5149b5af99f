"""HTTP in front of :class:`~gensim.state.SimState`: routing, auth, faults, the CDN, /_sim.

One request goes: read it fully -> route it to an endpoint kind -> note its arrival -> take the first
matching fault -> (delay) -> answer for real or as the fault says -> log it in the stats -> send. The
log entry is written before the first response byte, so a client that has its answer already finds
it in ``stats()``. The /_sim admin API is neither faulted nor logged: it is how tests steer the
simulator.

Standard library only. HTTP/1.1 with keep-alive, because the worker's ``requests`` session pools
connections and the faults have to behave the way they would on a real pooled connection.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hmac
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from gensim.direct_uploads import STORAGE_PATH, DirectUploads
from gensim.events import validate_event_delay, validate_event_loss
from gensim.faults import Fault, FaultBook
from gensim.state import ApiError, SimState, validate_durations
from gensim.stats import Stats

log = logging.getLogger("gensim")

#: What a ``malformed`` fault sends: the start of a generation object, cut off mid-value.
MALFORMED_BODY = b'{"id": 9001, "status": '
TRICKLE_CHUNK = 1024
#: Request bodies larger than this are refused; the real API takes small JSON documents only.
MAX_BODY = 1 << 20
#: ... except the PUT of a direct upload's bytes (held in memory: tests send small files).
MAX_PUT_BODY = 256 << 20
#: Idle keep-alive connections are closed after this long (clients reconnect transparently).
IDLE_TIMEOUT = 120.0

_CELL = r"/v1/(?P<prefix>autocontentengine|vidsheet)/(?P<sheet>[^/]+)/cells/(?P<cell>[^/]+)"
_LAYER = _CELL + r"/layers/(?P<layer>[^/]+)"
_GEN = r"/v1/generations/(?P<gen>[^/]+)"
_AGENT = r"/v1/agents/(?P<agent>[^/]+)"

#: (methods, path pattern, endpoint kind). The kind names the endpoint for faults and stats.
ROUTES: list[tuple[frozenset[str], re.Pattern[str], str]] = [
    (frozenset({"POST"}), re.compile(_CELL + "/generate"), "generate"),
    (frozenset({"POST"}), re.compile(_LAYER + "/generate"), "generate"),
    (frozenset({"GET"}), re.compile(_CELL), "get_cell"),
    (frozenset({"PATCH"}), re.compile(_CELL), "patch_cell"),
    (frozenset({"GET"}), re.compile(_LAYER), "get_layer"),
    (frozenset({"GET"}), re.compile(_GEN), "get_generation"),
    (frozenset({"POST"}), re.compile(_GEN + "/stop"), "stop"),
    (frozenset({"POST"}), re.compile(_GEN + "/continue"), "continue"),
    (frozenset({"GET"}), re.compile(r"/v1/content_resources/(?P<resource>[^/]+)"), "content_resource"),
    # Step 3 of a direct upload (a JSON signed id) and a multipart upload share a path; see JSON_ONLY.
    (frozenset({"POST"}), re.compile(r"/v1/content_resources"), "create_content_resource"),
    (frozenset({"POST"}), re.compile(r"/v1/content_resources"), "upload_content_resource"),
    (frozenset({"POST"}), re.compile(r"/v1/direct_upload"), "direct_upload"),
    (frozenset({"PUT"}), re.compile(re.escape(STORAGE_PATH) + r"(?P<key>[^/]+)"), "direct_upload_put"),
    (frozenset({"GET"}), re.compile(r"/v1/me"), "me"),
    (frozenset({"GET"}), re.compile(_AGENT + "/automation_config"), "automation_config"),
    (frozenset({"PATCH"}), re.compile(_AGENT + "/automation_config"), "set_automation_config"),
    (frozenset({"POST"}), re.compile(_AGENT + "/automation_config/test_webhook"), "test_webhook"),
    (frozenset({"POST"}), re.compile(_AGENT + "/automation_config/test_callback"), "test_callback"),
    (
        frozenset({"GET", "HEAD"}),
        re.compile(r"/cdn/(?P<folder>outputs|thumbnails|uploads)/(?P<name>[^/]+)\.(?P<ext>mp4|jpg|mp3)"),
        "cdn",
    ),
]

#: Kinds routed only for a JSON request body (otherwise the next matching route is taken).
JSON_ONLY = frozenset({"create_content_resource"})

#: Endpoint kinds of the agent's automation config (answered by SimHandler._agent_api).
AGENT_KINDS = frozenset({"automation_config", "set_automation_config", "test_webhook", "test_callback"})

_FAULT_MESSAGES = {
    429: ("rate_limited", "Too many requests, slow down"),
    401: ("unauthorized", "Unauthorized"),
    403: ("permission_denied", "Permission denied"),
    404: ("not_found", "Not found"),
    422: ("validation_error", "Validation failed"),
}


@dataclass
class SimContext:
    """The parts a request handler works with; the simulator object owns one of these."""

    state: SimState
    faults: FaultBook
    stats: Stats
    api_key: str
    #: Set when the simulator stops, to cut delays and trickles short.
    stopping: threading.Event = field(default_factory=threading.Event)
    #: GEN's direct upload: blobs and the bytes PUT to them.
    uploads: DirectUploads = field(default_factory=DirectUploads)

    def stats_snapshot(self) -> dict[str, Any]:
        return {**self.stats.snapshot(), "faults": self.faults.snapshot()}

    def reset(self) -> None:
        self.faults.clear()
        self.uploads.clear()
        self.state.reset()
        self.stats.reset()

    def config(self) -> dict[str, Any]:
        return {
            "output_size": self.state.output_size,
            "strict_dialect": self.state.strict_dialect,
            "durations": dict(self.state.durations),
            "agent_ids": sorted(self.state.agent_ids),
            "base_url": self.state.base_url,
            "event_delay": self.state.events.delay,
            "event_loss": self.state.events.loss,
        }


@dataclass
class Reply:
    """A response to send. ``status`` None means: close the connection without answering."""

    status: int | None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: Send only this many body bytes (after full headers), then close: a reset mid-download.
    cut_after: int | None = None
    #: Seconds between 1 KiB body chunks: a slow CDN.
    trickle: float | None = None
    #: A status read's answer: the generation's status (logged, see Stats.log_request).
    gen_status: str | None = None

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
        return cls(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    @classmethod
    def error(cls, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
        return cls.json(status, {"error": message, "error_code": code}, headers)

    @classmethod
    def dropped(cls) -> Reply:
        return cls(None)


def fault_reply(fault: Fault) -> Reply | None:
    """The canned answer of a fault, or None if the request is to be handled for real."""
    if fault.status is not None:
        code, message = _FAULT_MESSAGES.get(fault.status, ("simulated_fault", "Simulated fault"))
        if fault.status >= 500:
            code, message = "internal_error", "Internal server error"
        headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
        return Reply.error(fault.status, code, message, headers)
    if fault.drop:
        return Reply.dropped()
    if fault.malformed:
        return Reply(200, MALFORMED_BODY, {"Content-Type": "application/json"})
    if fault.body is not None:
        return Reply.json(200, fault.body)
    return None


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a single ``Range: bytes=...``; None to send everything.

    Raises ValueError for a range that cannot be satisfied (the caller answers 416). Anything else
    it does not understand, such as several ranges, is ignored, as RFC 9110 allows.
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first_text, last_text = match.groups()
    if not first_text:  # suffix range: the last N bytes
        length = int(last_text)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(0, total - length), total - 1
    first = int(first_text)
    last = min(int(last_text), total - 1) if last_text else total - 1
    if first >= total or last < first:
        raise ValueError("range not satisfiable")
    return first, last


class SimHTTPServer(ThreadingHTTPServer):
    """A threading server that remembers its open connections, so stopping it really disconnects
    clients: otherwise a pooled keep-alive connection would keep talking to a stopped simulator."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 resets connections when many workers connect at once.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], context: SimContext) -> None:
        self.context = context
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, SimHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed by the client
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-request is normal here (timeouts, faults); no tracebacks on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class SimHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, the body waits for the client's
    # delayed ACK of the headers (40 ms on Linux), which made every simulated GEN call 40 ms long.
    disable_nagle_algorithm = True
    server_version = "GenSimulator/1.0"
    timeout = IDLE_TIMEOUT

    @property
    def ctx(self) -> SimContext:
        return cast(SimHTTPServer, self.server).context

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    # ------------------------------------------------------------------ the request pipeline

    def _serve(self, method: str) -> None:
        try:
            raw_body = self._read_body()
        except ValueError as exc:
            self._send(Reply.error(413, "validation_error", str(exc)), method)
            self.close_connection = True
            return
        url = urlsplit(self.path)
        path = unquote(url.path).rstrip("/") or "/"
        query = parse_qs(url.query)
        if path == "/_sim" or path.startswith("/_sim/"):
            self._send(self._admin(method, path, raw_body), method)
            return

        kind, params = "unknown", {}
        for methods, pattern, route_kind in ROUTES:
            match = pattern.fullmatch(path)
            if route_kind in JSON_ONLY and self.headers.get_content_type() != "application/json":
                continue
            if match and method in methods:
                kind, params = route_kind, match.groupdict()
                break
        self.ctx.stats.request_arrived(method=method, path=path, endpoint=kind)
        fault = self.ctx.faults.take(kind)
        if fault is not None and fault.delay > 0:
            self.ctx.stopping.wait(fault.delay)
        reply = fault_reply(fault) if fault is not None else None
        if reply is None:
            reply = self._handle(kind, method, path, params, query, raw_body)
            if fault is not None and fault.accept_then_drop:
                reply = Reply.dropped()  # the work is done; only the answer is lost
            elif fault is not None:
                reply.cut_after, reply.trickle = fault.reset_after_bytes, fault.trickle
        self.ctx.stats.log_request(
            method=method,
            path=path,
            endpoint=kind,
            status=reply.status,
            idempotency_key=self.headers.get("Idempotency-Key") or None,
            faulted=fault is not None,
            gen_status=reply.gen_status,
        )
        self._send(reply, method)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > (MAX_PUT_BODY if self.command == "PUT" else MAX_BODY):
            raise ValueError("Request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline()
            if len(body) > MAX_BODY:
                raise ValueError("Request body too large")

    def _send(self, reply: Reply, method: str) -> None:
        if reply.status is None:
            self.close_connection = True  # nothing written: the client sees the socket close
            return
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if method == "HEAD":
                return
            payload = reply.body if reply.cut_after is None else reply.body[: reply.cut_after]
            if reply.trickle is None:
                self.wfile.write(payload)
            else:
                for start in range(0, len(payload), TRICKLE_CHUNK):
                    if start and self.ctx.stopping.wait(reply.trickle):
                        break
                    self.wfile.write(payload[start : start + TRICKLE_CHUNK])
            if len(payload) < len(reply.body):
                self.close_connection = True  # fewer bytes than Content-Length promised
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up; nothing to tell it

    # ------------------------------------------------------------------ the GEN API

    def _authorized(self) -> bool:
        expected = self.ctx.api_key.encode()
        key = self.headers.get("X-API-Key")
        if key is not None and hmac.compare_digest(key.encode(), expected):
            return True
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)

    def _handle(
        self,
        kind: str,
        method: str,
        path: str,
        params: dict[str, str],
        query: dict[str, list[str]],
        raw_body: bytes,
    ) -> Reply:
        if kind == "cdn":  # a public CDN: no API key
            return self._cdn(params)
        if kind == "direct_upload_put":  # a presigned storage URL: no API key either
            try:
                self.ctx.uploads.put(params["key"], dict(self.headers.items()), raw_body)
            except ApiError as exc:
                return Reply.json(exc.status, exc.body())
            return Reply(200, b"", {"ETag": '"sim"'})
        if not path.startswith("/v1/"):
            return Reply.error(404, "not_found", "Not found")
        if not self._authorized():
            return Reply.error(401, "unauthorized", "Unauthorized")
        try:
            return self._api(kind, params, query, raw_body)
        except ApiError as exc:
            return Reply.json(exc.status, exc.body())
        except Exception:
            log.exception("simulator error on %s %s", method, path)
            return Reply.error(500, "internal_error", "Internal server error")

    def _api(self, kind: str, params: dict[str, str], query: dict[str, list[str]], raw_body: bytes) -> Reply:
        state = self.ctx.state
        if kind == "get_generation":
            view = state.get_generation(params["gen"])
            reply = Reply.json(200, view)
            reply.gen_status = view["status"]
            return reply
        if kind == "stop":
            return Reply.json(200, state.stop(params["gen"]))
        if kind == "continue":
            return Reply.json(200, state.continue_(params["gen"]))
        if kind == "unknown":
            return Reply.error(404, "not_found", "Not found")
        if kind == "me":
            return Reply.json(200, state.me())
        if kind in AGENT_KINDS:
            return self._agent_api(kind, params["agent"], raw_body)
        if kind == "direct_upload":
            return Reply.json(200, self.ctx.uploads.create(_parse_json(raw_body), state.base_url))
        body = (
            _parse_json(raw_body) if kind in ("generate", "patch_cell", "create_content_resource") else None
        )
        # agent_id may come in the query (documented) or in the JSON body (what GEN's MCP sends).
        agent: object = query.get("agent_id", [None])[0]
        if agent is None and isinstance(body, dict):
            agent = body.get("agent_id")
        if kind in ("content_resource", "create_content_resource", "upload_content_resource"):
            return self._resources_api(kind, agent, params, body, raw_body)
        sheet, cell = params["sheet"], params["cell"]
        if kind == "get_cell":
            return Reply.json(200, state.get_cell(agent=agent, sheet=sheet, cell=cell))
        if kind == "get_layer":
            return Reply.json(
                200, state.get_layer(agent=agent, sheet=sheet, cell=cell, layer=params["layer"])
            )
        if kind == "patch_cell":
            return Reply.json(200, state.patch_cell(agent=agent, sheet=sheet, cell=cell, body=body))
        response, replayed = state.create_generation(
            agent=agent,
            prefix=params["prefix"],
            sheet=sheet,
            cell=cell,
            layer=params.get("layer"),
            body=body,
            idempotency_key=self.headers.get("Idempotency-Key") or None,
        )
        return Reply.json(201, response, {"Idempotent-Replayed": "true"} if replayed else None)

    def _resources_api(
        self, kind: str, agent: object, params: dict[str, str], body: object, raw_body: bytes
    ) -> Reply:
        """Content resources: read one, upload one (multipart), make one of a direct upload."""
        state = self.ctx.state
        if kind == "content_resource":
            return Reply.json(200, state.content_resource(agent=agent, raw_id=params["resource"]))
        if kind == "create_content_resource":
            blob = self.ctx.uploads.take(_signed_id(body))
            assert blob.data is not None  # (take returns uploaded blobs only)
            return Reply.json(
                201,
                state.upload(
                    agent=agent, file_name=blob.filename, content_type=blob.content_type, data=blob.data
                ),
            )
        if kind == "upload_content_resource":
            file_name, content_type, data = _uploaded_file(self.headers.get("Content-Type", ""), raw_body)
            return Reply.json(
                201, state.upload(agent=agent, file_name=file_name, content_type=content_type, data=data)
            )
        raise AssertionError(kind)

    def _agent_api(self, kind: str, agent: str, raw_body: bytes) -> Reply:
        """The agent's automation config and its webhook tests (gensim.events)."""
        state = self.ctx.state
        if kind == "automation_config":
            return Reply.json(200, state.automation_config(agent))
        if kind == "set_automation_config":
            return Reply.json(200, state.set_automation_config(agent, _parse_json(raw_body)))
        which = "webhook_url" if kind == "test_webhook" else "callback_url"
        return Reply.json(200, state.test_webhook(agent, which))

    def _cdn(self, params: dict[str, str]) -> Reply:
        folder, name, ext = params["folder"], params["name"], params["ext"]
        data: bytes | None = None
        content_type = {"mp4": "video/mp4", "jpg": "image/jpeg", "mp3": "audio/mpeg"}[ext]
        if folder == "outputs" and ext == "mp4":
            data = self.ctx.state.cdn_output(name)
        elif folder == "thumbnails" and ext == "jpg":
            data = self.ctx.state.cdn_thumbnail(name)
        elif folder == "uploads" and ext in ("mp4", "mp3"):
            data = self.ctx.state.cdn_upload(name, ext)
        if data is None:
            return Reply.error(404, "not_found", "Not found")
        headers = {"Content-Type": content_type, "Accept-Ranges": "bytes"}
        try:
            span = byte_range(self.headers.get("Range"), len(data))
        except ValueError:
            return Reply(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
        if span is None:
            return Reply(200, data, headers)
        first, last = span
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        return Reply(206, data[first : last + 1], headers)

    # ------------------------------------------------------------------ /_sim admin API

    def _admin(self, method: str, path: str, raw_body: bytes) -> Reply:
        try:
            return self._admin_route(method, path, raw_body)
        except (ApiError, ValueError, TypeError) as exc:
            if isinstance(exc, ApiError):
                return Reply.json(exc.status, exc.body())
            return Reply.error(422, "validation_error", str(exc))

    def _admin_route(self, method: str, path: str, raw_body: bytes) -> Reply:
        ctx = self.ctx
        route = (method, path)
        if route == ("GET", "/_sim/health"):
            return Reply.json(200, {"ok": True, "base_url": ctx.state.base_url})
        if route == ("GET", "/_sim/stats"):
            return Reply.json(200, ctx.stats_snapshot())
        if route == ("GET", "/_sim/faults"):
            return Reply.json(200, {"faults": ctx.faults.snapshot()})
        if route == ("POST", "/_sim/faults"):
            fault = ctx.faults.add(Fault.from_dict(_json_object(raw_body)))
            return Reply.json(201, {"fault": fault.to_dict()})
        if route == ("DELETE", "/_sim/faults"):
            return Reply.json(200, {"cleared": ctx.faults.clear()})
        if route == ("POST", "/_sim/fail_next"):
            body = _json_object(raw_body)
            ctx.state.fail_next(**{k: body[k] for k in ("n", "reason") if k in body})
            return Reply.json(200, {"ok": True})
        if route == ("POST", "/_sim/reset"):
            ctx.reset()
            return Reply.json(200, {"ok": True})
        if route == ("GET", "/_sim/config"):
            return Reply.json(200, ctx.config())
        if route == ("POST", "/_sim/config"):
            apply_config(ctx.state, _json_object(raw_body))
            return Reply.json(200, ctx.config())
        if route == ("POST", "/_sim/sources"):
            body = _json_object(raw_body)
            return Reply.json(200, ctx.state.set_sources(**_sources_args(body)))
        match = re.fullmatch(r"/_sim/generations/([^/]+)", path)
        if match and method == "GET":
            try:
                return Reply.json(200, ctx.state.snapshot(match.group(1)))
            except KeyError:
                return Reply.error(404, "not_found", "Generation not found")
        return Reply.error(404, "not_found", "Not found")


def apply_config(state: SimState, changes: dict[str, Any]) -> None:
    """Change output_size / strict_dialect / durations / event_delay / event_loss / event_seed of a
    running simulator (validated first)."""
    known = {"output_size", "strict_dialect", "durations", "event_delay", "event_loss", "event_seed"}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown config fields: {unknown}")
    durations = validate_durations({**state.durations, **changes.get("durations", {})})
    strict = changes.get("strict_dialect", state.strict_dialect)
    if not isinstance(strict, bool):
        raise ValueError("strict_dialect must be a boolean")
    delay = validate_event_delay(changes.get("event_delay", state.events.delay))
    loss = validate_event_loss(changes.get("event_loss", state.events.loss))
    seed = changes.get("event_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("event_seed must be an integer")
    state.events.delay, state.events.loss = delay, loss
    if "event_seed" in changes:
        state.events.seed(seed)
    if "output_size" in changes:
        state.output_size = changes["output_size"]
    state.strict_dialect = strict
    state.durations = durations


def _uploaded_file(content_type: str, raw: bytes) -> tuple[str, str, bytes]:
    """The ``content_resource[file]`` part of a multipart/form-data body: (file name, type, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(422, "content_resource_creation_failed", "Expected multipart/form-data")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "content_resource[file]":
            payload = part.get_payload(decode=True)
            name = part.get_filename() or "upload"
            if isinstance(payload, bytes) and payload:
                return str(name), part.get_content_type(), payload
    raise ApiError(422, "content_resource_creation_failed", "content_resource[file] is missing or empty")


def _signed_id(body: object) -> object:
    """``{"content_resource": {"file": "<signed id>"}}``'s signed id (None when missing)."""
    inner = body.get("content_resource") if isinstance(body, dict) else None
    return inner.get("file") if isinstance(inner, dict) else None


def _sources_args(body: dict[str, Any]) -> dict[str, Any]:
    """``POST /_sim/sources`` {sheet_id, cell_id, layer_id?, video?, audio?} as set_sources' arguments."""
    unknown = sorted(set(body) - {"sheet_id", "cell_id", "layer_id", "video", "audio"})
    if unknown:
        raise ValueError(f"unknown fields: {unknown}")

    def text(name: str) -> str | None:
        value = body.get(name)
        return None if value is None else str(value)

    return {
        "sheet": text("sheet_id") or "",
        "cell": text("cell_id") or "",
        "layer": text("layer_id"),
        "video": text("video"),
        "audio": text("audio"),
    }


def _parse_json(raw: bytes) -> object:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(422, "validation_error", "Request body is not valid JSON") from exc


def _json_object(raw: bytes) -> dict[str, Any]:
    body = _parse_json(raw)
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object")
    return body
