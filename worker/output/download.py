"""Stream a remote file to a temp file: capped in size and time, hashed on the way, never buffered.

The caller publishes the temp file (see :mod:`worker.output.storage`); a crash mid-download leaves only a
``.partial`` file behind, never a truncated output under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin

import requests
import urllib3

from worker.output.errors import OutputDownloadError, OutputInvalid, OutputTooLarge
from worker.output.storage import local_disk
from worker.output.urlguard import MAX_REDIRECTS, check_url

CHUNK_SIZE = 256 * 1024

#: Content types accepted as a video. ``application/octet-stream`` is accepted only when the bytes
#: start like an MP4 (an ISO-BMFF ``ftyp`` box), since some CDNs label everything that way.
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size_bytes: int
    sha256: str
    content_type: str
    elapsed: float


@dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int
    total_timeout: float
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    allow_private: bool = False


def download(url: str, *, dest_dir: Path, limits: DownloadLimits, session: requests.Session) -> Downloaded:
    """Download ``url`` into a new temp file in ``dest_dir`` and return what was written.

    Raises:
        OutputDownloadError: transport failure, a short body, a 5xx/429 from the CDN or the overall
            time limit (retryable).
        OutputTooLarge: the body exceeds ``limits.max_bytes`` (announced or counted).
        OutputInvalid: 4xx, or the body is not a video.
        UnsafeURL: the URL, or a redirect, points somewhere we do not connect to.
        HostUnresolved: the URL's host did not resolve just now (retryable).
        StorageError: writing the temp file in ``dest_dir`` failed (disk full, permissions...;
            retryable).
    """
    started = time.monotonic()
    with local_disk(dest_dir):
        dest_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned(dest_dir, older_than=2 * limits.total_timeout)
        fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".partial", dir=dest_dir)
    tmp = Path(tmp_name)
    sink = os.fdopen(fd, "wb")
    try:
        size, digest, content_type = _stream(
            url, sink, dest_dir=dest_dir, limits=limits, session=session, started=started
        )
        with local_disk(dest_dir):
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
    except BaseException:
        # Closing flushes what is buffered, which fails again on a full disk: the error that
        # matters is the one already raised.
        with contextlib.suppress(OSError):
            sink.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return Downloaded(tmp, size, digest, content_type, time.monotonic() - started)


def remove_abandoned(dest_dir: Path, *, older_than: float) -> int:
    """Delete temp files of downloads whose worker died (nobody writes to them any more).

    A live download is never this old: it is cut off at ``total_timeout``.
    """
    cutoff = time.time() - older_than
    removed = 0
    for path in dest_dir.glob(".download-*.partial"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


def _open(url: str, *, limits: DownloadLimits, session: requests.Session) -> requests.Response:
    """GET with redirects followed by hand, so that every hop passes the URL guard."""
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, allow_private=limits.allow_private)
        try:
            response = session.get(
                url,
                stream=True,
                allow_redirects=False,
                timeout=(limits.connect_timeout, limits.read_timeout),
                # Ask for the bytes as stored: decompressing on the fly would let a small gzip
                # body expand past the size cap before we could count it.
                headers={"Accept-Encoding": "identity"},
            )
        except requests.RequestException as exc:
            raise OutputDownloadError(f"download failed: {type(exc).__name__}") from None
        if response.is_redirect:
            location = response.headers.get("Location", "")
            response.close()
            url = urljoin(url, location)
            continue
        return response
    raise OutputInvalid(f"more than {MAX_REDIRECTS} redirects")


def _stream(
    url: str,
    sink: BinaryIO,
    *,
    dest_dir: Path,
    limits: DownloadLimits,
    session: requests.Session,
    started: float,
) -> tuple[int, str, str]:
    with _open(url, limits=limits, session=session) as response:
        _check_status(response)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) > limits.max_bytes:
            raise OutputTooLarge(f"output is {int(announced)} bytes, the limit is {limits.max_bytes}")
        digest = hashlib.sha256()
        size = 0
        head = b""
        while True:
            try:
                # read1: whatever one socket read returns, up to CHUNK_SIZE. read()/stream() would
                # wait for a full chunk, so a body trickling in below the per-read timeout would
                # hold the worker until 256 KiB arrived before the total time limit was looked at.
                chunk = response.raw.read1(CHUNK_SIZE, decode_content=False)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                # Reading ``raw`` directly surfaces urllib3's errors (IncompleteRead on a short
                # body, ProtocolError on a reset) rather than requests' wrappers.
                raise OutputDownloadError(
                    f"download broke off after {size} bytes: {type(exc).__name__}"
                ) from None
            if not chunk:
                break
            size += len(chunk)
            if size > limits.max_bytes:
                raise OutputTooLarge(f"output exceeds the limit of {limits.max_bytes} bytes")
            if len(head) < 16:
                head += chunk[: 16 - len(head)]
            digest.update(chunk)
            # Outside the network's try: a full disk is our storage failing, not the download.
            with local_disk(dest_dir):
                sink.write(chunk)
            if time.monotonic() - started > limits.total_timeout:
                raise OutputDownloadError(f"download took longer than {limits.total_timeout:.0f} s")
    if size == 0:
        raise OutputInvalid("output is empty")
    _check_video(content_type, head)
    return size, digest.hexdigest(), content_type or "video/mp4"


def _check_status(response: requests.Response) -> None:
    status = response.status_code
    if status == 200:
        return
    if status == 429 or status >= 500:
        raise OutputDownloadError(f"output URL answered HTTP {status}")
    raise OutputInvalid(f"output URL answered HTTP {status}")


def _check_video(content_type: str, head: bytes) -> None:
    looks_like_mp4 = len(head) >= 8 and head[4:8] == b"ftyp"
    if content_type.startswith("video/"):
        return
    if (content_type in _GENERIC_TYPES or not content_type) and looks_like_mp4:
        return
    raise OutputInvalid(f"output is not a video (Content-Type {content_type or 'missing'!r})")
