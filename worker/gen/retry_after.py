"""Parse an HTTP ``Retry-After`` header into a delay in seconds.

RFC 9110 §10.2.3 allows two forms: ``delay-seconds`` (``"120"``) and an ``HTTP-date``
(``"Wed, 21 Oct 2015 07:28:00 GMT"``, plus the obsolete RFC 850 and asctime forms). GEN documents no
``Retry-After`` at all (its rate limiting is "not yet enforced"), so this is deliberately lenient about
what it accepts and strict about what it returns: a finite, non-negative float, or ``None``.

``None`` means "no usable hint": the caller falls back to its own backoff. Callers must still cap
the value: a server, or a proxy in front of it, may ask for hours. :func:`worker.retry.decide` waits
at least what GEN asks, even beyond ``LIPSYNC_RETRY_MAX_DELAY`` (which caps only our own backoff),
and never longer than :data:`worker.retry.MAX_COUNTDOWN`.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["parse_retry_after"]

# RFC 9110 says 1*DIGIT; fractional seconds are accepted too because some servers send them, and
# there is no harm in honouring "1.5". A sign is not accepted: "-5" is not a delay.
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")

# Longer digit strings are nonsense as a delay, and int() refuses beyond 4300 digits anyway.
_MAX_SECONDS_CHARS = 32


def parse_retry_after(value: str | bytes | None, *, now: float | None = None) -> float | None:
    """Return the delay ``value`` asks for, in seconds, or ``None`` when absent or unparseable.

    ``now`` is the current time as epoch seconds (defaults to :func:`time.time`); it only matters for
    the HTTP-date form. A date in the past yields ``0.0``: the server's wait is already over. The
    result is never negative, never NaN and never infinite. Never raises.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        # Header values are latin-1 on the wire; anything undecodable is simply not a hint.
        value = value.decode("latin-1")
    text = value.strip()
    if not text:
        return None

    if len(text) <= _MAX_SECONDS_CHARS and _SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None

    return _parse_http_date(text, time.time() if now is None else now)


def _parse_http_date(text: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, OverflowError, IndexError):
        # parsedate_to_datetime raises ValueError on garbage (TypeError on older Pythons).
        return None
    if when.tzinfo is None:
        # asctime dates and "-0000" carry no zone; HTTP dates are always GMT (RFC 9110 §5.6.7).
        when = when.replace(tzinfo=UTC)
    try:
        delay = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    if not math.isfinite(delay):
        return None
    return max(0.0, delay)
