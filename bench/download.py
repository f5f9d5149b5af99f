"""The output download against curl: MiB/s of each, side by side, and the download's memory growth.

One file of ``--size-mb`` MiB (an MP4 ``ftyp`` box, then random bytes) is served from a small threaded
HTTP server on loopback that sends it with ``sendfile`` from the page cache, so the server is not what
limits either client (the run first prints what curl reaches writing to ``/dev/null``). Each round
times, in alternating order:

(a) ``curl -sS -o FILE URL`` (curl's own ``time_total``), and
(b) ``worker.output.download.download`` in a fresh Python process, with the worker's real session
    and limits (``Resources``; ``LIPSYNC_ALLOW_PRIVATE_URLS=true``, since the server is on loopback):
    from the request to the temp file hashed, written and fsynced. That process reports its peak RSS
    growth over the download (``VmHWM`` after, against ``VmRSS`` before, the peak reset first).

Both write into ``--dir``; dirty pages are flushed (``sync``) before each measurement so that one
client's writeback does not run during the other's. Every downloaded file is checked (size, and the
worker's sha256 against the source's). The figures are the median over the rounds with the range;
the ratio is taken round by round (worker / curl). The simulator's CDN is not used: it builds each
output in memory per request (``gensim.media.build_mp4``), which would count the same seconds of
building into both clients' times.

    .venv/bin/python -m bench.download [--rounds 3] [--size-mb 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
#: An ISO-BMFF ``ftyp`` box (what ffmpeg writes for H.264 MP4): the worker accepts the body as a video.
FTYP = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
TARGET_RATIO = 0.8
TARGET_RSS_MIB = 64.0


# ---------------------------------------------------------------------------------------------
# the file and its server
# ---------------------------------------------------------------------------------------------


def write_source(path: Path, size: int) -> str:
    """Write ``size`` bytes starting like an MP4; return their sha256."""
    digest = hashlib.sha256()
    block = os.urandom(16 * MIB)
    with path.open("wb") as out:
        written = 0
        while written < size:
            piece = (FTYP + block)[: size - written] if written == 0 else block[: size - written]
            out.write(piece)
            digest.update(piece)
            written += len(piece)
    return digest.hexdigest()


class _SendFile(BaseHTTPRequestHandler):
    """``GET`` any path: the one file, ``video/mp4``, with its length, sent by the kernel."""

    protocol_version = "HTTP/1.1"
    source: Path

    def do_GET(self) -> None:
        with self.source.open("rb") as body:
            size = os.fstat(body.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            try:
                self.connection.sendfile(body)
            except OSError:
                self.close_connection = True  # the client gave up

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(source: Path) -> Iterator[str]:
    """Serve ``source`` on a free loopback port; yield its URL."""
    handler = type("SendSource", (_SendFile,), {"source": source})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/output.mp4"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ---------------------------------------------------------------------------------------------
# the two clients
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    seconds: float
    size: int
    #: CPU time (user + system, every thread) the client spent on the transfer.
    cpu_seconds: float
    rss_growth_mib: float | None = None

    @property
    def mib_s(self) -> float:
        return self.size / MIB / self.seconds


def curl(url: str, out: str) -> Measured:
    """``curl -sS -o out url``, timed by curl itself (request to last byte written)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        ["curl", "-sS", "-o", out, "-w", "%{time_total} %{size_download}", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    seconds, size = done.stdout.split()
    return Measured(
        float(seconds), int(size), cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN), before)
    )


def worker_download(url: str, dest_dir: Path, *, expect_sha256: str) -> Measured:
    """The worker's download in a fresh process (see :func:`child`); checks what it wrote."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.download", "--child", url, "--dir", str(dest_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the download process failed:\n{done.stderr}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["sha256"] != expect_sha256:
        raise RuntimeError(f"the worker's sha256 {report['sha256']} is not the source's {expect_sha256}")
    return Measured(report["seconds"], report["size"], report["cpu_seconds"], report["rss_growth_kib"] / 1024)


def child(url: str, dest_dir: Path) -> int:
    """In the fresh process: one download with the worker's session and limits; print a JSON line."""
    from worker.jobs.resources import Resources
    from worker.output.download import download
    from worker.settings import Settings

    res = Resources(Settings.from_environ({"LIPSYNC_ALLOW_PRIVATE_URLS": "true"}))
    session, limits = res.http, res.download_limits
    reset_peak_rss()
    before = proc_status_kib("VmRSS")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    downloaded = download(url, dest_dir=dest_dir, limits=limits, session=session)
    seconds = time.monotonic() - started
    cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF), usage)
    peak = proc_status_kib("VmHWM")
    on_disk = downloaded.path.stat().st_size
    downloaded.path.unlink()
    if on_disk != downloaded.size_bytes:
        raise RuntimeError(f"{on_disk} bytes on disk, {downloaded.size_bytes} downloaded")
    report = {
        "seconds": seconds,
        "size": downloaded.size_bytes,
        "sha256": downloaded.sha256,
        "rss_growth_kib": peak - before,
        "cpu_seconds": cpu,
    }
    print(json.dumps(report))
    return 0


