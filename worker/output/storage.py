"""Where finished videos go. The local directory backend is the default.

A backend receives a complete, hashed temp file (see :mod:`worker.output.download`) and publishes it under
the job's name. Publishing is idempotent: a re-run for the same job replaces the file with the same
bytes, so a redelivered fetch step never leaves two copies or a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from worker.output.errors import OutputInvalid, StorageError

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


@contextlib.contextmanager
def local_disk(directory: Path) -> Iterator[None]:
    """Turn an ``OSError`` of the local filesystem (disk full, permissions, a failed fsync, a file
    where a directory should be) into a retryable :class:`StorageError` naming ``directory``.

    Such a failure often heals (space is freed, a volume is remounted) and the video is paid for:
    retry with the step's bounded backoff rather than end the job on the first one. Wrap only
    local file operations: a network error is an ``OSError`` too.
    """
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        name = errno.errorcode.get(exc.errno) if exc.errno is not None else None
        detail = f"{reason} ({name})" if name else reason
        raise StorageError(f"local storage failed in {directory}: {detail}") from exc


class LocalStorage:
    """Outputs as ``<root>/<job_id>.mp4``, written by atomic rename."""

    def __init__(self, root: Path, *, file_mode: int = 0o644) -> None:
        self.root = root.resolve()
        #: Temp files are created ``0600`` (mkstemp): the published file gets this mode instead.
        self.file_mode = file_mode

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
        try:
            with local_disk(final.parent):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp_path, self.file_mode)
                os.replace(tmp_path, final)
                _fsync_dir(final.parent)
        except StorageError:
            # As the S3 backend does: the retry downloads again, so no temp file may pile up.
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)
            raise
        return Published(uri=final.as_uri(), path=str(final))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable, not only the file's bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
