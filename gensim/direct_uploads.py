"""GEN's direct upload, simulated: the blobs of ``POST /v1/direct_upload`` and the ``PUT`` of their bytes.

Step 1 (:meth:`DirectUploads.create`) checks the blob and hands out a signed id and an upload URL on
the simulator's own server (``/storage/direct_uploads/{key}``, no API key, as S3's presigned URLs
take none). Step 2 (:meth:`DirectUploads.put`) checks what S3 would: the signed headers
(``Content-Type``, ``Content-MD5``), the byte count and the bytes' MD5. Step 3 (the server's
``POST /v1/content_resources`` with a JSON signed id) takes the bytes with :meth:`DirectUploads.take`
and makes them a content resource. Every PUT's headers are kept, for tests to check what reached it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from gensim.state import ApiError

#: GEN's limit for a direct upload.
MAX_BYTE_SIZE = 1024 * 1024 * 1024
STORAGE_PATH = "/storage/direct_uploads/"


@dataclass
class Blob:
    key: str
    signed_id: str
    filename: str
    byte_size: int
    checksum: str
    content_type: str
    data: bytes | None = None
    #: The headers of each PUT received for this blob (names as sent).
    puts: list[dict[str, str]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "signed_id": self.signed_id,
            "filename": self.filename,
            "byte_size": self.byte_size,
            "checksum": self.checksum,
            "content_type": self.content_type,
            "uploaded": self.data is not None,
            "puts": [dict(h) for h in self.puts],
        }


class DirectUploads:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blobs: dict[str, Blob] = {}

    def clear(self) -> None:
        with self._lock:
            self._blobs.clear()

    def create(self, body: object, base_url: str) -> dict[str, Any]:
        """``POST /v1/direct_upload``: ``{"blob": {filename, byte_size, checksum, content_type}}``."""
        blob = body.get("blob") if isinstance(body, dict) else None
        if not isinstance(blob, dict):
            raise ApiError(422, "validation_error", "blob is missing")
        filename, size, checksum, content_type = (
            blob.get(k) for k in ("filename", "byte_size", "checksum", "content_type")
        )
        if not isinstance(filename, str) or not filename:
            raise ApiError(422, "validation_error", "blob[filename] is missing")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ApiError(422, "validation_error", "blob[byte_size] must be a positive integer")
        if not isinstance(checksum, str) or not _is_md5_base64(checksum):
            raise ApiError(422, "validation_error", "blob[checksum] must be the base64 of an MD5")
        if not isinstance(content_type, str) or content_type.split("/", 1)[0] not in ("video", "audio"):
            raise ApiError(
                422, "invalid_content_type", f"Unsupported content type {str(content_type)[:50]!r}"
            )
        if size > MAX_BYTE_SIZE:
            raise ApiError(422, "file_size_exceeded", "Files are limited to 1 GB")
        key = secrets.token_hex(8)
        made = Blob(key, f"sim-signed-{key}", filename, size, checksum, content_type)
        with self._lock:
            self._blobs[key] = made
        return {
            "id": len(self._blobs),
            "key": key,
            "filename": filename,
            "content_type": content_type,
            "byte_size": size,
            "checksum": checksum,
            "signed_id": made.signed_id,
            "direct_upload": {
                "url": f"{base_url}{STORAGE_PATH}{key}?X-Sim-Signature={secrets.token_hex(8)}",
                "headers": {"Content-Type": content_type, "Content-MD5": checksum},
            },
        }

    def put(self, key: str, headers: dict[str, str], data: bytes) -> None:
        """The ``PUT`` to a blob's upload URL: 404 unknown key, 403 a header that differs from the
        signed one, 400 a byte count or MD5 that does not match the blob (S3's ``BadDigest``)."""
        with self._lock:
            blob = self._blobs.get(key)
            if blob is None:
                raise ApiError(404, "not_found", "No such upload")
            blob.puts.append(dict(headers))
            sent = {name.lower(): value for name, value in headers.items()}
            if sent.get("content-type") != blob.content_type:
                raise ApiError(403, "signature_does_not_match", "Content-Type differs from the signed one")
            if sent.get("content-md5") != blob.checksum:
                raise ApiError(400, "bad_digest", "Content-MD5 differs from the blob's checksum")
            if len(data) != blob.byte_size:
                raise ApiError(400, "incomplete_body", f"Expected {blob.byte_size} bytes, got {len(data)}")
            if base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode() != blob.checksum:
                raise ApiError(400, "bad_digest", "The bytes do not match Content-MD5")
            blob.data = data

    def take(self, signed_id: object) -> Blob:
        """The uploaded blob a ``content_resource[file]`` signed id names (422 ``direct_upload_failed``
        when it names none, or its bytes never arrived)."""
        with self._lock:
            for blob in self._blobs.values():
                if blob.signed_id == signed_id and blob.data is not None:
                    return blob
        raise ApiError(422, "direct_upload_failed", "The direct upload is unknown or incomplete")

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [b.view() for b in self._blobs.values()]


def _is_md5_base64(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
