import os
import time
from pathlib import Path

from worker.download import remove_abandoned


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
