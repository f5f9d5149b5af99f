"""The simulated GEN account: the seeded world, the generations, and Idempotency-Key memory.

Pure logic, no HTTP: every operation takes already-parsed inputs and returns the JSON GEN would
send, or raises :class:`ApiError` with the status and ``error_code`` GEN would use. One lock guards
all of it, so each operation is atomic; in particular the Idempotency-Key check and the creation it
guards happen under the same lock, which is what makes two concurrent POSTs with one key create one
generation.

Generation status is computed from the clock when asked: ``pending`` for the first 20% of the
model's duration, ``processing`` until the duration, then ``completed`` or ``failed``. Stop freezes a
generation as ``stopped``; continue restarts its clock. The one background thread is the agent's
event webhook (:mod:`gensim.events`), which is told each status change as it is scheduled.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gensim import media
from gensim.bodies import BodyInvalid, LipsyncInputs, as_id, is_http_url, parse_lipsync
from gensim.events import AutomationConfig, EventSender, apply_patch, post_json
from gensim.stats import Stats, target_key

SHEET_IDS = (101, 102)
CELL_IDS = range(3000, 3100)
#: Cell C has exactly one layer, C + LAYER_OFFSET.
LAYER_OFFSET = 1000

#: Generations whose source video is this resource fail the way GEN fails on a faceless video.
FAIL_VIDEO_ID = "5099"
#: Generations whose source video is this resource never leave ``pending``.
STUCK_VIDEO_ID = "5098"
NO_FACE_REASON = "No face detected in the source video"

DEFAULT_DURATIONS: Mapping[str, float] = {"gen": 3.0, "sync_so": 6.0}
#: Credits charged for a completed generation, by model ("Lipsync (10s) ~200" in GEN's credits page).
COSTS: Mapping[str, float] = {"gen": 100.0, "sync_so": 200.0}
#: Share of a generation's duration spent ``pending`` before it turns ``processing``.
PENDING_SHARE = 0.2
IDEMPOTENCY_TTL = 24 * 3600.0
#: Output content resource ids are derived from generation ids so they never collide with uploads.
OUTPUT_RESOURCE_BASE = 1_000_000
#: Uploaded content resources are numbered from here (below the outputs, above the seeded world).
UPLOAD_ID_BASE = 700_000
_FIRST_GENERATION_ID = 9001  # the numbering GEN's docs examples use
_UPLOAD_VIDEO_SIZE = 4096

TARGET_NOT_FOUND = "Sheet, cell, or layer not found"
CANNOT_CONTINUE = "Generation cannot be stopped/continued in its current state"

Outcome = Literal["completed", "failed", "stuck"]


class ApiError(Exception):
    """An answer GEN gives as an error: HTTP status, ``error_code`` and the human ``error`` text."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_code": self.code}


@dataclass(frozen=True)
class Resource:
    """A content resource of the seeded world (an upload the user made)."""

    id: str
    kind: Literal["video", "audio"]

    @property
    def extension(self) -> str:
        return "mp4" if self.kind == "video" else "mp3"

    @property
    def content_type(self) -> str:
        return "video/mp4" if self.kind == "video" else "audio/mpeg"


def seed_resources() -> dict[str, Resource]:
    """Videos 5001-5099 and "video_res_123"; audios 6001-6099 and "audio_res_456" (the docs' ids)."""
    resources: dict[str, Resource] = {}
    for number in range(5001, 5100):
        resources[str(number)] = Resource(str(number), "video")
    for number in range(6001, 6100):
        resources[str(number)] = Resource(str(number), "audio")
    resources["video_res_123"] = Resource("video_res_123", "video")
    resources["audio_res_456"] = Resource("audio_res_456", "audio")
    return resources


@dataclass
class Generation:
    id: int
    agent_id: str
    sheet_id: int
    cell_id: int
    layer_id: int | None
    inputs: LipsyncInputs
    prefix: str
    idempotency_key: str | None
    outcome: Outcome
    failed_reason: str | None
    duration: float
    output_size: int
    token: str
    created_at: float  # wall clock, for humans reading snapshots
    started_at: float  # simulation clock; moved forward by continue
    stopped: bool = False
    stopped_by_api: bool = False
    continues: int = 0
    charges: int = 1

    @property
    def output_resource_id(self) -> int:
        return OUTPUT_RESOURCE_BASE + self.id

    def status(self, now: float) -> str:
        if self.stopped:
            return "stopped"
        if self.outcome == "stuck":
            return "pending"
        elapsed = now - self.started_at
        if elapsed < PENDING_SHARE * self.duration:
            return "pending"
        if elapsed < self.duration:
            return "processing"
        return self.outcome


