"""``python -m gensim``: run the GEN simulator in the foreground.

Prints the base URL as the first line of stdout (so ``--port 0`` is usable from scripts), then
serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from gensim.runner import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gensim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8700, help="port to bind; 0 picks a free one (default 8700)"
    )
    parser.add_argument(
        "--api-key", default="sim-key", help="the API key clients must send (default sim-key)"
    )
    parser.add_argument(
        "--agent-id",
        action="append",
        dest="agent_ids",
        metavar="ID",
        help="a known agent id; repeatable (default 42)",
    )
    parser.add_argument(
        "--gen-seconds", type=float, default=3.0, help="duration of a 'gen' lipsync (default 3)"
    )
    parser.add_argument(
        "--sync-so-seconds", type=float, default=6.0, help="duration of a 'sync_so' lipsync (default 6)"
    )
    parser.add_argument(
        "--strict-dialect",
        action="store_true",
        help="accept the old body only under /v1/autocontentengine and the new one only under /v1/vidsheet",
    )
    parser.add_argument(
        "--output-size", type=int, default=48_000, help="bytes of each output MP4 (default 48000)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    serve(
        args.host,
        args.port,
        api_key=args.api_key,
        agent_ids=tuple(args.agent_ids or ["42"]),
        durations={"gen": args.gen_seconds, "sync_so": args.sync_so_seconds},
        strict_dialect=args.strict_dialect,
        output_size=args.output_size,
    )


if __name__ == "__main__":
    main()
