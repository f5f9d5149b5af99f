"""Stream a remote file to a temp file: capped in size and time, hashed on the way, never held in memory.

The caller publishes the temp file (see :mod:`worker.output.storage`); a crash mid-download leaves only a
``.partial`` file behind, never a truncated output under the final name.

Where the time goes, for a large output on a fast link: SHA-256 (about 1.2 GiB/s on one core with
SHA-NI), copying the bytes into the page cache, and the ``fsync`` that then waits for them to reach the
disk. Done one after the other, in 256 KiB reads, they ran at half of what ``curl -o`` does. So the
download is a pipeline over a few reusable buffers (:class:`HashingFileWriter`, 8 MiB in all): this
thread receives into one buffer while a second thread hashes the previous one and a third writes the
one before it. The writes bypass the page cache where the filesystem allows (``O_DIRECT``), or else
ask the kernel to start writing back as they go, so the final ``fsync`` has little left to wait for.
SHA-256 on one core is then the ceiling. ``python -m bench.download`` measures it against curl.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import io
import mmap
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol
from urllib.parse import urljoin

import requests
import urllib3

from worker.output.errors import OutputDownloadError, OutputInvalid, OutputTooLarge
from worker.output.storage import local_disk
from worker.output.urlguard import MAX_REDIRECTS, check_url

#: One buffer of the pipeline, and one write to the file (a multiple of the direct I/O alignment).
CHUNK_SIZE = 1024 * 1024
#: Buffers in flight between receiving, hashing and writing: the memory a download holds.
BUFFERS = 8
#: ``O_DIRECT`` wants the buffer address, the length and the file offset aligned to the device's
#: logical block size; a page covers every common one. A write it still refuses goes through the
#: page cache instead.
_DIRECT_ALIGNMENT = 4096
#: Through the page cache, ask the kernel to write back every this many bytes.
_WRITEBACK_STEP = 8 * 1024 * 1024

#: Content types accepted as a video. ``application/octet-stream`` is accepted only when the bytes
#: start like an MP4 (an ISO-BMFF ``ftyp`` box), since some CDNs label everything that way.
_GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream")

#: What reading a response body raises when the transfer breaks: urllib3's errors (IncompleteRead on a
#: short body, ProtocolError on a reset), http.client's, and the socket's own (timeouts, resets, TLS).
_TRANSFER_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


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
    open_fd: int | None = fd
    try:
        size, digest, content_type = _stream(
            url, fd, dest_dir=dest_dir, limits=limits, session=session, started=started
        )
        with local_disk(dest_dir):
            os.fsync(fd)
            open_fd = None  # closed even when close() reports an error: never close it twice
            os.close(fd)
    except BaseException:
        if open_fd is not None:
            with contextlib.suppress(OSError):
                os.close(open_fd)
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
    fd: int,
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
        body = body_reader(response)
        with HashingFileWriter(fd, dest_dir=dest_dir) as writer:
            size, head = _receive(body, writer, limits=limits, deadline=started + limits.total_timeout)
            digest = writer.finish()
    if size == 0:
        raise OutputInvalid("output is empty")
    _check_video(content_type, head)
    return size, digest, content_type or "video/mp4"


def _receive(
    body: BodyReader, writer: HashingFileWriter, *, limits: DownloadLimits, deadline: float
) -> tuple[int, bytes]:
    """Fill the writer's buffers from ``body`` until it ends; return the size and the first 16 bytes.

    The size cap and the time limit are checked after every read: a read is one socket read (bounded
    by the read timeout), so a body trickling in just fast enough is cut off at the limit, not when a
    buffer is full.
    """
    size = 0
    head = b""
    while True:
        buffer = writer.buffer()
        filled = 0
        ended = False
        while filled < len(buffer):
            try:
                got = body.readinto(buffer[filled:])
            except _TRANSFER_ERRORS as exc:
                raise OutputDownloadError(
                    f"download broke off after {size + filled} bytes: {type(exc).__name__}"
                ) from None
            if not got:
                ended = True
                break
            filled += got
            if size + filled > limits.max_bytes:
                raise OutputTooLarge(f"output exceeds the limit of {limits.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise OutputDownloadError(f"download took longer than {limits.total_timeout:.0f} s")
        if len(head) < 16:
            head += bytes(buffer[: min(filled, 16 - len(head))])
        writer.submit(buffer, filled)
        size += filled
        if ended:
            return size, head


class BodyReader(Protocol):
    def readinto(self, buffer: memoryview) -> int:
        """Read at most ``len(buffer)`` bytes of the body into ``buffer`` with at most one socket
        read; 0 at the end of the body. Raises on a transfer error or a short body."""
        ...


def body_reader(response: requests.Response) -> BodyReader:
    """The fastest reader for this response's body, as bytes were sent (no content decoding)."""
    raw = response.raw
    inner = getattr(raw, "_fp", None)
    if (
        isinstance(inner, http.client.HTTPResponse)
        and not inner.chunked
        and inner.length is not None
        and isinstance(inner.fp, io.BufferedReader)
        and raw.tell() == 0
    ):
        return ContentLengthBody(inner.fp, inner.length)
    return Urllib3Body(raw)


