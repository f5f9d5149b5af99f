import contextlib
import hashlib
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.output.download import (
    CHUNK_SIZE,
    ContentLengthBody,
    DownloadLimits,
    Urllib3Body,
    body_reader,
    download,
    remove_abandoned,
)
from worker.output.errors import OutputDownloadError, OutputTooLarge, StorageError
from worker.retry import is_retryable


def test_abandoned_partial_downloads_are_removed(tmp_path: Path) -> None:
    old = tmp_path / ".download-old.partial"
    fresh = tmp_path / ".download-fresh.partial"
    other = tmp_path / "job-1.mp4"
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    long_ago = time.time() - 3600
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    assert remove_abandoned(tmp_path, older_than=1200) == 1
    assert not old.exists() and fresh.exists() and other.exists()


class _Trickle(BaseHTTPRequestHandler):
    """An MP4 of 60 KiB, 1 KiB every 0.2 s: every read is quick, the whole body takes 12 s."""

    def do_GET(self) -> None:
        body = b"\x00\x00\x00\x18ftypmp42" + b"x" * (60 * 1024)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 1024):
                self.wfile.write(body[start : start + 1024])
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def trickle_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out.mp4"
    server.shutdown()
    server.server_close()


def test_a_trickling_body_is_cut_off_at_the_total_time_limit(tmp_path: Path, trickle_url: str) -> None:
    limits = DownloadLimits(max_bytes=10**9, total_timeout=1.0, read_timeout=5.0, allow_private=True)
    started = time.monotonic()
    with pytest.raises(OutputDownloadError, match="longer than 1 s"), requests.Session() as session:
        download(trickle_url, dest_dir=tmp_path, limits=limits, session=session)
    # Cut off within a read or two of the limit, not after the 12 s body (or a 256 KiB chunk).
    assert time.monotonic() - started < 6
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".mp4"]


class _Video(BaseHTTPRequestHandler):
    """An MP4 of 200 KiB, at once."""

    def do_GET(self) -> None:
        body = b"\x00\x00\x00\x18ftypmp42" + b"v" * (200 * 1024)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client gave up
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def video_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Video)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out.mp4"
    server.shutdown()
    server.server_close()


@pytest.fixture
def small_file_size_limit() -> Iterator[int]:
    """This process may grow no file beyond 64 KiB (RLIMIT_FSIZE): a write past it fails with EFBIG,
    a real OSError of the write path that root gets too (as it would ENOSPC on a full disk)."""
    limit = 64 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Without this the kernel kills the process (SIGXFSZ) instead of failing the write.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_the_disk_refuses_is_a_storage_error_not_a_broken_download(
    tmp_path: Path, video_url: str, small_file_size_limit: int
) -> None:
    limits = DownloadLimits(max_bytes=10**9, total_timeout=10.0, allow_private=True)
    with pytest.raises(StorageError) as info, requests.Session() as session:
        download(video_url, dest_dir=tmp_path, limits=limits, session=session)
    exc = info.value
    assert is_retryable(exc)
    assert str(tmp_path) in str(exc) and "File too large" in str(exc)
    assert list(tmp_path.iterdir()) == [], "the temp file is removed"


def test_a_staging_directory_that_cannot_be_made_is_a_storage_error(tmp_path: Path, video_url: str) -> None:
    (tmp_path / "file").write_bytes(b"x")
    dest = tmp_path / "file" / ".partial"
    limits = DownloadLimits(max_bytes=10**9, total_timeout=10.0, allow_private=True)
    with pytest.raises(StorageError, match="Not a directory") as info, requests.Session() as session:
        download(video_url, dest_dir=dest, limits=limits, session=session)
    assert is_retryable(info.value) and str(dest) in str(info.value)


# --------------------------------------------------------------------------------------------
# bodies of every size and framing, whole or broken
# --------------------------------------------------------------------------------------------


def _body(size: int) -> bytes:
    """``size`` bytes starting like an MP4, the rest pseudo-random (seeded by the size)."""
    head = b"\x00\x00\x00\x18ftypmp42"
    return (head + random.Random(size).randbytes(max(0, size - len(head))))[:size]


