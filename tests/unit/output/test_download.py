import contextlib
import os
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

from worker.output.download import DownloadLimits, download, remove_abandoned
from worker.output.errors import OutputDownloadError, StorageError
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