class ContentLengthBody:
    """A body of ``Content-Length`` bytes, read from the connection straight into our buffers.

    urllib3 and http.client would hand out every read as a new ``bytes`` object, which we would then
    copy into a buffer; here ``readinto1`` receives into the buffer itself. Counting the body against
    its length is then ours to do, as http.client would: a connection that ends before it is a short
    body, never a complete one. Only for a body not read from yet (the socket file's buffer may
    already hold its first bytes, which ``readinto1`` returns first).
    """

    def __init__(self, socket_file: io.BufferedReader, length: int) -> None:
        self._socket_file = socket_file
        self.remaining = length

    def readinto(self, buffer: memoryview) -> int:
        if self.remaining == 0:
            return 0
        if len(buffer) > self.remaining:
            buffer = buffer[: self.remaining]
        got = self._socket_file.readinto1(buffer)
        if not got:
            raise http.client.IncompleteRead(b"", self.remaining)
        self.remaining -= got
        return got


class Urllib3Body:
    """Any other body (chunked, or without a length), read through urllib3, which checks it."""

    def __init__(self, raw: urllib3.BaseHTTPResponse) -> None:
        self._raw = raw

    def readinto(self, buffer: memoryview) -> int:
        # read1: whatever one socket read returns. read() would wait for a full buffer.
        chunk = self._raw.read1(len(buffer), decode_content=False)
        buffer[: len(chunk)] = chunk
        return len(chunk)


