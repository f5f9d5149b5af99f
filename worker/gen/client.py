"""A small, synchronous client for the parts of GEN's API a lipsync job needs.

Submit (``POST …/generate``), poll (``GET /v1/generations/{id}``), stop, read a cell or layer, and
resolve a content resource to its URL. Celery-free on purpose: the job's steps (:mod:`worker.jobs.steps`)
use it, and so do tests and the CLI.

Design rules, each for a reason:

* **The client never retries.** No urllib3 ``Retry``, no loops. Every failure becomes exactly one
  :class:`~worker.gen.errors.GenAPIError` subclass and the job's step decides with
  :func:`worker.retry.decide` (and Retry-After) whether and when to try again. Two layers of
  retries would multiply attempts and hide time from the job's deadline.
* **One place maps HTTP to errors** (:meth:`GenClient._raise_for_response`), so every endpoint agrees
  on what a 404 or a 429 means.
* **The API key never leaves the request headers.** It is not in URLs, not in ``repr``, not in log
  lines and not in exception messages (anything echoed from a server or from requests is scrubbed of
  it). Redirects are not followed, because requests only strips ``Authorization`` on a cross-host
  redirect, not ``X-API-Key``.
* **Bodies are read with a cap** (:data:`MAX_BODY_BYTES`), so a broken proxy streaming gigabytes
  cannot exhaust a worker's memory.
* **Pacing is the caller's** (:data:`Pacer`): a hook asked before every request, with the endpoint's
  name, may hold it (a fleet-wide rate limit) or refuse it by raising. The client knows nothing of
  the job layer that wires it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import requests
from pydantic import BaseModel, SecretStr, ValidationError
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ReadTimeoutError

from worker.errors import ConfigurationError, describe_validation_error
from worker.gen.direct_upload import DirectUploadBlob
from worker.gen.errors import (
    GenAPIError,
    GenBadResponse,
    GenNotStoppable,
    GenTimeout,
    GenTransportError,
    status_error_class,
)
from worker.gen.models import ContentResource, Generation, GenerationAccepted
from worker.gen.retry_after import parse_retry_after
from worker.names import Dialect, LipsyncModel
from worker.settings import Settings

__all__ = ["MAX_BODY_BYTES", "CallObserver", "GenClient", "Pacer", "idempotency_key_for"]

logger = logging.getLogger("lipsync.gen")

#: Largest response body read (bytes). GEN's answers are a few KiB; anything bigger is not GEN.
MAX_BODY_BYTES = 1024 * 1024

_READ_CHUNK = 64 * 1024
#: How much of a server's text is echoed into an exception message.
_ECHO_CHARS = 200

_PREFIXES: dict[str, str] = {
    "autocontentengine": "/v1/autocontentengine",
    "vidsheet": "/v1/vidsheet",
}

# GEN's docs name both codes for "stop on a generation that is already terminal" (reference page:
# validation_error, errors guide: job_cannot_be_stopped); either means "re-read the status".
_NOT_STOPPABLE_CODES = frozenset({"job_cannot_be_stopped", "validation_error"})

# The newer ("vidsheet") body spells the sync.so model with a dot.
_VIDSHEET_MODEL_NAMES: dict[str, str] = {"sync_so": "sync.so", "gen": "gen"}


def _package_version() -> str:
    try:
        return metadata.version("lipsync-worker")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _truncate(text: str, limit: int = _ECHO_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


_M = TypeVar("_M", bound=BaseModel)


class _Reply(NamedTuple):
    status: int
    headers: CaseInsensitiveDict[str]
    #: None when the body was larger than MAX_BODY_BYTES (and was not read).
    body: bytes | None


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


#: Observer of GEN calls: (endpoint name, HTTP status or None for transport errors, seconds).
CallObserver = Callable[[str, int | None, float], None]
#: Asked before every request with its endpoint name (``generate``, ``get_generation``,
#: ``stop_generation``, ``get_cell``, ``get_layer``, ``get_content_resource``); it may block until
#: the request may go, or raise (e.g. :class:`~worker.gen.errors.GenRateLimited`) to refuse it.
Pacer = Callable[[str], None]


#: How long a content resource's URL is reused for new generations without asking GEN again.
RESOURCE_URL_TTL = 600.0
#: Most resource URLs one client remembers.
RESOURCE_URL_CACHE = 4096


class _Resolved(NamedTuple):
    url: str
    at: float


class GenClient:
    """GEN's lipsync endpoints over one ``requests.Session``.

    Every method raises a :class:`~worker.gen.errors.GenAPIError` subclass on failure and never retries
    itself. Retryable (``is_retryable`` true): :class:`GenTransportError`, :class:`GenTimeout`,
    :class:`GenRateLimited` (429), :class:`GenServerError` (408, 5xx), :class:`GenBadResponse`
    (2xx with an unreadable body; the tasks cap these). Not retryable: :class:`GenAuthError`
    (401/403), :class:`GenNotFound` (404), :class:`GenRejected` (422 and other 4xx/3xx) and its
    subclass :class:`GenNotStoppable`.

    Thread-safe to the extent ``requests.Session`` is (one connection pool shared by threads).
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        agent_id: str,
        dialect: Dialect = "autocontentengine",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        session: requests.Session | None = None,
        user_agent: str | None = None,
        on_call: CallObserver | None = None,
        pace: Pacer | None = None,
    ) -> None:
        """Raises :class:`ConfigurationError` for an unusable base URL, key, agent id or dialect."""
        base_url = str(base_url).strip()
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError("LIPSYNC_GEN_BASE_URL must be an http:// or https:// URL")
        api_key = (api_key or "").strip()
        if not api_key:
            raise ConfigurationError("LIPSYNC_GEN_API_KEY is empty")
        if any(ch.isspace() or not ch.isprintable() for ch in api_key):
            # Checked here, not left to requests: its InvalidHeader message would echo the value.
            raise ConfigurationError("LIPSYNC_GEN_API_KEY contains whitespace or control characters")
        agent_id = str(agent_id or "").strip()
        if not agent_id:
            raise ConfigurationError("LIPSYNC_GEN_AGENT_ID is empty")
        if dialect not in _PREFIXES:
            raise ConfigurationError(f"LIPSYNC_GEN_DIALECT must be one of {sorted(_PREFIXES)}")
        if not (connect_timeout > 0 and read_timeout > 0):
            raise ConfigurationError("GEN connect and read timeouts must be positive")

        self._base_url = base_url.rstrip("/")
        # SecretStr so that vars(client), a debugger or a pretty-printer shows '**********'.
        self._api_key = SecretStr(api_key)
        self._agent_id = agent_id
        self._dialect: Dialect = dialect
        self._prefix = _PREFIXES[dialect]
        self._timeout = (float(connect_timeout), float(read_timeout))
        #: Told about every call (endpoint, HTTP status or None, seconds), e.g. for metrics.
        self._on_call = on_call
        #: Asked before every request (endpoint), e.g. to keep a fleet-wide rate limit.
        self._pace = pace
        self._owns_session = session is None
        self._resource_urls: dict[str, _Resolved] = {}
        self._session = session if session is not None else _session_for(base_url)
        # Headers are added per request rather than to session.headers, so that a caller's shared
        # session never carries our key to anyone else's URL.
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": user_agent or f"lipsync-worker/{_package_version()} (+python-requests)",
        }

    @classmethod
    def from_settings(
        cls, settings: Settings, *, on_call: CallObserver | None = None, pace: Pacer | None = None
    ) -> GenClient:
        """Build a client from :class:`Settings`.

        Raises :class:`ConfigurationError` (not retryable) naming ``LIPSYNC_GEN_API_KEY`` and/or
        ``LIPSYNC_GEN_AGENT_ID`` when they are missing.
        """
        missing = []
        key = settings.gen_api_key.get_secret_value().strip() if settings.gen_api_key is not None else ""
        if not key:
            missing.append("LIPSYNC_GEN_API_KEY")
        if not (settings.gen_agent_id or "").strip():
            missing.append("LIPSYNC_GEN_AGENT_ID")
        if missing:
            raise ConfigurationError(f"GEN client is not configured: set {' and '.join(missing)}")
        return cls(
            base_url=settings.gen_base,
            api_key=key,
            agent_id=settings.gen_agent_id or "",
            dialect=settings.gen_dialect,
            connect_timeout=settings.gen_connect_timeout,
            read_timeout=settings.gen_read_timeout,
            on_call=on_call,
            pace=pace,
        )

    def __repr__(self) -> str:
        return (
            f"GenClient(base_url={self._base_url!r}, agent_id={self._agent_id!r}, "
            f"dialect={self._dialect!r}, timeout={self._timeout!r})"
        )

    __str__ = __repr__

    def __enter__(self) -> GenClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def close(self) -> None:
        """Close the connection pool, if this client created the session (a passed-in one is left open)."""
        if self._owns_session:
            self._session.close()

    # -- endpoints ------------------------------------------------------------------------------

    def generate_lipsync(
        self,
        *,
        sheet_id: str,
        cell_id: str,
        layer_id: str | None,
        model: LipsyncModel,
        video_resource_id: str | None,
        audio_resource_id: str | None,
        idempotency_key: str,
        body: dict[str, Any] | None = None,
        video_url: str | None = None,
        audio_url: str | None = None,
    ) -> GenerationAccepted:
        """Start a lipsync generation on a layer (``layer_id`` given) or a cell.

        ``body``: the request body from :meth:`lipsync_body`, when the caller built it first (to
        pace the POST itself, not the lookups that come before it); built here otherwise.

        ``idempotency_key`` is sent as ``Idempotency-Key`` and must be the same on every attempt for
        one job (see :func:`idempotency_key_for`): GEN then answers a repeated submit with the
        original generation instead of charging twice.

        In the ``vidsheet`` dialect the two resource ids are first resolved to URLs with
        :meth:`get_content_resource`, so its errors (e.g. :class:`GenNotFound` for an unknown
        resource) can surface here too, with ``endpoint="get_content_resource"``.

        Raises :class:`GenRejected` (422: invalid inputs, unknown agent, no credits),
        :class:`GenNotFound`, :class:`GenAuthError` - not retryable; :class:`GenRateLimited`,
        :class:`GenServerError`, :class:`GenTransportError`/:class:`GenTimeout`,
        :class:`GenBadResponse` - retryable (safe, thanks to the idempotency key).
        ``ValueError`` for an empty id or key or an unknown model (a bug in the caller).
        """
        if not idempotency_key:
            raise ValueError("idempotency_key must not be empty")
        path = self._target_path(sheet_id, cell_id, layer_id) + "/generate"
        if body is None:
            body = self.lipsync_body(
                model, video_resource_id, audio_resource_id, video_url=video_url, audio_url=audio_url
            )
        reply = self._request(
            "POST",
            path,
            endpoint="generate",
            params=self._agent_params(),
            json_body=body,
            headers={"Idempotency-Key": idempotency_key},
        )
        return self._parse_model(reply, GenerationAccepted, "generate")

    def get_generation(self, generation_id: str) -> Generation:
        """``GET /v1/generations/{id}`` (no ``agent_id``: the generations endpoints do not take it).

        An unknown ``status`` is returned as is; classifying it is the poll step's job.
        Raises :class:`GenNotFound`, :class:`GenAuthError`, :class:`GenRejected` - not retryable;
        :class:`GenRateLimited`, :class:`GenServerError`, :class:`GenTransportError`/
        :class:`GenTimeout`, :class:`GenBadResponse` - retryable.
        """
        path = f"/v1/generations/{_segment(generation_id)}"
        reply = self._request("GET", path, endpoint="get_generation")
        return self._parse_model(reply, Generation, "get_generation")

    def stop_generation(self, generation_id: str) -> None:
        """``POST /v1/generations/{id}/stop``. The response body is ignored (GEN documents two shapes).

        Raises :class:`GenNotStoppable` (422 ``job_cannot_be_stopped``/``validation_error``: already
        terminal, re-read the status), :class:`GenNotFound`, :class:`GenAuthError`,
        :class:`GenRejected` - not retryable; :class:`GenRateLimited`, :class:`GenServerError`,
        :class:`GenTransportError`/:class:`GenTimeout` - retryable.
        """
        path = f"/v1/generations/{_segment(generation_id)}/stop"
        self._request("POST", path, endpoint="stop_generation")

    def get_cell(self, sheet_id: str, cell_id: str) -> dict[str, Any]:
        """The cell with its ``user_jobs`` and ``default_user_job``, as GEN's JSON object.

        Raises as :meth:`get_generation`; a body that is not a JSON object is :class:`GenBadResponse`.
        """
        reply = self._request(
            "GET",
            self._target_path(sheet_id, cell_id, None),
            endpoint="get_cell",
            params=self._agent_params(),
        )
        return self._parse_object(reply, "get_cell")

    def get_layer(self, sheet_id: str, cell_id: str, layer_id: str) -> dict[str, Any]:
        """The layer with its ``user_jobs`` and ``default_user_job``, as GEN's JSON object.

        Raises as :meth:`get_cell`.
        """
        reply = self._request(
            "GET",
            self._target_path(sheet_id, cell_id, layer_id),
            endpoint="get_layer",
            params=self._agent_params(),
        )
        return self._parse_object(reply, "get_layer")

    def check_credentials(self) -> None:
        """Prove the key and the agent before taking work: ``GET /v1/me`` (the key is valid), then
        ``GET /v1/agents/{agent_id}/automation_config`` (the key can see the agent).

        Raises :class:`GenAuthError` (401), :class:`GenNotFound` (404: an agent the key cannot see),
        :class:`GenRejected` (422) - the configuration is wrong; retryable errors while GEN is
        unreachable or busy.
        """
        self._request("GET", "/v1/me", endpoint="me")
        path = f"/v1/agents/{_segment(self._agent_id)}/automation_config"
        self._request("GET", path, endpoint="agent")

    def get_content_resource(self, resource_id: str) -> ContentResource:
        """``GET /v1/content_resources/{id}?agent_id=`` → the ``content_resource`` part of the answer.

        Raises :class:`GenNotFound` (404 ``content_resource_not_found``), :class:`GenAuthError`,
        :class:`GenRejected` - not retryable; :class:`GenRateLimited`, :class:`GenServerError`,
        :class:`GenTransportError`/:class:`GenTimeout`, :class:`GenBadResponse` - retryable.
        """
        path = f"/v1/content_resources/{_segment(resource_id)}"
        reply = self._request("GET", path, endpoint="get_content_resource", params=self._agent_params())
        data = self._parse_object(reply, "get_content_resource")
        # Documented: {"content_resource": {...}, "generator": ...}. A bare resource object (as the
        # list endpoint returns them) is accepted too; either way the fields are validated.
        inner = data.get("content_resource", data)
        return self._validate(ContentResource, inner, "get_content_resource")

    def upload_content_resource(self, file_name: str, data: bytes, content_type: str) -> ContentResource:
        """``POST /v1/content_resources?agent_id=`` with ``content_resource[file]`` (multipart, GEN's
        way for files up to 50 MB) → the new resource. Uploading is free.

        Raises :class:`GenRejected` (422 ``content_resource_creation_failed``), :class:`GenAuthError`
        - not retryable; the retryable errors of every call.
        """
        reply = self._request(
            "POST",
            "/v1/content_resources",
            endpoint="upload_content_resource",
            params=self._agent_params(),
            files={"content_resource[file]": (file_name, data, content_type)},
        )
        data_json = self._parse_object(reply, "upload_content_resource")
        return self._validate(
            ContentResource, data_json.get("content_resource", data_json), "upload_content_resource"
        )

    def create_direct_upload(
        self, *, file_name: str, byte_size: int, checksum: str, content_type: str
    ) -> DirectUploadBlob:
        """Step 1 of GEN's direct upload (files over 50 MB, up to 1 GiB): ``POST /v1/direct_upload``
        with the blob (``checksum``: base64 of the file's MD5) -> its signed id and where to ``PUT``
        the bytes (:func:`worker.gen.direct_upload.put_blob`, not with this client: no API key there).

        Raises :class:`GenRejected` (422 ``invalid_content_type``, ``file_size_exceeded``),
        :class:`GenAuthError` - not retryable; the retryable errors of every call.
        """
        blob = {
            "filename": file_name,
            "byte_size": byte_size,
            "checksum": checksum,
            "content_type": content_type,
        }
        reply = self._request("POST", "/v1/direct_upload", endpoint="direct_upload", json_body={"blob": blob})
        return self._parse_model(reply, DirectUploadBlob, "direct_upload")

    def create_content_resource(self, signed_id: str) -> ContentResource:
        """Step 3 of GEN's direct upload: ``POST /v1/content_resources?agent_id=`` with
        ``{"content_resource": {"file": signed_id}}`` -> the new resource, once the bytes are up.

        Raises :class:`GenRejected` (422 ``direct_upload_failed``: the bytes never arrived or do not
        match), :class:`GenAuthError` - not retryable; the retryable errors of every call.
        """
        reply = self._request(
            "POST",
            "/v1/content_resources",
            endpoint="create_content_resource",
            params=self._agent_params(),
            json_body={"content_resource": {"file": signed_id}},
        )
        data = self._parse_object(reply, "create_content_resource")
        return self._validate(ContentResource, data.get("content_resource", data), "create_content_resource")

    def get_automation_config(self) -> dict[str, Any]:
        """``GET /v1/agents/{agent_id}/automation_config``: the agent's ``webhook_url`` and
        ``callback_url`` settings, as GEN's JSON object. Raises as :meth:`get_cell`."""
        reply = self._request("GET", self._automation_path(), endpoint="automation_config")
        return self._parse_object(reply, "automation_config")

    def set_event_webhook(self, url: str | None) -> dict[str, Any]:
        """``PATCH …/automation_config`` with ``webhook_url`` (None: no more events): where GEN posts
        its events for this agent (``lipsync-worker events``). Returns GEN's answer (its shape is
        not documented; ``{}`` for an empty one).

        Raises :class:`GenRejected` (422: GEN refuses the URL), :class:`GenNotFound` (an agent the
        key cannot see), :class:`GenAuthError`; retryable errors as every call.
        """
        reply = self._request(
            "PATCH",
            self._automation_path(),
            endpoint="set_automation_config",
            json_body={"automation_config": {"webhook_url": url}},
        )
        return self._parse_object(reply, "set_automation_config") if (reply.body or b"").strip() else {}

    def test_event_webhook(self) -> dict[str, Any]:
        """``POST …/automation_config/test_webhook``: GEN posts a test event to the configured URL and
        answers ``{"success": true}`` or ``{"success": false, "error": "Connection refused"}``.

        Raises :class:`GenRejected` (422: no webhook URL configured), and as :meth:`get_cell`.
        """
        reply = self._request("POST", self._automation_path() + "/test_webhook", endpoint="test_webhook")
        return self._parse_object(reply, "test_webhook")

    def _automation_path(self) -> str:
        return f"/v1/agents/{_segment(self._agent_id)}/automation_config"

    # -- request building -----------------------------------------------------------------------

    def _agent_params(self) -> dict[str, str]:
        return {"agent_id": self._agent_id}

    def _target_path(self, sheet_id: str, cell_id: str, layer_id: str | None) -> str:
        path = f"{self._prefix}/{_segment(sheet_id)}/cells/{_segment(cell_id)}"
        if layer_id is not None:
            path += f"/layers/{_segment(layer_id)}"
        return path

    def lipsync_body(
        self,
        model: LipsyncModel,
        video_resource_id: str | None,
        audio_resource_id: str | None,
        *,
        video_url: str | None = None,
        audio_url: str | None = None,
    ) -> dict[str, Any]:
        """The generate request's body in this client's dialect. In ``vidsheet`` a source given by
        URL goes as it is, one given by resource id is looked up (:meth:`get_content_resource`), so
        it raises as that does. ``autocontentengine`` takes resource ids only (ValueError)."""
        if model not in _VIDSHEET_MODEL_NAMES:
            raise ValueError(f"unknown lipsync model {model!r}")
        if self._dialect == "autocontentengine":
            if video_resource_id is None or audio_resource_id is None:
                raise ValueError("the autocontentengine body takes content resource ids, not URLs")
            return {
                "generation_type": "lipsync",
                "data": {
                    "model": model,
                    "video_resource_id": str(video_resource_id),
                    "audio_resource_id": str(audio_resource_id),
                },
            }
        # The newer body takes URLs, not resource ids; resolve them first (two cheap GETs, or none
        # for a resource looked up in the last few minutes).
        video = video_url or self._resource_url(_needed(video_resource_id, "video")).url
        audio = audio_url or self._resource_url(_needed(audio_resource_id, "audio")).url
        return {
            "generation_type": "lipsync",
            "data": {
                "talking_avatar_video_data": {
                    "video": {"value": video},
                    "audio": {"value": audio},
                },
                "lip_sync_model": _VIDSHEET_MODEL_NAMES[model],
            },
        }

    def _resource_url(self, resource_id: str) -> _Resolved:
        """A content resource's URL, remembered for :data:`RESOURCE_URL_TTL`: GEN's resource URLs
        are "public and permanent until you explicitly delete the content resource", and a
        pipeline often lipsyncs one video or voice many times. A resource deleted meanwhile makes
        GEN refuse the generate, as it would have refused it a few minutes earlier."""
        now = time.monotonic()
        known = self._resource_urls.get(str(resource_id))
        if known is not None and now - known.at < RESOURCE_URL_TTL:
            return known
        resolved = _Resolved(url=self.get_content_resource(resource_id).url, at=now)
        if len(self._resource_urls) >= RESOURCE_URL_CACHE:
            self._resource_urls.clear()  # rare (thousands of inputs in minutes): start afresh
        self._resource_urls[str(resource_id)] = resolved
        return resolved

    # -- transport --------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        params: dict[str, str] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
    ) -> _Reply:
        """Send one request, read its body (capped) and raise for anything but a 2xx. ``files``:
        a multipart/form-data body instead of JSON."""
        if self._pace is not None:
            self._pace(endpoint)
        request_headers = {**self._headers, "X-API-Key": self._api_key.get_secret_value()}
        if files is not None:
            del request_headers["Content-Type"]  # requests writes multipart's, with its boundary
        if headers:
            request_headers.update(headers)
        started = time.monotonic()
        try:
            # stream=True so the body is read below with a cap instead of all at once by requests.
            response = self._session.request(
                method,
                self._base_url + path,
                params=params,
                json=json_body,
                files=files,
                headers=request_headers,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            )
            try:
                body = _read_capped(response)
            finally:
                response.close()
        except requests.RequestException as exc:
            elapsed_ms = (time.monotonic() - started) * 1000
            logger.debug("GEN %s %s -> %s in %.0f ms", method, path, type(exc).__name__, elapsed_ms)
            self._observe(endpoint, None, elapsed_ms)
            # from None: the requests exception holds the PreparedRequest, headers and key included;
            # nothing that outlives this call should reference it.
            raise self._transport_error(exc, endpoint) from None
        elapsed_ms = (time.monotonic() - started) * 1000
        logger.debug("GEN %s %s -> %d in %.0f ms", method, path, response.status_code, elapsed_ms)
        self._observe(endpoint, response.status_code, elapsed_ms)
        reply = _Reply(response.status_code, response.headers, body)
        self._raise_for_response(reply, endpoint)
        return reply

    def _observe(self, endpoint: str, status: int | None, elapsed_ms: float) -> None:
        if self._on_call is not None:
            self._on_call(endpoint, status, elapsed_ms / 1000)

    def _transport_error(self, exc: requests.RequestException, endpoint: str) -> GenAPIError:
        detail = self._redact(_truncate(f"{type(exc).__name__}: {exc}"))
        # requests raises ConnectTimeout/ReadTimeout while waiting for the headers, but a read timeout
        # while streaming the body arrives as ConnectionError(ReadTimeoutError).
        timed_out = isinstance(exc, requests.Timeout) or (
            isinstance(exc, requests.ConnectionError)
            and any(isinstance(a, ReadTimeoutError) for a in exc.args)
        )
        cls = GenTimeout if timed_out else GenTransportError
        return cls(detail, endpoint=endpoint)

    def _raise_for_response(self, reply: _Reply, endpoint: str) -> None:
        """The single mapping from a non-2xx answer to an error class (see :func:`status_error_class`)."""
        status = reply.status
        if 200 <= status < 300:
            return
        message, error_code = _error_fields(reply.body)
        if message is None:
            message = f"HTTP {status}"
            if 300 <= status < 400:
                message += " (redirect not followed)"
        cls = status_error_class(status)
        if endpoint == "stop_generation" and status == 422 and error_code in _NOT_STOPPABLE_CODES:
            cls = GenNotStoppable
        raise cls(
            self._redact(message),
            status_code=status,
            error_code=self._redact(error_code) if error_code is not None else None,
            retry_after=parse_retry_after(reply.headers.get("Retry-After")),
            endpoint=endpoint,
        )

    # -- response parsing -------------------------------------------------------------------------

    def _parse_json(self, reply: _Reply, endpoint: str) -> Any:
        def bad(message: str) -> GenBadResponse:
            return GenBadResponse(self._redact(message), status_code=reply.status, endpoint=endpoint)

        if reply.body is None:
            raise bad(f"response body larger than {MAX_BODY_BYTES} bytes")
        if not reply.body.strip():
            raise bad("empty response body, expected JSON")
        try:
            return json.loads(reply.body)
        except (ValueError, RecursionError):
            # ValueError covers JSONDecodeError and undecodable bytes; RecursionError deep nesting.
            snippet = _truncate(reply.body[: _ECHO_CHARS * 4].decode("utf-8", "replace"))
            raise bad(f"response is not JSON: {snippet!r}") from None

    def _parse_object(self, reply: _Reply, endpoint: str) -> dict[str, Any]:
        data = self._parse_json(reply, endpoint)
        if not isinstance(data, dict):
            raise GenBadResponse(
                f"expected a JSON object, got {type(data).__name__}",
                status_code=reply.status,
                endpoint=endpoint,
            )
        return data

    def _parse_model(self, reply: _Reply, model: type[_M], endpoint: str) -> _M:
        return self._validate(model, self._parse_object(reply, endpoint), endpoint)

    def _validate(self, model: type[_M], data: Any, endpoint: str) -> _M:
        if not isinstance(data, dict):
            raise GenBadResponse(f"expected a JSON object, got {type(data).__name__}", endpoint=endpoint)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            # describe_validation_error leaves the input out: the message names fields, not values.
            problems = "; ".join(f"{e['field']}: {e['message']}" for e in describe_validation_error(exc))
            raise GenBadResponse(
                _truncate(f"unexpected {model.__name__}: {problems}", _ECHO_CHARS * 2), endpoint=endpoint
            ) from None

    def _redact(self, text: str) -> str:
        # Belt and braces: nothing we build contains the key, but text echoed from a server or from
        # requests/urllib3 is not ours to trust.
        return text.replace(self._api_key.get_secret_value(), "***")