def cpu_seconds(after: resource.struct_rusage, before: resource.struct_rusage) -> float:
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux: ``clear_refs`` value 5), so the peak
    read afterwards is the download's, not the imports'."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# rounds and figures
# ---------------------------------------------------------------------------------------------


def load_average() -> str:
    """The 1, 5 and 15 minute load averages. curl needs one core, the worker's download two (one
    receives, one hashes): on a small shared machine, other load weighs on the ratio."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def spread(values: Sequence[float], fmt: str) -> str:
    return f"median {statistics.median(values):{fmt}} (range {min(values):{fmt}}-{max(values):{fmt}})"


def measure(args: argparse.Namespace, workdir: Path) -> int:
    load_at_start = load_average()
    size = args.size_mb * MIB
    source = workdir / "source.mp4"
    print(f"writing a {args.size_mb} MiB source file in {workdir} ...", flush=True)
    expect = write_source(source, size)
    has_curl = shutil.which("curl") is not None
    if not has_curl:
        print("curl is not installed: no reference, the worker's figures alone (no ratio)")
    staging = workdir / "staging"
    curl_out = workdir / "curl.out"
    curls: list[Measured] = []
    ours: list[Measured] = []
    with serve(source) as url:
        if has_curl:
            ceiling = curl(url, "/dev/null")
            print(f"server: {ceiling.mib_s:.0f} MiB/s with curl -o /dev/null (the ceiling of this server)")
        for round_no in range(1, args.rounds + 1):
            order = ("curl", "worker") if round_no % 2 else ("worker", "curl")
            for client in order:
                if client == "curl" and not has_curl:
                    continue
                os.sync()  # the previous client's dirty pages are written back before this one starts
                if client == "curl":
                    got = curl(url, str(curl_out))
                    if got.size != size or curl_out.stat().st_size != size:
                        raise RuntimeError(f"curl wrote {curl_out.stat().st_size} bytes, not {size}")
                    curl_out.unlink()
                    curls.append(got)
                else:
                    ours.append(worker_download(url, staging, expect_sha256=expect))
            line = f"round {round_no} ({' then '.join(order)}):"
            if has_curl:
                line += f" curl {curls[-1].mib_s:6.0f} MiB/s,"
            line += f" worker {ours[-1].mib_s:6.0f} MiB/s"
            if has_curl:
                line += f", ratio {ours[-1].mib_s / curls[-1].mib_s:.2f}"
            print(f"{line}, worker RSS growth {ours[-1].rss_growth_mib:.1f} MiB", flush=True)
    print()
    print(
        f"{args.size_mb} MiB over loopback, {args.rounds} rounds, {os.cpu_count()} cores, files in {workdir}"
    )
    print(f"load average: {load_at_start} at the start, {load_average()} at the end (1, 5, 15 min)")
    if has_curl:
        print(f"curl -o FILE          {spread([m.mib_s for m in curls], '.0f')} MiB/s")
    print(f"worker download       {spread([m.mib_s for m in ours], '.0f')} MiB/s (sha256 + fsync included)")
    if has_curl:
        ratios = [o.mib_s / c.mib_s for o, c in zip(ours, curls, strict=True)]
        print(f"ratio worker / curl   {spread(ratios, '.2f')}   target >= {TARGET_RATIO}")
    gib = size / 1024**3
    if has_curl:
        print(f"curl CPU per GiB      {spread([m.cpu_seconds / gib for m in curls], '.2f')} s")
    print(
        f"worker CPU per GiB    {spread([m.cpu_seconds / gib for m in ours], '.2f')} s (receive, hash, write)"
    )
    growth = [m.rss_growth_mib or 0.0 for m in ours]
    print(f"worker RSS growth     {spread(growth, '.1f')} MiB   target <= {TARGET_RSS_MIB:.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.download",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the file, in MiB")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the files go (default: a new temporary directory)"
    )
    # The measured process of (b): python -m bench.download --child URL --dir DIR
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.dir)
    if args.rounds < 1 or args.size_mb < 1:
        parser.error("--rounds and --size-mb must be at least 1")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lipsync-bench-download-", dir=args.dir) as tmp:
        return measure(args, Path(tmp))


if __name__ == "__main__":
    raise SystemExit(main())