class Digest(Protocol):
    """What :class:`HashingFileWriter` needs of a hash object (``hashlib.sha256()`` is one)."""

    def update(self, data: memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class HashingFileWriter:
    """Hash and append filled buffers to a file on two threads, in order, while the caller fills more.

    The caller takes a free buffer (:meth:`buffer`), fills it and hands it over (:meth:`submit`); the
    hashing thread passes it on to the writing thread, which makes it free again. A failure on either
    thread (a full disk...) is raised to the caller at its next :meth:`buffer` or at :meth:`finish`.
    Leaving the ``with`` block without :meth:`finish` stops both threads (they skip what is queued)
    and waits for them: no thread outlives the download or touches the file after it.
    """

    def __init__(
        self,
        fd: int,
        *,
        dest_dir: Path,
        buffers: int = BUFFERS,
        chunk_size: int = CHUNK_SIZE,
        direct: bool = True,
        digest: Callable[[], Digest] = hashlib.sha256,
    ) -> None:
        """``direct``: try O_DIRECT (else the page cache only); ``digest``: makes the hash object."""
        self._file = _FileAppender(fd, direct=direct)
        self._dest_dir = dest_dir
        self._hash = digest()
        # One anonymous mapping: page-aligned, as O_DIRECT needs, and returned to the system at the end.
        self._memory = mmap.mmap(-1, buffers * chunk_size)
        whole = memoryview(self._memory)
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        for i in range(buffers):
            self._free.put(whole[i * chunk_size : (i + 1) * chunk_size])
        self._to_hash: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()
        self._stopping = False
        self._finished = False
        self._threads = [
            threading.Thread(target=self._hash_stage, name="download-hash", daemon=True),
            threading.Thread(target=self._write_stage, name="download-write", daemon=True),
        ]
        try:
            for thread in self._threads:
                thread.start()
        except BaseException:
            self._stopping = True
            self._join()  # the one that started, if any
            raise

    @property
    def direct(self) -> bool:
        """Whether the file is (still) written with O_DIRECT."""
        return self._file.direct

    def buffer(self) -> memoryview:
        """A free buffer to fill; waits while all of them are being hashed or written."""
        buffer = self._free.get()
        if buffer is None:
            assert self._failure is not None
            raise self._failure
        return buffer

    def submit(self, buffer: memoryview, filled: int) -> None:
        """Hash and write the first ``filled`` bytes of ``buffer`` (which the caller must not touch
        until :meth:`buffer` hands it out again)."""
        self._to_hash.put((buffer, filled))

    def finish(self) -> str:
        """Wait until everything submitted is hashed and written; return the hex digest."""
        self._finished = True
        self._join()
        if self._failure is not None:
            raise self._failure
        return self._hash.hexdigest()

    def __enter__(self) -> HashingFileWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._finished:
            self._stopping = True
            self._join()

    def _join(self) -> None:
        # The hashing thread passes the end on to the writing thread.
        self._to_hash.put(None)
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()

    def _fail(self, exc: BaseException) -> None:
        with self._failure_lock:
            if self._failure is not None:
                return
            self._failure = exc
        self._free.put(None)  # wakes the caller waiting for a buffer

    def _hash_stage(self) -> None:
        try:
            while (item := self._to_hash.get()) is not None:
                if not (self._stopping or self._failure):
                    buffer, filled = item
                    self._hash.update(buffer[:filled])
                self._to_write.put(item)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            self._fail(exc)
        finally:
            self._to_write.put(None)

    def _write_stage(self) -> None:
        try:
            while (item := self._to_write.get()) is not None:
                if not (self._stopping or self._failure):
                    buffer, filled = item
                    with local_disk(self._dest_dir):
                        self._file.append(buffer[:filled])
                self._free.put(item[0])
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            self._fail(exc)


class _FileAppender:
    """Appends to a file with O_DIRECT while the writes allow it, else through the page cache.

    With O_DIRECT the bytes go from our buffer to the disk: no copy into the page cache and no dirty
    pages left for the final ``fsync``. Filesystems without it (tmpfs on older kernels, some network
    filesystems) refuse the flag, and the last, partial block of a file cannot be written that way:
    both go through the page cache, where every few MiB we ask the kernel to start writing back (and
    to drop what it has written: a download's bytes are not read again soon).
    """

    def __init__(self, fd: int, *, direct: bool) -> None:
        self._fd = fd
        self._offset = 0
        self._written_back = 0
        self.direct = direct and _set_direct(fd, on=True)

    def append(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            if self.direct and ((len(data) - done) % _DIRECT_ALIGNMENT or self._offset % _DIRECT_ALIGNMENT):
                self._leave_direct()
            try:
                written = os.write(self._fd, data[done:])
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._leave_direct()  # the filesystem took the flag but not this write
                continue
            done += written
            self._offset += written
        if not self.direct and self._offset - self._written_back >= _WRITEBACK_STEP:
            _start_writeback(self._fd, self._written_back, self._offset - self._written_back)
            self._written_back = self._offset

    def _leave_direct(self) -> None:
        _set_direct(self._fd, on=False)
        self.direct = False


def _set_direct(fd: int, *, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; False if this system or filesystem refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        if on:
            return False
        raise
    return True


def _start_writeback(fd: int, offset: int, length: int) -> None:
    # POSIX_FADV_DONTNEED starts writeback of the dirty pages in the range without waiting for it,
    # and drops the pages already clean.
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


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
