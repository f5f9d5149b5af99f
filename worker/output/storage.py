"""Where finished videos go. The local directory backend is the default.

A backend receives a complete, hashed temp file (see :mod:`worker.output.download`) and publishes it under
the job's name. Publishing is idempotent: a re-run for the same job replaces the file with the same
bytes, so a redelivered fetch step never leaves two copies or a half-written one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from worker.output.errors import OutputInvalid

#: Temp files live beside the outputs, on the same filesystem, so publishing is an atomic rename.
PARTIAL_DIR = ".partial"


@dataclass(frozen=True)
class Published:
    uri: str
    path: str | None


class Storage(Protocol):
    """A place to publish outputs."""

    def staging_dir(self) -> Path:
        """Directory for in-progress downloads (same filesystem as the outputs, where that matters)."""
        ...

    def publish(
        self, job_id: str, tmp_path: Path, *, content_type: str, sha256: str | None = None
    ) -> Published:
        """Move the finished temp file to its final place under the job's name.

        ``sha256`` is the hex digest of the file, when the caller knows it; a backend that keeps
        metadata stores it beside the object. On success the temp file is gone.
        """
        ...


class LocalStorage:
    """Outputs as ``<root>/<job_id>.mp4``, written by atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def staging_dir(self) -> Path:
        return self.root / PARTIAL_DIR

    def final_path(self, job_id: str) -> Path:
        path = (self.root / f"{job_id}.mp4").resolve()
        # Job ids are validated to a safe character set; this is the second lock on the door.
        if path.parent != self.root:
            raise OutputInvalid(f"job id {job_id!r} would escape the storage directory")
        return path

    def publish(
        self, job_id: str, tmp_path: Path, *, content_type: str, sha256: str | None = None
    ) -> Published:
        final = self.final_path(job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
        return Published(uri=final.as_uri(), path=str(final))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
