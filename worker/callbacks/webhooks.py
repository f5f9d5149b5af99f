"""Delivering one owed webhook: the whole attempt policy, without Celery.

:func:`attempt` makes one delivery attempt of an outbox entry and says what happens next: nothing
(delivered, dead-lettered, or this message is stale) or another attempt after a countdown. The
``lipsync.deliver_webhook`` task only turns that countdown into ``self.retry``.

* The outbox agrees to the attempt only for the message carrying the entry's current token
  (:meth:`Outbox.claim`), and pushes the entry's due time past the attempt's hard time limit: if
  the worker dies mid-attempt, the sweeper sends the webhook again after that.
* A 2xx removes the entry. 410 Gone and an unsafe URL (an address in a private range) are final:
  dead-lettered at once. Any other failure (a connection refused, a timeout, a 5xx, a receiver's
  name that does not resolve just now) is retried on ``LIPSYNC_WEBHOOK_RETRY_DELAYS``
  (:func:`worker.retry.decide`), then dead-lettered. Attempts whose workers died count too, so a
  webhook never loops forever.
* Redirects are never followed (a 3xx is a failed attempt, as Standard Webhooks says): following one
  would let a receiver bounce us to an internal address.
* Webhooks go out signed (``LIPSYNC_WEBHOOK_SECRET``), or unsigned only if
  ``LIPSYNC_ALLOW_UNSIGNED_WEBHOOKS`` says so: a request with a webhook callback is refused
  otherwise (:func:`refuse_unsigned`), and a webhook owed anyway (the secret went missing since)
  is dead-lettered, to be replayed once the secret is back.

Delivery is at least once: an attempt whose answer is lost (a timeout, a worker killed after the
POST) is made again with the same ``webhook-id``, which receivers dedupe on.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from worker.callbacks.models import Callback
from worker.callbacks.outbox import Attempt, Outbox
from worker.callbacks.signing import signed_headers
from worker.errors import LipsyncError, RequestInvalid
from worker.ops import metrics
from worker.output.urlguard import check_url
from worker.retry import GiveUp, RetryPolicy, decide, is_retryable
from worker.settings import Settings

log = logging.getLogger("lipsync.webhooks")


class WebhookFailed(LipsyncError):
    """This attempt failed (connection, timeout, non-2xx); a later attempt may succeed."""

    retryable = True


class WebhookRejected(LipsyncError):
    """The receiver answered in a way that retrying will not fix (HTTP 410 Gone)."""


#: Why a webhook is not sent when it could only go out unsigned, naming what fixes it.
UNSIGNED_REFUSED = (
    "webhooks must be signed with LIPSYNC_WEBHOOK_SECRET, which is not set: set it "
    "(or LIPSYNC_ALLOW_UNSIGNED_WEBHOOKS=true to send webhooks unsigned)"
)


def signing_secret(settings: Settings) -> str | None:
    """The secret webhooks are signed with; None when there is none (an empty value is none)."""
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    return secret or None


def webhooks_allowed(settings: Settings) -> bool:
    """Whether webhooks may go out: signed, or unsigned because that was asked for explicitly."""
    return signing_secret(settings) is not None or settings.allow_unsigned_webhooks


def refuse_unsigned(callback: Callback | None, settings: Settings) -> None:
    """Refuse a request whose webhook could only go out unsigned, before anything is recorded.

    Raises:
        RequestInvalid: naming ``callback.webhook_url``.
    """
    if callback is not None and callback.webhook_url is not None and not webhooks_allowed(settings):
        raise RequestInvalid([{"field": "callback.webhook_url", "message": UNSIGNED_REFUSED}])


def attempt_time_limits(webhook_timeout: float) -> tuple[float, float]:
    """Soft and hard time limits (seconds) of one delivery task.

    requests' timeout bounds each socket read, not the whole request: a receiver answering one byte
    at a time would hold a worker slot for as long as it likes. The soft limit ends the attempt as a
    failed one; the hard limit (the pool kills the process) is the backstop.
    """
    return webhook_timeout + 1.0, webhook_timeout + 10.0


def retry_policy(settings: Settings) -> RetryPolicy:
    delays = tuple(settings.webhook_retry_delays)
    return RetryPolicy(limit=len(delays), delays=delays)


def outbox_ttl(settings: Settings) -> int:
    """How long an outbox entry outlives its last write. While the fleet runs, an entry is written
    at least once per longest gap (a queued message, a retry countdown, an attempt; then the
    sweeper); with the fleet down, an owed webhook survives LIPSYNC_RESULT_TTL."""
    s = settings
    _, attempt_limit = attempt_time_limits(s.webhook_timeout)
    longest_gap = max(
        s.queued_recovery,
        max(s.webhook_retry_delays, default=0.0) + s.recovery_grace,
        attempt_limit + s.recovery_grace,
    )
    return s.result_ttl + int(longest_gap + s.sweep_interval)


#: Makes the POST of one attempt (:func:`post_webhook`, or a wrapper that maps the task's own time
#: limit to :class:`WebhookFailed`).
Poster = Callable[..., int]


def attempt(
    outbox: Outbox,
    session: requests.Session,
    settings: Settings,
    msg_id: str,
    drive: int,
    *,
    post: Poster | None = None,
) -> float | None:
    """One delivery attempt of webhook ``msg_id`` by the message carrying token ``drive``.

    Returns the countdown to the next attempt, or None when there is nothing more to do for this
    message. Raises ``redis.RedisError`` if the outbox is unreachable (the entry stays owed).
    """
    _, hard_limit = attempt_time_limits(settings.webhook_timeout)
    # If this worker dies during the attempt, the sweeper sends the webhook again after this.
    claimed = outbox.claim(msg_id, drive, due_at=time.time() + hard_limit + settings.recovery_grace)
    if claimed is None:
        log.info("webhook %s: already delivered, dead-lettered or re-sent; dropping this copy", msg_id)
        return None
    policy = retry_policy(settings)
    assert policy.limit is not None
    if claimed.number > policy.limit + 1:
        # Attempts that never reported back (their workers died) count too: do not loop forever.
        _dead_letter(outbox, claimed, f"webhook {msg_id}: {claimed.number - 1} attempts did not succeed")
        return None
    if not webhooks_allowed(settings):
        _dead_letter(outbox, claimed, f"webhook {msg_id}: {UNSIGNED_REFUSED}")
        return None
    secret = signing_secret(settings)
    try:
        (post or post_webhook)(
            session,
            claimed.url,
            claimed.payload,
            msg_id=msg_id,
            secret=secret,
            timeout=settings.webhook_timeout,
            allow_private=settings.allow_private_urls,
        )
    except LipsyncError as exc:
        return _after_failure(outbox, settings, claimed, exc, policy)
    outbox.delivered(msg_id)
    metrics.record_callback(outbox.redis, kind="webhook", outcome="delivered")
    log.info("webhook %s delivered (attempt %d)", msg_id, claimed.number)
    return None


def _after_failure(
    outbox: Outbox, settings: Settings, claimed: Attempt, exc: LipsyncError, policy: RetryPolicy
) -> float | None:
    if is_retryable(exc):
        # Any failure another attempt may cure (WebhookFailed, an unresolved host...), not only
        # the receiver's answers.
        metrics.record_callback(outbox.redis, kind="webhook", outcome="failed_attempt")
    verdict = decide(exc, retries=claimed.number - 1, policy=policy)
    if isinstance(verdict, GiveUp):
        _dead_letter(outbox, claimed, str(exc))
        return None
    due_at = time.time() + verdict.delay + settings.recovery_grace
    if not outbox.reschedule(claimed.msg_id, claimed.drive, due_at=due_at):
        log.info("webhook %s: taken over by a newer message; not retrying this copy", claimed.msg_id)
        return None
    log.warning("%s; retrying in %.0f s (attempt %d)", exc, verdict.delay, claimed.number)
    return verdict.delay


def _dead_letter(outbox: Outbox, claimed: Attempt, error: str) -> None:
    if not outbox.give_up(claimed, error=error):
        log.info("webhook %s: taken over by a newer message; leaving it to that one", claimed.msg_id)
        return
    log.error("webhook %s given up after %d attempts: %s", claimed.msg_id, claimed.number, error)
    metrics.record_callback(outbox.redis, kind="webhook", outcome="dead_lettered")


def post_webhook(
    session: requests.Session,
    url: str,
    payload: dict[str, Any],
    *,
    msg_id: str,
    secret: str | None,
    timeout: float,
    allow_private: bool,
) -> int:
    """One POST. Returns the HTTP status on success (2xx).

    Raises:
        WebhookRejected: 410 Gone; the receiver asked us to stop.
        WebhookFailed: anything else that is not 2xx, or the request did not complete.
        UnsafeURL: the URL points at an address we refuse (final).
        HostUnresolved: the URL's host did not resolve just now (retryable).
    """
    check_url(url, allow_private=allow_private)
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = signed_headers(secret, msg_id, body)
    try:
        response = session.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise WebhookFailed(f"webhook {msg_id}: {type(exc).__name__}") from None
    with response:
        if 200 <= response.status_code < 300:
            return response.status_code
        if response.status_code == 410:
            raise WebhookRejected(f"webhook {msg_id}: receiver answered 410 Gone")
        raise WebhookFailed(f"webhook {msg_id}: receiver answered HTTP {response.status_code}")


__all__ = [
    "UNSIGNED_REFUSED",
    "WebhookFailed",
    "WebhookRejected",
    "attempt",
    "attempt_time_limits",
    "outbox_ttl",
    "post_webhook",
    "refuse_unsigned",
    "retry_policy",
    "signing_secret",
    "webhooks_allowed",
]
