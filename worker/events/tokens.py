"""The receiver's secret path: ``/gen-events/<token>``.

GEN's event webhook is not signed (nothing about signing is documented), so whoever knows the URL
can post events. The token in the path is the only proof an event comes from GEN, which is why:
it must be long and random (:func:`check_token`), it is compared in constant time
(:func:`token_matches`), and it never appears in a log line or in what the CLI prints
(:func:`mask_url`). Even a forged event can do no more than make a job poll early.
"""

from __future__ import annotations

import hmac
import re
from urllib.parse import urlsplit, urlunsplit

#: The receiver's path, before the token.
PATH_PREFIX = "/gen-events/"
#: Shortest token accepted: 16 characters of base64url is 96 bits.
MIN_TOKEN_LENGTH = 16
#: Characters a token may hold: unreserved in a URL, so it travels unencoded and unchanged.
_TOKEN = re.compile(r"[A-Za-z0-9_~.-]+")
_IN_PATH = re.compile(re.escape(PATH_PREFIX) + r"[^/?#\s]*")
MASK = "***"


class BadToken(ValueError):
    """LIPSYNC_EVENTS_TOKEN is missing or too weak (the message says which, never the token)."""


def check_token(token: str | None) -> str:
    """The token, if it is fit to guard the receiver. Raises :class:`BadToken`."""
    if not token:
        raise BadToken(
            "LIPSYNC_EVENTS_TOKEN is not set: the receiver's URL would have no secret. Set it to a "
            "long random string: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise BadToken(f"LIPSYNC_EVENTS_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters")
    if not _TOKEN.fullmatch(token):
        raise BadToken(
            "LIPSYNC_EVENTS_TOKEN may hold only letters, digits and - _ . ~ (it goes in a URL path)"
        )
    return token


def token_matches(path: str, token: str) -> bool:
    """Whether ``path`` is the receiver's path for ``token`` (constant time in the token)."""
    if not path.startswith(PATH_PREFIX):
        return False
    given = path[len(PATH_PREFIX) :].rstrip("/")
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def receiver_url(base: str, token: str) -> str:
    """The URL to register with GEN: ``base`` (the receiver's public address, with or without the
    ``/gen-events`` path) with ``/gen-events/<token>`` completed. A URL that carries a token already
    is returned as it is (the caller checks that the token is ours)."""
    if token_in(base) is not None:
        return base
    parts = urlsplit(base)
    path = parts.path.rstrip("/")
    if not path.endswith(PATH_PREFIX.rstrip("/")):
        path += PATH_PREFIX.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"{path}/{token}", "", ""))


def token_in(url: str) -> str | None:
    """The token a receiver URL carries, if any."""
    match = _IN_PATH.search(urlsplit(url).path)
    if match is None:
        return None
    return match.group(0)[len(PATH_PREFIX) :] or None


def mask_url(url: str) -> str:
    """``url`` fit to print: the token in its path, any password and any query masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@" + netloc.rsplit("@", 1)[1]
    path = _IN_PATH.sub(PATH_PREFIX + MASK, parts.path)
    query = MASK if parts.query else ""
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def mask_text(text: str, token: str | None) -> str:
    """``text`` (a log line, GEN's answer) with the token and any receiver path's token masked."""
    if token:
        text = text.replace(token, MASK)
    return _IN_PATH.sub(PATH_PREFIX + MASK, text)
