"""The download's pipeline on its own: buffers filled here, hashed and written on two threads."""

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.output.download import HashingFileWriter
from worker.output.errors import StorageError

CHUNK = 8192


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("download-")]


@pytest.fixture
def out(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "out.partial"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    yield path, fd
    os.close(fd)


def _feed(writer: HashingFileWriter, data: bytes, *, rng: random.Random, whole: bool) -> str:
    """Submit ``data`` through the writer's buffers: each buffer full (as a download fills them),
    or, unless ``whole``, filled to a random length (partial buffers mid-stream)."""
    at = 0
    while at < len(data):
        buffer = writer.buffer()
        n = len(buffer) if whole else rng.randint(1, len(buffer))
        piece = data[at : at + n]
        buffer[: len(piece)] = piece
        writer.submit(buffer, len(piece))
        at += len(piece)
    return writer.finish()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
@pytest.mark.parametrize("whole", [True, False], ids=["full-buffers", "partial-buffers"])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, CHUNK, 5 * CHUNK + 1, 200_003])
def test_the_file_and_the_digest_are_the_bytes_submitted_in_order(
    tmp_path: Path, out: tuple[Path, int], direct: bool, whole: bool, size: int
) -> None:
    path, fd = out
    rng = random.Random(size)
    data = rng.randbytes(size)
    with HashingFileWriter(fd, dest_dir=tmp_path, buffers=3, chunk_size=CHUNK, direct=direct) as writer:
        digest = _feed(writer, data, rng=rng, whole=whole)
    assert path.read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert _threads() == []


def test_through_the_page_cache_past_the_writeback_step(tmp_path: Path, out: tuple[Path, int]) -> None:
    path, fd = out
    rng = random.Random(9)
    data = rng.randbytes(9 * 1024 * 1024 + 17)
    with HashingFileWriter(fd, dest_dir=tmp_path, direct=False) as writer:
        digest = _feed(writer, data, rng=rng, whole=True)
    assert digest == hashlib.sha256(data).hexdigest()
    assert path.read_bytes() == data


class _HashThatBreaks:
    """A hash object whose third update fails, as a hash thread's error would reach the caller."""

    def __init__(self) -> None:
        self.updates = 0

    def update(self, data: memoryview, /) -> None:
        self.updates += 1
        if self.updates == 3:
            raise RuntimeError("hash broke")

    def hexdigest(self) -> str:
        return "never"


def test_an_error_of_the_hashing_thread_is_raised_to_the_caller(
    tmp_path: Path, out: tuple[Path, int]
) -> None:
    path, fd = out
    data = bytes(100 * CHUNK)
    with (
        pytest.raises(RuntimeError, match="hash broke"),
        HashingFileWriter(
            fd, dest_dir=tmp_path, buffers=2, chunk_size=CHUNK, digest=_HashThatBreaks
        ) as writer,
    ):
        # Raised at a later buffer() (the caller would otherwise wait for one forever) or at finish().
        _feed(writer, data, rng=random.Random(1), whole=True)
    assert _threads() == []
    # Nothing is written past the failure: the two buffers hashed before it at most.
    assert path.stat().st_size <= 2 * CHUNK


def test_an_error_of_the_writing_thread_is_a_storage_error_raised_to_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "read-only"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every write fails (EBADF), a real error of the write path
    try:
        with (
            pytest.raises(StorageError, match="Bad file descriptor") as info,
            HashingFileWriter(fd, dest_dir=tmp_path, buffers=2, chunk_size=CHUNK) as writer,
        ):
            _feed(writer, bytes(100 * CHUNK), rng=random.Random(2), whole=True)
    finally:
        os.close(fd)
    assert str(tmp_path) in str(info.value)
    assert _threads() == []


def test_leaving_early_stops_both_threads(tmp_path: Path, out: tuple[Path, int]) -> None:
    path, fd = out
    with (
        pytest.raises(KeyboardInterrupt),
        HashingFileWriter(fd, dest_dir=tmp_path, chunk_size=CHUNK) as writer,
    ):
        for _ in range(5):
            buffer = writer.buffer()
            writer.submit(buffer, len(buffer))
        raise KeyboardInterrupt  # as a soft time limit or a too-large body leaves the download
    assert _threads() == []
    size = path.stat().st_size
    assert size <= 5 * CHUNK and size % CHUNK == 0
