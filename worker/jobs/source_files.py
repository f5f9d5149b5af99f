"""Downloading a source given by URL, to be uploaded to GEN (:mod:`worker.jobs.uploads`).

The file is streamed into a spooled temporary file: in memory up to the multipart limit (the small,
common case), on disk beyond it, so a source of up to GEN's 1 GiB is never held in memory. Its size
and MD5 (GEN's direct upload wants the checksum up front) are taken on the way. A source that says
(``Content-Length``) or turns out to be over 1 GiB is refused without reading the rest.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import tempfile
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import requests

from worker.gen.direct_upload import DIRECT_UPLOAD_MAX_BYTES
from worker.jobs.errors import JobError
from worker.jobs.resources import Resources
from worker.output.errors import OutputDownloadError, OutputError, OutputInvalid
from worker.output.urlguard import check_url

_CHUNK = 256 * 1024
_FALLBACK_TYPES = {"video": "video/mp4", "audio": "audio/mpeg"}


class SourceTooLarge(JobError):
    """A source URL's file is larger than GEN takes (its direct upload: 1 GiB)."""

    status = "rejected"
    error_code = "source_too_large"


@dataclass
class SourceFile:
    """A downloaded source: its bytes in ``file`` (at position 0), closed (and deleted) on exit."""

    name: str
    content_type: str
    size: int
    #: base64 of the MD5 of the bytes: GEN's blob ``checksum`` and the PUT's ``Content-MD5``.
    md5_base64: str
    file: tempfile.SpooledTemporaryFile[bytes]

    def read_all(self) -> bytes:
        self.file.seek(0)
        data = self.file.read()
        self.file.seek(0)
        return data

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.file.close()


def download_source(url: str, side: str, res: Resources) -> SourceFile:
    """Download ``url`` (the ``side`` source: ``video`` or ``audio``) through the egress session.

    Raises :class:`SourceTooLarge` (over 1 GiB); :class:`OutputDownloadError` (retryable: 5xx, 429,
    a transport error), :class:`OutputInvalid` (not retryable: another status, an empty file) and the
    URL guard's errors.
    """
    s = res.settings
    check_url(url, allow_private=s.allow_private_urls)
    # Closed by the caller (SourceFile), or below on failure: it outlives this function.
    spool = tempfile.SpooledTemporaryFile(max_size=s.gen_multipart_max_bytes, prefix="lipsync-source-")  # noqa: SIM115
    try:
        content_type, size, md5 = _stream_into(spool, url, side, res)
    except BaseException:
        spool.close()
        raise
    if size == 0:
        spool.close()
        raise OutputInvalid(f"the {side} source is empty")
    spool.seek(0)
    if not content_type.startswith(side + "/"):
        content_type = _FALLBACK_TYPES[side]
    name = posixpath.basename(urlsplit(url).path) or side
    return SourceFile(name=name, content_type=content_type, size=size, md5_base64=md5, file=spool)


def _stream_into(
    spool: tempfile.SpooledTemporaryFile[bytes], url: str, side: str, res: Resources
) -> tuple[str, int, str]:
    """(content type, size, base64 MD5) of ``url``'s body, written to ``spool``."""
    s = res.settings
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        timeout = (s.gen_connect_timeout, s.gen_read_timeout)
        with res.http.get(url, stream=True, timeout=timeout, allow_redirects=False) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise OutputDownloadError(f"the {side} source answered HTTP {response.status_code}")
            if response.status_code >= 300:
                # (Redirects are not followed: each hop would need the URL guard.)
                raise OutputInvalid(f"the {side} source answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > DIRECT_UPLOAD_MAX_BYTES:
                raise SourceTooLarge(too_large(side))
            for chunk in response.iter_content(chunk_size=_CHUNK):
                size += len(chunk)
                if size > DIRECT_UPLOAD_MAX_BYTES:
                    raise SourceTooLarge(too_large(side))
                digest.update(chunk)
                spool.write(chunk)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    except OutputError:
        raise
    except requests.RequestException as exc:
        raise OutputDownloadError(f"downloading the {side} source failed: {type(exc).__name__}") from None
    return content_type, size, base64.b64encode(digest.digest()).decode("ascii")


def too_large(side: str) -> str:
    return (
        f"the {side} source is larger than GEN takes ({DIRECT_UPLOAD_MAX_BYTES // 2**30} GiB,"
        " its direct upload's limit)"
    )
