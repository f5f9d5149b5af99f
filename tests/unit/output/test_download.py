import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.output.download import DownloadLimits, download, remove_abandoned
from worker.output.errors import OutputDownloadError


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
