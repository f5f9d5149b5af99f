"""Webhook signing and verification in the Standard Webhooks format.

Headers ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``; the signature is
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``. The id is the same on every retry of one
message (receivers dedupe on it); the timestamp and signature are fresh on each attempt. Secrets in
the ``whsec_<base64>`` form are decoded as the spec says; any other string is used as raw bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

#: Receivers reject messages whose timestamp is further than this from their clock (seconds).
DEFAULT_TOLERANCE = 300


class WebhookVerificationError(Exception):
    """A received webhook failed verification (bad signature, stale timestamp, missing header)."""


def _key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(
    secret: str | None, msg_id: str, body: bytes, *, now: float | None = None
) -> dict[str, str]:
    """Headers for one delivery attempt (unsigned when no secret is configured)."""
    timestamp = int(time.time() if now is None else now)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        headers["webhook-signature"] = sign(secret, msg_id, timestamp, body)
    return headers


def verify(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> str:
    """Check a received webhook and return its id. Receivers can use this as it is.

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is outside ``tolerance``, or no
            signature in the header matches (compared in constant time).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"]
    except (KeyError, ValueError):
        raise WebhookVerificationError("missing or malformed webhook headers") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("webhook timestamp outside the tolerance")
    expected = sign(secret, msg_id, timestamp, body).split(",", 1)[1]
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return msg_id
    raise WebhookVerificationError("no matching webhook signature")
