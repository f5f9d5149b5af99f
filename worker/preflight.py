"""What a worker checks before it takes any work, so that one misconfigured worker in a fleet
never takes jobs only to fail them (``configuration_error``, failure callbacks fired, for every job).

* The GEN key and agent are set (``LIPSYNC_GEN_API_KEY``, ``LIPSYNC_GEN_AGENT_ID``); else the worker
  refuses to start, with one line naming the setting.
* GEN accepts them: ``GET /v1/me`` (the key) and the agent's automation config (the key can see the
  agent). A 401, 404 or 422 refuses to start; while GEN is unreachable or busy the worker waits and
  retries (a GEN outage must not crash-loop a fleet). The verdict is kept in Redis for a while, so
  ``lipsync-worker health`` reports it cheaply; it is kept per configuration (a hash of the base URL,
  agent and key), so a verdict on one worker's settings never answers for another's.
* A GEN base URL on a loopback or private address while private URLs are refused is almost always a
  simulator run by hand: the worker warns, naming ``LIPSYNC_ALLOW_PRIVATE_URLS`` (its outputs would
  otherwise fail as ``unsafe_url`` after the whole generation ran).
* A webhook secret still at docker-compose's public placeholder signs webhooks anyone can forge:
  the worker warns, naming ``LIPSYNC_WEBHOOK_SECRET``.

Runs on Celery's ``worker_init`` signal (before logging is set up: it writes to stderr itself),
for ``lipsync-worker worker`` and ``celery -A worker worker`` alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from worker.errors import ConfigurationError
from worker.gen.client import GenClient
from worker.gen.errors import GenAPIError, GenAuthError, GenNotFound, GenRejected
from worker.names import GEN_CHECK_KEY
from worker.retry import Retry, RetryPolicy, decide
from worker.settings import Settings

#: How long a successful check is trusted by ``health`` before it asks GEN again.
CHECK_TTL = 300
#: Exit status of a worker that refuses to start (sysexits' EX_CONFIG).
EXIT_CONFIG = 78
#: docker-compose.yml's default LIPSYNC_WEBHOOK_SECRET: public, so a signature made with it proves nothing.
COMPOSE_PLACEHOLDER_WEBHOOK_SECRET = "change-me-compose-webhook-secret"  # noqa: S105 (a known public value)
#: Waiting for an unreachable GEN: 1, 2, 4… seconds, at most a minute apart, for as long as it takes.
WAITING_FOR_GEN = RetryPolicy(limit=None, cap=60.0)


@dataclass(frozen=True)
class GenCheck:
    ok: bool
    detail: str
    checked_at: float


def require_gen_settings(settings: Settings) -> None:
    """Raise :class:`ConfigurationError` naming every GEN setting a worker needs and lacks."""
    missing = [
        name
        for name, value in (
            ("LIPSYNC_GEN_API_KEY", settings.gen_api_key and settings.gen_api_key.get_secret_value()),
            ("LIPSYNC_GEN_AGENT_ID", settings.gen_agent_id),
        )
        if not value
    ]
    if missing:
        raise ConfigurationError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: a worker needs GEN "
            "credentials (a personal access token and the agent that owns the sheets)"
        )


def private_gen_warning(settings: Settings) -> str | None:
    """A warning when GEN's base URL is on a loopback/private address while private URLs are refused."""
    if settings.allow_private_urls:
        return None
    host = urlsplit(settings.gen_base).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None
    private = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_global)
    if not private:
        return None
    return (
        f"LIPSYNC_GEN_BASE_URL {settings.gen_base} is on a non-public address ({private[0]}) while "
        "LIPSYNC_ALLOW_PRIVATE_URLS is off: outputs served from there will fail as unsafe_url. "
        "For a simulator, set LIPSYNC_ALLOW_PRIVATE_URLS=true"
    )