@dataclass
class _KeyEntry:
    fingerprint: str
    response: dict[str, Any]
    expires_at: float


@dataclass
class _Cell:
    additional_attributes: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    updated_at_ts: int = 0
    #: The cell's one layer's additional_attributes (its Lipsync card's sources, when set).
    layer_attributes: dict[str, Any] = field(default_factory=dict)
    layer_updated_at_ts: int = 0


def _int_id(raw: str) -> int | None:
    return int(raw) if raw.isascii() and raw.isdigit() else None


def validate_durations(durations: Mapping[str, float] | None) -> dict[str, float]:
    merged = dict(DEFAULT_DURATIONS)
    for model, seconds in (durations or {}).items():
        name = "sync_so" if model == "sync.so" else model
        if name not in merged:
            raise ValueError(f"unknown model in durations: {model!r} (expected 'gen' or 'sync_so')")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError(f"duration for {model!r} must be a number >= 0")
        merged[name] = float(seconds)
    return merged


class SimState:
    """Everything the simulated GEN account knows. Thread-safe; see the module docstring."""

    def __init__(
        self,
        *,
        stats: Stats,
        agent_ids: Iterable[str | int] = ("42",),
        durations: Mapping[str, float] | None = None,
        strict_dialect: bool = False,
        output_size: int = 48_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._stats = stats
        self._clock = clock
        self.agent_ids = frozenset(str(a) for a in agent_ids)
        self.durations = validate_durations(durations)
        #: When set, draws each new generation's duration (model -> seconds) instead of the fixed
        #: ``durations``: benchmarks use it for spread, bimodal or shifting durations.
        self.duration_sampler: Callable[[str], float] | None = None
        self.strict_dialect = strict_dialect
        self.output_size = output_size
        #: Set by the server once it knows its port; every URL the API hands out starts with it.
        self.base_url = ""
        self.resources = seed_resources()
        self._seeded_ts = int(time.time() * 1000)
        self._next_id = _FIRST_GENERATION_ID
        self._next_upload = 1
        #: The agents' event webhook: status changes go out from its thread (started by the server).
        self.events = EventSender(clock=clock, source=self._event_for, log=stats.event_sent)
        self._clear()

    def duration_for(self, model: str) -> float:
        """How long a new generation of ``model`` takes (seconds)."""
        if self.duration_sampler is not None:
            return max(0.0, float(self.duration_sampler(model)))
        return self.durations[model]

    def _clear(self) -> None:
        self._generations: dict[int, Generation] = {}
        self._by_token: dict[str, int] = {}
        # Generation ids per (sheet, cell, layer or None), oldest first.
        self._jobs: dict[tuple[int, int, int | None], list[int]] = {}
        # Insertion order is expiry order (one TTL for all), so expiring pops from the front.
        self._keys: OrderedDict[str, _KeyEntry] = OrderedDict()
        self._fail_queue: deque[str] = deque()
        self._cells: dict[tuple[int, int], _Cell] = {}
        self._automation: dict[str, AutomationConfig] = {}
        # Content resources uploaded (POST /v1/content_resources): id -> the bytes received.
        for resource_id in getattr(self, "_uploads", {}):
            self.resources.pop(resource_id, None)
        self._uploads: dict[str, bytes] = {}

    def reset(self) -> None:
        """Forget generations, keys, pending failures, cell edits, the agents' automation configs
        and the events not sent yet. Ids keep counting up, so a generation id seen before the reset
        never names a different generation after it."""
        with self._lock:
            self._clear()
            self.events.clear()

    @property
    def output_size(self) -> int:
        return self._output_size

    @output_size.setter
    def output_size(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size >= 2**32:
            raise ValueError("output_size must be an int in [0, 2**32)")
        # Read when a generation is created: changing it affects generations created afterwards.
        self._output_size = size

    def fail_next(self, n: int = 1, reason: str = NO_FACE_REASON) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError("n must be an int >= 0")
        if not isinstance(reason, str) or not reason:
            raise ValueError("reason must be a non-empty string")
        with self._lock:
            self._fail_queue.extend([reason] * n)

    # ------------------------------------------------------------------ lookups (lock held)

    def me(self) -> dict[str, Any]:
        """``GET /v1/me``: who the key belongs to (documented shape: id, email, name)."""
        return {"id": "user_sim", "email": "simulator@example.com", "name": "GEN simulator"}

    def automation_config(self, raw_agent: str) -> dict[str, Any]:
        """``GET /v1/agents/{agent_id}/automation_config``: 404 for an agent the key cannot see."""
        with self._lock:
            return {"automation_config": self._automation_of(raw_agent).view()}

    def set_automation_config(self, raw_agent: str, body: object) -> dict[str, Any]:
        """``PATCH …/automation_config``: 404 for an unknown agent, 422 for a URL GEN would refuse."""
        with self._lock:
            config = self._automation_of(raw_agent)
            problem = apply_patch(config, body)
            if problem is not None:
                raise ApiError(422, "validation_error", problem)
            return {"automation_config": config.view()}

    def test_webhook(self, raw_agent: str, which: str = "webhook_url") -> dict[str, Any]:
        """``POST …/automation_config/test_webhook`` (or ``test_callback``): POST a test event to
        the configured URL, now, and say whether it was answered with a 2xx."""
        with self._lock:
            agent_id = self._check_known_agent(raw_agent)
            url = getattr(self._automation_of(agent_id), which)
        if url is None:
            raise ApiError(422, "validation_error", f"No {which} configured")
        body = {
            "event": "test",
            "agent_id": agent_id,
            "message": "Test event from GEN (simulated)",
            "generation": None,
        }
        status, error = post_json(url, body)  # outside the lock: it may take seconds
        if status is not None and 200 <= status < 300:
            return {"success": True}
        return {"success": False, "error": error or f"HTTP {status}"}

    def _check_known_agent(self, raw_agent: object) -> str:
        agent_id = as_id(raw_agent)
        if agent_id is None or agent_id not in self.agent_ids:
            raise ApiError(404, "not_found", "Agent not found")
        return agent_id

    def _automation_of(self, raw_agent: object) -> AutomationConfig:
        return self._automation.setdefault(self._check_known_agent(raw_agent), AutomationConfig())

    def _event_for(self, generation_id: int, status: str, epoch: int) -> tuple[str, dict[str, Any]] | None:
        """The webhook URL and body of a status change (see :mod:`gensim.events`), if the change
        still holds (not stopped or continued since) and the agent has a webhook URL."""
        with self._lock:
            gen = self._generations.get(generation_id)
            if gen is None or gen.continues != epoch:
                return None
            view = self._view(gen, self._clock())
            config = self._automation.get(gen.agent_id)
            if view["status"] != status or config is None or config.webhook_url is None:
                return None
            body = {
                "event": f"generation.{status}",
                "agent_id": gen.agent_id,
                "spreadsheet_id": gen.sheet_id,
                "cell_id": gen.cell_id,
                "layer_id": gen.layer_id,
                "generation": view,
            }
            return config.webhook_url, body

    def _schedule_events(self, gen: Generation) -> None:
        """Tell the event sender when this run of the generation changes status (lock held)."""
        if gen.outcome == "stuck":
            return
        self.events.schedule(
            gen.id, "processing", gen.started_at + PENDING_SHARE * gen.duration, gen.continues
        )
        self.events.schedule(gen.id, gen.outcome, gen.started_at + gen.duration, gen.continues)

    def _check_agent(self, agent: object) -> str:
        agent_id = as_id(agent)
        if agent_id is None or agent_id not in self.agent_ids:
            raise ApiError(422, "agent_not_found", "Agent not found")
        return agent_id

    def _target(self, sheet: str, cell: str, layer: str | None) -> tuple[int, int, int | None]:
        sheet_id, cell_id = _int_id(sheet), _int_id(cell)
        layer_id = None if layer is None else _int_id(layer)
        if sheet_id not in SHEET_IDS or cell_id not in CELL_IDS:
            raise ApiError(404, "not_found", TARGET_NOT_FOUND)
        assert cell_id is not None and sheet_id is not None  # narrowed by the membership tests
        if layer is not None and layer_id != cell_id + LAYER_OFFSET:
            raise ApiError(404, "not_found", TARGET_NOT_FOUND)
        return sheet_id, cell_id, layer_id

    def _cell(self, sheet_id: int, cell_id: int) -> _Cell:
        return self._cells.setdefault((sheet_id, cell_id), _Cell(updated_at_ts=self._seeded_ts))

    def _generation(self, raw_id: str) -> Generation:
        gen_id = _int_id(raw_id)
        gen = self._generations.get(gen_id) if gen_id is not None else None
        if gen is None:
            raise ApiError(404, "not_found", "Generation not found")
        return gen

    def _resource_kind(self, resource_id: str) -> str | None:
        resource = self.resources.get(resource_id)
        if resource is not None:
            return resource.kind
        # A completed lipsync output is a video resource too, so outputs can be chained.
        return "video" if self._completed_output(resource_id) is not None else None

    def _completed_output(self, resource_id: str) -> Generation | None:
        number = _int_id(resource_id)
        if number is None:
            return None
        gen = self._generations.get(number - OUTPUT_RESOURCE_BASE)
        return gen if gen is not None and gen.status(self._clock()) == "completed" else None

    # ------------------------------------------------------------------ generate

    def create_generation(
        self,
        *,
        agent: object,
        prefix: str,
        sheet: str,
        cell: str,
        layer: str | None,
        body: object,
        idempotency_key: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """POST .../generate. Returns (the 201 body, whether it is an Idempotency-Key replay)."""
        with self._lock:
            agent_id = self._check_agent(agent)
            sheet_id, cell_id, layer_id = self._target(sheet, cell, layer)
            try:
                inputs = parse_lipsync(
                    body,
                    prefix=prefix,
                    strict_dialect=self.strict_dialect,
                    cell_model=self._cell(sheet_id, cell_id).additional_attributes.get("lipSyncModel"),
                    resource_kind=self._resource_kind,
                )
            except BodyInvalid as exc:
                raise ApiError(422, "validation_error", str(exc)) from exc
            now = self._clock()
            fingerprint = json.dumps([agent_id, sheet_id, cell_id, layer_id, inputs.canonical()])
            if idempotency_key is not None:
                self._expire_keys(now)
                entry = self._keys.get(idempotency_key)
                if entry is not None:
                    if entry.fingerprint != fingerprint:
                        raise ApiError(
                            422,
                            "idempotency_key_reused",
                            "Idempotency-Key was already used with a different request",
                        )
                    self._stats.replayed()
                    return dict(entry.response), True
            gen = self._new_generation(
                agent_id, prefix, sheet_id, cell_id, layer_id, inputs, idempotency_key, now
            )
            response = {"generation_id": gen.id, "status": "pending"}
            if idempotency_key is not None:
                self._keys[idempotency_key] = _KeyEntry(fingerprint, dict(response), now + IDEMPOTENCY_TTL)
            self._stats.generation_created(
                gen.id, idempotency_key, target=target_key(sheet_id, cell_id, layer_id)
            )
            self._schedule_events(gen)
            return response, False

    def _expire_keys(self, now: float) -> None:
        while self._keys:
            key, entry = next(iter(self._keys.items()))
            if entry.expires_at > now:
                break
            del self._keys[key]

    def _new_generation(
        self,
        agent_id: str,
        prefix: str,
        sheet_id: int,
        cell_id: int,
        layer_id: int | None,
        inputs: LipsyncInputs,
        idempotency_key: str | None,
        now: float,
    ) -> Generation:
        # An explicit fail_next wins over the special resources: it is the test's own instruction.
        outcome: Outcome = "completed"
        reason = None
        if self._fail_queue:
            outcome, reason = "failed", self._fail_queue.popleft()
        elif inputs.video_resource_id == FAIL_VIDEO_ID:
            outcome, reason = "failed", NO_FACE_REASON
        elif inputs.video_resource_id == STUCK_VIDEO_ID:
            outcome = "stuck"
        gen_id = self._next_id
        self._next_id += 1
        # Deterministic per id, yet not guessable from the id alone (like a real CDN object key).
        token = f"lipsynced-{gen_id}-{hashlib.sha256(f'gen-sim:{gen_id}'.encode()).hexdigest()[:12]}"
        gen = Generation(
            id=gen_id,
            agent_id=agent_id,
            sheet_id=sheet_id,
            cell_id=cell_id,
            layer_id=layer_id,
            inputs=inputs,
            prefix=prefix,
            idempotency_key=idempotency_key,
            outcome=outcome,
            failed_reason=reason,
            duration=self.duration_for(inputs.model),
            output_size=self.output_size,
            token=token,
            created_at=time.time(),
            started_at=now,
        )
        self._generations[gen_id] = gen
        self._by_token[token] = gen_id
        self._jobs.setdefault((sheet_id, cell_id, layer_id), []).append(gen_id)
        return gen

    # ------------------------------------------------------------------ generations

    def _view(self, gen: Generation, now: float) -> dict[str, Any]:
        status = gen.status(now)
        outputs: list[dict[str, Any]] = []
        if status == "completed":
            outputs.append(
                {
                    "id": gen.output_resource_id,
                    "url": self._output_url(gen),
                    "thumbnail_url": f"{self.base_url}/cdn/thumbnails/{gen.token}.jpg",
                    "object_type": "video",
                    "type": "output",
                }
            )
        return {
            "id": gen.id,
            "status": status,
            "user_job_type": "lipsync",
            "result": None,
            "failed_reason": gen.failed_reason if status == "failed" else None,
            "output_resources": outputs,
            # Failed and stopped jobs are refunded, running ones not yet reconciled: no cost to show.
            "execution_cost": COSTS[gen.inputs.model] if status == "completed" else None,
        }

    def _output_url(self, gen: Generation) -> str:
        return f"{self.base_url}/cdn/outputs/{gen.token}.mp4"

    def get_generation(self, raw_id: str) -> dict[str, Any]:
        with self._lock:
            return self._view(self._generation(raw_id), self._clock())

    def stop(self, raw_id: str) -> dict[str, Any]:
        with self._lock:
            gen = self._generation(raw_id)
            self._stats.stop_received(gen.id)
            status = gen.status(self._clock())
            if status not in ("pending", "processing"):
                raise ApiError(422, "job_cannot_be_stopped", f"Generation already {status}")
            gen.stopped = True
            gen.stopped_by_api = True
            self.events.schedule(gen.id, "stopped", self._clock(), gen.continues)
            return {"generation_id": gen.id, "status": "stopped"}

    def continue_(self, raw_id: str) -> dict[str, Any]:
        with self._lock:
            gen = self._generation(raw_id)
            if gen.status(self._clock()) != "stopped":
                raise ApiError(422, "validation_error", CANNOT_CONTINUE)
            gen.stopped = False
            gen.started_at = self._clock()
            gen.duration = self.duration_for(gen.inputs.model)  # a continued job runs its full course again
            gen.continues += 1
            gen.charges += 1
            self._stats.charged()
            self._schedule_events(gen)
            return {"generation_id": gen.id, "status": "pending"}

    # ------------------------------------------------------------------ cells and layers

    def _jobs_view(self, key: tuple[int, int, int | None], now: float) -> tuple[list[dict[str, Any]], Any]:
        jobs = [self._view(self._generations[g], now) for g in reversed(self._jobs.get(key, []))]
        default = next((j for j in jobs if j["status"] == "completed"), None)
        return jobs, default

    def _layer_view(self, sheet_id: int, cell_id: int, now: float) -> dict[str, Any]:
        layer_id = cell_id + LAYER_OFFSET
        jobs, default = self._jobs_view((sheet_id, cell_id, layer_id), now)
        return {
            "id": layer_id,
            "name": "Talking head",
            "position": 1,
            "type": "clip",
            "additional_attributes": dict(self._cell(sheet_id, cell_id).layer_attributes),
            "created_at_ts": self._seeded_ts,
            "updated_at_ts": self._cell(sheet_id, cell_id).layer_updated_at_ts or self._seeded_ts,
            "default_user_job": default,
            "user_jobs": jobs,
            "execution_cost": None,
        }

    def _cell_view(self, sheet_id: int, cell_id: int, now: float) -> dict[str, Any]:
        cell = self._cell(sheet_id, cell_id)
        jobs, default = self._jobs_view((sheet_id, cell_id, None), now)
        # Until someone sets it, a cell holds an ordinary talking-head upload (never 5098/5099).
        value = cell.value if cell.value is not None else self._upload_url(str(5001 + (cell_id - 3000) % 97))
        return {
            "id": cell_id,
            "value": value,
            "additional_attributes": dict(cell.additional_attributes),
            "cell_role": "content",
            "created_at_ts": self._seeded_ts,
            "updated_at_ts": cell.updated_at_ts,
            "default_user_job": default,
            "user_jobs": jobs,
            "video_layers": [self._layer_view(sheet_id, cell_id, now)],
            "execution_cost": None,
        }

    def get_cell(self, *, agent: object, sheet: str, cell: str) -> dict[str, Any]:
        with self._lock:
            self._check_agent(agent)
            sheet_id, cell_id, _ = self._target(sheet, cell, None)
            return self._cell_view(sheet_id, cell_id, self._clock())

    def get_layer(self, *, agent: object, sheet: str, cell: str, layer: str) -> dict[str, Any]:
        with self._lock:
            self._check_agent(agent)
            sheet_id, cell_id, _ = self._target(sheet, cell, layer)
            return self._layer_view(sheet_id, cell_id, self._clock())

    def patch_cell(self, *, agent: object, sheet: str, cell: str, body: object) -> dict[str, Any]:
        """Merge ``additional_attributes`` (top-level or under ``spreadsheet_cell``) and/or set ``value``."""
        with self._lock:
            self._check_agent(agent)
            sheet_id, cell_id, _ = self._target(sheet, cell, None)
            if not isinstance(body, dict):
                raise ApiError(422, "validation_error", "Request body must be a JSON object")
            nested = body.get("spreadsheet_cell")
            source = nested if isinstance(nested, dict) else body
            attrs = source.get("additional_attributes")
            if attrs is not None and not isinstance(attrs, dict):
                raise ApiError(422, "validation_error", "additional_attributes must be an object")
            if attrs is None and "value" not in source:
                raise ApiError(
                    422, "validation_error", "Nothing to update: give additional_attributes or value"
                )
            state = self._cell(sheet_id, cell_id)
            state.additional_attributes.update(attrs or {})
            if "value" in source:
                state.value = source["value"]
            state.updated_at_ts = int(time.time() * 1000)
            return self._cell_view(sheet_id, cell_id, self._clock())

    def set_sources(
        self, *, sheet: str, cell: str, layer: str | None, video: str | None, audio: str | None
    ) -> dict[str, Any]:
        """Change the source video and/or audio of a cell's or layer's Lipsync card (what a script
        edit or a re-cut does), as the card's ``talking_avatar_video_data`` URLs in the target's
        ``additional_attributes`` (GEN documents no field for them: this is the newer body's
        shape). A resource id is turned into its URL; a side not given keeps its value. Returns
        the cell or layer as ``GET`` answers it."""
        with self._lock:
            sheet_id, cell_id, layer_id = self._target(sheet, cell, layer)
            if video is None and audio is None:
                raise ApiError(422, "validation_error", "Nothing to change: give video and/or audio")
            state = self._cell(sheet_id, cell_id)
            attributes = state.layer_attributes if layer_id is not None else state.additional_attributes
            data = attributes.setdefault("talking_avatar_video_data", {})
            for side, given in (("video", video), ("audio", audio)):
                if given is not None:
                    data[side] = {"value": self._source_url(str(given))}
            now_ts = int(time.time() * 1000)
            if layer_id is not None:
                state.layer_updated_at_ts = now_ts
                return self._layer_view(sheet_id, cell_id, self._clock())
            state.updated_at_ts = now_ts
            return self._cell_view(sheet_id, cell_id, self._clock())

    def _source_url(self, given: str) -> str:
        if given in self.resources:
            return self._upload_url(given)
        gen = self._completed_output(given)
        if gen is not None:
            return self._output_url(gen)
        if is_http_url(given):
            return given
        raise ApiError(422, "validation_error", f"Unknown content resource {given[:50]!r}")

    # ------------------------------------------------------------------ content resources and CDN

    def _upload_url(self, resource_id: str) -> str:
        return f"{self.base_url}/cdn/uploads/{resource_id}.{self.resources[resource_id].extension}"

    def content_resource(self, *, agent: object, raw_id: str) -> dict[str, Any]:
        with self._lock:
            self._check_agent(agent)
            resource = self.resources.get(raw_id)
            if resource is not None:
                return {
                    "content_resource": {
                        "id": _int_id(resource.id) or resource.id,
                        "url": self._upload_url(resource.id),
                        "thumbnail_url": None,
                        "file_name": f"{resource.id}.{resource.extension}",
                        "content_type": resource.content_type,
                    },
                    "generator": None,
                }
            gen = self._completed_output(raw_id)
            if gen is None:
                raise ApiError(404, "content_resource_not_found", "Content resource not found")
            return {
                "content_resource": {
                    "id": gen.output_resource_id,
                    "url": self._output_url(gen),
                    "thumbnail_url": f"{self.base_url}/cdn/thumbnails/{gen.token}.jpg",
                    "file_name": f"{gen.token}.mp4",
                    "content_type": "video/mp4",
                },
                "generator": {"id": gen.id, "status": "completed", "type": "lipsync"},
            }

    def upload(self, *, agent: object, file_name: str, content_type: str, data: bytes) -> dict[str, Any]:
        """``POST /v1/content_resources`` (multipart): a new video or audio resource holding ``data``,
        read back with ``GET /v1/content_resources/{id}`` and served from the CDN. Uploading is free."""
        with self._lock:
            self._check_agent(agent)
            kind = content_type.split("/", 1)[0]
            if kind not in ("video", "audio"):
                raise ApiError(
                    422, "content_resource_creation_failed", f"Unsupported file type {content_type[:50]!r}"
                )
            resource_id = str(UPLOAD_ID_BASE + self._next_upload)
            self._next_upload += 1
            self.resources[resource_id] = Resource(resource_id, "video" if kind == "video" else "audio")
            self._uploads[resource_id] = bytes(data)
        answer = self.content_resource(agent=agent, raw_id=resource_id)
        answer["content_resource"]["file_name"] = file_name
        return answer

    def uploaded(self, resource_id: str) -> bytes:
        """The bytes uploaded as ``resource_id`` (KeyError if none), for tests."""
        with self._lock:
            return self._uploads[resource_id]

    def _completed_by_token(self, token: str) -> Generation | None:
        gen_id = self._by_token.get(token)
        gen = self._generations.get(gen_id) if gen_id is not None else None
        return gen if gen is not None and gen.status(self._clock()) == "completed" else None

    def cdn_output(self, token: str) -> bytes | None:
        """The output video of a completed generation (a CDN only has the file once it exists)."""
        with self._lock:
            gen = self._completed_by_token(token)
            if gen is None:
                return None
            size = gen.output_size
        return media.build_mp4(token, size)  # outside the lock: large files take a moment

    def cdn_thumbnail(self, token: str) -> bytes | None:
        with self._lock:
            gen = self._completed_by_token(token)
        return media.build_jpeg() if gen is not None else None

    def cdn_upload(self, resource_id: str, extension: str) -> bytes | None:
        resource = self.resources.get(resource_id)
        if resource is None or resource.extension != extension:
            return None
        if resource_id in self._uploads:
            return self._uploads[resource_id]
        if resource.kind == "video":
            return media.build_mp4(f"upload-{resource_id}", _UPLOAD_VIDEO_SIZE)
        return media.build_mp3()

    # ------------------------------------------------------------------ test inspection

    def snapshot(self, gen_id: int | str) -> dict[str, Any]:
        """Everything about one generation, for tests. KeyError if unknown."""
        with self._lock:
            number = _int_id(str(gen_id))
            gen = self._generations.get(number) if number is not None else None
            if gen is None:
                raise KeyError(gen_id)
            now = self._clock()
            view = self._view(gen, now)
            ends = not gen.stopped and gen.outcome != "stuck"
            return {
                **view,
                # Wall-clock time at which it reaches (or reached) its outcome; None if it never will.
                "ready_at": time.time() + (gen.started_at + gen.duration - now) if ends else None,
                "model": gen.inputs.model,
                "dialect": gen.inputs.dialect,
                "prefix": gen.prefix,
                "video": gen.inputs.video,
                "audio": gen.inputs.audio,
                "options": dict(gen.inputs.options),
                "agent_id": gen.agent_id,
                "sheet_id": gen.sheet_id,
                "cell_id": gen.cell_id,
                "layer_id": gen.layer_id,
                "idempotency_key": gen.idempotency_key,
                "stopped_by_api": gen.stopped_by_api,
                "continues": gen.continues,
                "charges": gen.charges,
                "duration": gen.duration,
                "created_at": gen.created_at,
                "output_resource_id": gen.output_resource_id,
                "output_url": self._output_url(gen),
                "output_size": gen.output_size,
                "token": gen.token,
            }

    def output_bytes(self, gen_id: int | str) -> bytes:
        with self._lock:
            number = _int_id(str(gen_id))
            gen = self._generations.get(number) if number is not None else None
            if gen is None:
                raise KeyError(gen_id)
            token, size = gen.token, gen.output_size
        return media.build_mp4(token, size)