class _Bodies(BaseHTTPRequestHandler):
    """``GET /<framing>/<size>``: ``len`` (Content-Length), ``chunked``, or either cut off halfway
    (``short``, ``chunked-short``: the connection closes after half the body)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        _, framing, size_text = self.path.split("/")
        body = _body(int(size_text))
        sent = body[: len(body) // 2] if framing.endswith("short") else body
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        with contextlib.suppress(OSError):  # the client gave up
            if framing.startswith("chunked"):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(sent), 7777):
                    piece = sent[start : start + 7777]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                if sent == body:
                    self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(sent)
        self.close_connection = sent != body

    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # a client that gave up mid-body
            super().handle()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def bodies_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bodies)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _download_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("download-")]


LIMITS = DownloadLimits(max_bytes=10**9, total_timeout=60.0, allow_private=True)
#: Around the direct I/O alignment, one buffer, and several buffers plus a partial block.
SIZES = (1, 16, 4095, 4096, 4097, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 4097)


@pytest.mark.parametrize("framing", ["len", "chunked"])
@pytest.mark.parametrize("size", SIZES)
def test_the_file_and_its_sha256_are_the_body_whatever_its_size_and_framing(
    tmp_path: Path, bodies_url: str, framing: str, size: int
) -> None:
    with requests.Session() as session:
        got = download(f"{bodies_url}/{framing}/{size}", dest_dir=tmp_path, limits=LIMITS, session=session)
    body = _body(size)
    assert got.size_bytes == size
    assert got.path.read_bytes() == body
    assert got.sha256 == hashlib.sha256(body).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [got.path.name]
    assert _download_threads() == []


def test_a_body_with_a_length_is_received_straight_into_the_buffers(bodies_url: str) -> None:
    """The fast path reaches into urllib3 and http.client (``raw._fp.fp``): if an upgrade moves them,
    this fails instead of every download silently taking the slower path."""
    with requests.Session() as session:
        with session.get(f"{bodies_url}/len/100", stream=True, timeout=5) as response:
            assert isinstance(body_reader(response), ContentLengthBody)
        with session.get(f"{bodies_url}/chunked/100", stream=True, timeout=5) as response:
            assert isinstance(body_reader(response), Urllib3Body)


@pytest.mark.parametrize("framing", ["short", "chunked-short"])
def test_a_body_that_ends_early_is_a_broken_download_and_leaves_no_file(
    tmp_path: Path, bodies_url: str, framing: str
) -> None:
    size = 3 * CHUNK_SIZE + 4097
    with pytest.raises(OutputDownloadError) as info, requests.Session() as session:
        download(f"{bodies_url}/{framing}/{size}", dest_dir=tmp_path, limits=LIMITS, session=session)
    assert f"broke off after {size // 2} bytes" in str(info.value)
    assert is_retryable(info.value)
    assert list(tmp_path.iterdir()) == []
    assert _download_threads() == []


def test_an_announced_length_over_the_limit_is_refused_before_the_body(
    tmp_path: Path, bodies_url: str
) -> None:
    limits = DownloadLimits(max_bytes=100_000, total_timeout=60.0, allow_private=True)
    with pytest.raises(OutputTooLarge, match="is 300000 bytes"), requests.Session() as session:
        download(f"{bodies_url}/len/300000", dest_dir=tmp_path, limits=limits, session=session)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("limit", [100_000, CHUNK_SIZE, 2 * CHUNK_SIZE + 1])
def test_a_body_without_a_length_is_counted_against_the_limit(
    tmp_path: Path, bodies_url: str, limit: int
) -> None:
    limits = DownloadLimits(max_bytes=limit, total_timeout=60.0, allow_private=True)
    with requests.Session() as session:
        with pytest.raises(OutputTooLarge, match="exceeds the limit"):
            download(f"{bodies_url}/chunked/{limit + 1}", dest_dir=tmp_path, limits=limits, session=session)
        assert list(tmp_path.iterdir()) == []
        assert _download_threads() == []
        exactly = download(f"{bodies_url}/chunked/{limit}", dest_dir=tmp_path, limits=limits, session=session)
    assert exactly.size_bytes == limit