def _needed(resource_id: str | None, side: str) -> str:
    if resource_id is None:
        raise ValueError(f"the {side} source needs a content resource id or a URL")
    return resource_id


def _segment(value: str) -> str:
    """One URL path segment. Ids are quoted with safe="" so "1/../2" cannot change the path."""
    text = str(value)
    if not text:
        raise ValueError("GEN ids must not be empty")
    return quote(text, safe="")


def _read_capped(response: requests.Response) -> bytes | None:
    """The (decoded) body, or None when it is larger than MAX_BODY_BYTES (reading stops there)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    buffer = bytearray()
    for chunk in response.iter_content(chunk_size=_READ_CHUNK):
        buffer += chunk
        if len(buffer) > MAX_BODY_BYTES:
            return None
    return bytes(buffer)


def _error_fields(body: bytes | None) -> tuple[str | None, str | None]:
    """GEN's ``{"error": ..., "error_code": ...}`` when the error body has them, else Nones."""
    if not body:
        return None, None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    message = data.get("error")
    code = data.get("error_code")
    return (
        _truncate(message) if isinstance(message, str) and message else None,
        _truncate(code, 100) if isinstance(code, str) and code else None,
    )


# --------------------------------------------------------------------------------------------
# Module helpers
# --------------------------------------------------------------------------------------------


def idempotency_key_for(job_id: str) -> str:
    """The ``Idempotency-Key`` for a job: derived from the job id only, never per attempt.

    A retried submit (after a timeout whose request may have reached GEN) must carry the same key,
    or GEN starts - and charges for - a second generation.
    """
    if not job_id:
        raise ValueError("job_id must not be empty")
    return f"lipsync-{job_id}"


def _session_for(base_url: str) -> requests.Session:
    """A session that reads the proxy and CA-bundle environment once, when it is made.

    requests re-reads the environment on every request of a session that trusts it (proxies,
    NO_PROXY matching, the CA bundle variables): about a tenth of a status poll's CPU. The same
    settings, taken once, apply to every call (GEN is one host).
    """
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session
