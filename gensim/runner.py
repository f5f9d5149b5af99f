"""The simulator as an object (:class:`GenSimulator`, for tests) and as a process (:func:`serve`)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType, TracebackType
from typing import Any, TextIO

from gensim.events import validate_event_delay, validate_event_loss
from gensim.faults import Fault, FaultBook
from gensim.server import SimContext, SimHTTPServer
from gensim.state import NO_FACE_REASON, SimState, validate_durations
from gensim.stats import Stats


class GenSimulator:
    """A GEN API simulator serving HTTP on a background daemon thread.

    >>> with GenSimulator(durations={"gen": 0.5}) as sim:   # doctest: +SKIP
    ...     requests.get(f"{sim.base_url}/v1/generations/1", headers={"X-API-Key": "sim-key"})
    """

    def __init__(
        self,
        api_key: str = "sim-key",
        agent_ids: Iterable[str | int] = ("42",),
        durations: Mapping[str, float] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        strict_dialect: bool = False,
        output_size: int = 48_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` drives the generations' lifecycle (seconds; only differences matter): tests of
        the worker's steps pass a clock they move by hand, so pending -> processing -> completed
        takes no real time."""
        self.host = host
        self.port = port
        stats = Stats()
        state = SimState(
            stats=stats,
            agent_ids=agent_ids,
            durations=durations,
            strict_dialect=strict_dialect,
            output_size=output_size,
            clock=clock,
        )
        self._ctx = SimContext(state=state, faults=FaultBook(), stats=stats, api_key=api_key)
        self._server: SimHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> GenSimulator:
        """Bind and serve in a daemon thread; returns self. With port 0 the OS picks a free port."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._ctx.stopping.clear()
        server = SimHTTPServer((self.host, self.port), self._ctx)
        self.port = server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._ctx.state.base_url = f"http://{host}:{self.port}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"gen-simulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        self._ctx.state.events.start()
        return self

    def stop(self) -> None:
        """Stop serving, disconnect every client, and join the server thread. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._ctx.stopping.set()  # cuts delay/trickle faults short
        self._ctx.state.events.stop()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> GenSimulator:
        return self.start() if self._server is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` without a trailing slash; available once started."""
        if not self._ctx.state.base_url:
            raise RuntimeError("simulator not started")
        return self._ctx.state.base_url

    # ------------------------------------------------------------------ steering

    def add_fault(self, fault: Fault) -> Fault:
        return self._ctx.faults.add(fault)

    def clear_faults(self) -> None:
        self._ctx.faults.clear()

    def faults(self) -> list[dict[str, Any]]:
        """The armed faults with their remaining uses."""
        return self._ctx.faults.snapshot()

    def fail_next(self, n: int = 1, reason: str = NO_FACE_REASON) -> None:
        """The next ``n`` generations created will end ``failed`` with ``reason``."""
        self._ctx.state.fail_next(n, reason)

    def set_sources(
        self,
        sheet_id: int | str,
        cell_id: int | str,
        layer_id: int | str | None = None,
        *,
        video: int | str | None = None,
        audio: int | str | None = None,
    ) -> dict[str, Any]:
        """Change the sources of a cell's (or its layer's) Lipsync card: a resource id or a URL per
        side; a side not given keeps its value (also ``POST /_sim/sources``). Returns the cell or
        layer as GEN's ``GET`` answers it."""
        return self._ctx.state.set_sources(
            sheet=str(sheet_id),
            cell=str(cell_id),
            layer=None if layer_id is None else str(layer_id),
            video=None if video is None else str(video),
            audio=None if audio is None else str(audio),
        )

    def direct_uploads(self) -> list[dict[str, Any]]:
        """The blobs of ``POST /v1/direct_upload``, oldest first, each with the headers of every
        ``PUT`` its upload URL received (``puts``) and whether its bytes arrived (``uploaded``)."""
        return self._ctx.uploads.snapshot()

    def uploaded(self, resource_id: int | str) -> bytes:
        """The bytes uploaded to ``POST /v1/content_resources`` as ``resource_id`` (KeyError if none)."""
        return self._ctx.state.uploaded(str(resource_id))

    def reset(self) -> None:
        """Forget generations, keys, faults, pending failures, cell edits and stats; keep the world."""
        self._ctx.reset()

    @property
    def output_size(self) -> int:
        return self._ctx.state.output_size

    @output_size.setter
    def output_size(self, size: int) -> None:
        """Size of the output MP4 of generations created from now on."""
        self._ctx.state.output_size = size

    @property
    def durations(self) -> dict[str, float]:
        return dict(self._ctx.state.durations)

    @durations.setter
    def durations(self, durations: Mapping[str, float]) -> None:
        """Model durations (seconds) for generations created or continued from now on."""
        self._ctx.state.durations = validate_durations({**self._ctx.state.durations, **durations})

    @property
    def duration_sampler(self) -> Callable[[str], float] | None:
        return self._ctx.state.duration_sampler

    @duration_sampler.setter
    def duration_sampler(self, sampler: Callable[[str], float] | None) -> None:
        """Draw each new generation's duration from ``sampler(model)`` (seconds) instead of the
        fixed ``durations`` (None: back to them). Called under the simulator's lock: keep it quick."""
        self._ctx.state.duration_sampler = sampler

    @property
    def event_delay(self) -> float:
        return self._ctx.state.events.delay

    @event_delay.setter
    def event_delay(self, seconds: float) -> None:
        """Seconds between a generation's status change and the event GEN posts about it."""
        self._ctx.state.events.delay = validate_event_delay(seconds)

    @property
    def event_loss(self) -> float:
        return self._ctx.state.events.loss

    @event_loss.setter
    def event_loss(self, rate: float) -> None:
        """Probability that an event is never sent (GEN documents no delivery guarantee)."""
        self._ctx.state.events.loss = validate_event_loss(rate)

    def seed_events(self, seed: int | None) -> None:
        """Make which events are lost reproducible (None: unpredictable again)."""
        self._ctx.state.events.seed(seed)

    @property
    def strict_dialect(self) -> bool:
        return self._ctx.state.strict_dialect

    @strict_dialect.setter
    def strict_dialect(self, strict: bool) -> None:
        self._ctx.state.strict_dialect = strict

    # ------------------------------------------------------------------ inspection

    def stats(self) -> dict[str, Any]:
        return self._ctx.stats_snapshot()

    def generation(self, gen_id: int | str) -> dict[str, Any]:
        """Everything about one generation (its API view plus model, key, target, stopped_by_api...)."""
        return self._ctx.state.snapshot(gen_id)

    def output_bytes(self, gen_id: int | str) -> bytes:
        """Exactly the bytes the CDN serves (or will serve, once completed) for this generation."""
        return self._ctx.state.output_bytes(gen_id)


def serve(host: str = "127.0.0.1", port: int = 8700, *, out: TextIO | None = None, **kwargs: Any) -> None:
    """Run a simulator in the foreground until SIGINT/SIGTERM (or Ctrl-C).

    The first line written to ``out`` (stdout by default) is the base URL, so a parent process can
    start it with ``--port 0`` and read where it listens. ``kwargs`` go to :class:`GenSimulator`.
    """
    stream = out if out is not None else sys.stdout
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    with GenSimulator(host=host, port=port, **kwargs) as sim:
        previous: dict[signal.Signals, Any] = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:
            pass  # not the main thread: the caller stops us some other way (e.g. KeyboardInterrupt)
        print(sim.base_url, file=stream, flush=True)
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
