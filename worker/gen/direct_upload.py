"""GEN's direct upload (files over its 50 MB multipart limit, up to 1 GiB): the blob GEN answers and
the ``PUT`` of the bytes to the URL it hands out.

The three steps: :meth:`~worker.gen.client.GenClient.create_direct_upload` (``POST /v1/direct_upload``)
-> :func:`put_blob` -> :meth:`~worker.gen.client.GenClient.create_content_resource` (the signed id).

The ``PUT`` goes to storage GEN signed a URL for (S3 in production), not to GEN's API: it is sent on
a session the caller gives (the egress session, whose connections only open to public addresses),
with exactly the headers GEN listed and never our API key. Like the client, it never retries: a
failure is one :class:`~worker.gen.errors.GenAPIError` subclass, mapped from the status as GEN's are.
"""

from __future__ import annotations

from typing import IO

import requests
import urllib3.exceptions
from pydantic import BaseModel, ConfigDict, Field

from worker.gen.errors import GenTimeout, GenTransportError, status_error_class

#: The largest file GEN's direct upload takes.
DIRECT_UPLOAD_MAX_BYTES = 1024 * 1024 * 1024
#: How much of the storage's answer is echoed into an error message.
_ECHO_CHARS = 200
PUT_ENDPOINT = "direct_upload_put"


class DirectUploadTarget(BaseModel):
    """Where and how to ``PUT`` the bytes (``direct_upload`` in GEN's answer)."""

    model_config = ConfigDict(extra="ignore")

    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)


class DirectUploadBlob(BaseModel):
    """GEN's answer to ``POST /v1/direct_upload``: the blob's signed id and its upload target."""

    model_config = ConfigDict(extra="ignore")

    signed_id: str = Field(min_length=1)
    direct_upload: DirectUploadTarget


def put_blob(
    session: requests.Session,
    target: DirectUploadTarget,
    body: IO[bytes],
    *,
    byte_size: int,
    timeout: tuple[float, float],
) -> None:
    """Stream ``body`` (``byte_size`` bytes, read from its current position) to ``target.url``.

    Raises :class:`GenRejected` (a 4xx other than 401/403/404/429: e.g. 400 ``BadDigest``, the
    bytes do not match the checksum), :class:`GenAuthError` (an expired signature),
    :class:`GenNotFound` - not retryable; :class:`GenServerError`, :class:`GenRateLimited`,
    :class:`GenTransportError`/:class:`GenTimeout` - retryable.
    """
    # Only GEN's headers, and Content-Length so that requests streams the file instead of chunking
    # it (S3 refuses chunked PUTs). No API key: this URL is not GEN's API.
    headers = {**target.headers, "Content-Length": str(byte_size)}
    try:
        response = session.put(
            target.url, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True
        )
    except requests.Timeout:
        raise GenTimeout("the direct upload's PUT timed out", endpoint=PUT_ENDPOINT) from None
    except requests.RequestException as exc:
        raise GenTransportError(
            f"the direct upload's PUT failed: {type(exc).__name__}", endpoint=PUT_ENDPOINT
        ) from None
    with response:
        if 200 <= response.status_code < 300:
            return
        # The start of the answer only (S3 sends a short XML error); the signed URL is not echoed.
        try:
            snippet = response.raw.read(4096, decode_content=True).decode("utf-8", "replace")
        except (OSError, ValueError, requests.RequestException, urllib3.exceptions.HTTPError):
            # an error answer cut short: the status says enough
            snippet = ""
        snippet = snippet[:_ECHO_CHARS].strip()
        raise status_error_class(response.status_code)(
            f"the direct upload's PUT answered HTTP {response.status_code}"
            + (f": {snippet!r}" if snippet else ""),
            status_code=response.status_code,
            endpoint=PUT_ENDPOINT,
        )


__all__ = [
    "DIRECT_UPLOAD_MAX_BYTES",
    "PUT_ENDPOINT",
    "DirectUploadBlob",
    "DirectUploadTarget",
    "put_blob",
]