def placeholder_secret_warning(settings: Settings) -> str | None:
    """A warning when the webhook secret is docker-compose's published placeholder."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    if secret != COMPOSE_PLACEHOLDER_WEBHOOK_SECRET:
        return None
    return (
        "LIPSYNC_WEBHOOK_SECRET is docker-compose's public placeholder: anyone can forge this worker's "
        "webhook signatures. Set LIPSYNC_WEBHOOK_SECRET to a secret of your own (e.g. `openssl rand -hex 32`)"
    )


def verify_gen(
    gen: GenClient,
    *,
    say: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
    attempts: int | None = None,
) -> None:
    """Ask GEN whether it accepts the key and the agent; wait while it cannot answer.

    Raises :class:`ConfigurationError` when GEN refuses them, and (only when ``attempts`` bounds
    the wait) the last :class:`GenAPIError` when GEN never answered.
    """
    tried = 0
    while True:
        try:
            gen.check_credentials()
            return
        except GenAuthError as exc:
            raise ConfigurationError(f"GEN refused LIPSYNC_GEN_API_KEY (401): {exc}") from None
        except GenNotFound as exc:
            raise ConfigurationError(
                f"GEN does not know agent LIPSYNC_GEN_AGENT_ID={gen.agent_id} for this key (404): {exc}"
            ) from None
        except GenRejected as exc:
            raise ConfigurationError(f"GEN refused the worker's configuration: {exc}") from None
        except GenAPIError as exc:
            verdict = decide(exc, retries=tried, policy=WAITING_FOR_GEN)
            tried += 1
            if not isinstance(verdict, Retry) or (attempts is not None and tried >= attempts):
                raise
            say(
                f"waiting for GEN at {gen.base_url} ({type(exc).__name__}: {exc}); "
                f"retrying in {verdict.delay:.0f} s"
            )
            sleep(verdict.delay)


def check_key(settings: Settings) -> str:
    """The Redis key of the verdict on these settings' GEN configuration (base URL, agent, key).

    A hash, so neither the key nor anything that identifies it in a log lands in Redis."""
    key = settings.gen_api_key.get_secret_value() if settings.gen_api_key else ""
    material = f"{settings.gen_base}|{settings.gen_agent_id or ''}|{key}"
    return GEN_CHECK_KEY + hashlib.sha256(material.encode()).hexdigest()[:32]


def record_check(r: redis.Redis, settings: Settings, check: GenCheck, *, ttl: int = CHECK_TTL) -> None:
    r.set(check_key(settings), json.dumps(check.__dict__), ex=ttl)


def cached_check(r: redis.Redis, settings: Settings) -> GenCheck | None:
    """The verdict last recorded on exactly these settings' GEN configuration, if still fresh."""
    raw: Any = r.get(check_key(settings))
    if raw is None:
        return None
    data = json.loads(raw)
    return GenCheck(ok=bool(data["ok"]), detail=str(data["detail"]), checked_at=float(data["checked_at"]))


def check_gen_now(settings: Settings, r: redis.Redis | None) -> GenCheck:
    """One check (no waiting), recorded in Redis when given: what ``health`` runs when nothing is cached."""
    try:
        require_gen_settings(settings)
        verify_gen(GenClient.from_settings(settings), say=lambda _line: None, attempts=1)
        check = GenCheck(True, "GEN accepts the key and the agent", time.time())
    except ConfigurationError as exc:
        check = GenCheck(False, str(exc), time.time())
    except GenAPIError as exc:
        # Unreachable is not a verdict: not cached, so the next look asks again.
        return GenCheck(False, f"GEN unreachable: {type(exc).__name__}", time.time())
    if r is not None:
        record_check(r, settings, check)
    return check


def preflight(settings: Settings, r: redis.Redis | None, *, say: Callable[[str], None]) -> None:
    """Everything a worker checks before it starts. Raises :class:`ConfigurationError` to refuse."""
    require_gen_settings(settings)
    for warning in (private_gen_warning(settings), placeholder_secret_warning(settings)):
        if warning:
            say(f"warning: {warning}")
    gen = GenClient.from_settings(settings)
    try:
        verify_gen(gen, say=say)
    except ConfigurationError as exc:
        _record_quietly(r, settings, GenCheck(False, str(exc), time.time()))
        raise
    _record_quietly(r, settings, GenCheck(True, "GEN accepts the key and the agent", time.time()))


def _record_quietly(r: redis.Redis | None, settings: Settings, check: GenCheck) -> None:
    # The cache only serves `health`; a Redis not up yet must not stop a worker (Celery waits for it).
    if r is not None:
        with contextlib.suppress(redis.RedisError):
            record_check(r, settings, check)


def refuse_to_start(reason: str) -> None:
    """One line on stderr and the configuration-error exit status; no traceback."""
    print(f"lipsync-worker: refusing to start: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)
