"""The lipsync-worker command: run workers and the GEN simulator; submit, inspect and cancel jobs.

Every error is one line on stderr, with one of these exit codes (the README lists them too):

  0  done (the job completed)
  1  the job failed, or the job / webhook named does not exist
  2  bad input (the field is named)
  3  submit --wait timed out; the job is still running
  4  Redis (the broker or the job records) unreachable
  78 worker: refused to start, its configuration cannot work (GEN key or agent missing or refused);
     the line names the setting. It waits, instead, while GEN is unreachable
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.cli_cards import add_card_parser
from worker.errors import LipsyncJobFailed, RequestInvalid

#: Exit codes: done; the job failed or what was named does not exist; bad input; a ``--wait`` ran
#: out of time while the job goes on; Redis (broker or job records) unreachable; interrupted.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STILL_RUNNING, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("worker", "metrics"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = args.handler
    try:
        return int(handler(args, extra))
    except RequestInvalid as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # the one place a Redis outage becomes one line
        if not _is_connection_error(exc):
            raise
        print(f"error: cannot reach Redis ({_redis_urls()}): {_one_line(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _is_connection_error(exc: BaseException) -> bool:
    import kombu.exceptions
    import redis

    seen: BaseException | None = exc
    while seen is not None:  # Celery wraps the broker's error in its own
        if isinstance(seen, redis.ConnectionError | redis.TimeoutError | kombu.exceptions.OperationalError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _redis_urls() -> str:
    """The Redis URLs in use, passwords masked."""
    from kombu.utils.url import sanitize_url

    from worker.settings import get_settings

    s = get_settings()
    urls = {"broker": s.broker_url, "job records": s.effective_redis_url}
    if urls["broker"] == urls["job records"]:
        return f"broker and job records at {sanitize_url(s.broker_url)}"
    return ", ".join(f"{name} at {sanitize_url(url)}" for name, url in urls.items())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipsync-worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run a Celery worker (extra arguments go to 'celery worker')")
    p.add_argument("-c", "--concurrency", type=int, default=None)
    p.add_argument("-Q", "--queues", default=None, help="comma-separated queues (default: all three)")
    p.add_argument("-l", "--loglevel", default="INFO")
    p.set_defaults(handler=_cmd_worker)

    p = sub.add_parser("simulator", help="run the GEN API simulator (an HTTP server)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument(
        "--api-key", default=None, help="key to require (default: LIPSYNC_GEN_API_KEY or 'sim-key')"
    )
    p.add_argument(
        "--agent-id", default=None, help="agent id to accept (default: LIPSYNC_GEN_AGENT_ID or 42)"
    )
    p.add_argument("--gen-seconds", type=float, default=3.0)
    p.add_argument("--sync-so-seconds", type=float, default=6.0)
    p.set_defaults(handler=_cmd_simulator)

    p = sub.add_parser("submit", help="enqueue one job (and optionally wait for it)")
    p.add_argument("--json", dest="json_file", help="request JSON file, or - for stdin")
    p.add_argument("--batch", dest="batch_file", help="a batch: one request per line (JSON Lines), or -")
    p.add_argument("--batch-id", help="with --batch: the batch id (default: generated)")
    p.add_argument("--max-parallel", type=int, help="with --batch: items in flight at once")
    p.add_argument("--sheet", dest="sheet_id")
    p.add_argument("--cell", dest="cell_id")
    p.add_argument("--layer", dest="layer_id")
    p.add_argument("--video", dest="video_resource_id")
    p.add_argument("--audio", dest="audio_resource_id")
    p.add_argument("--model", choices=["sync_so", "gen"])
    p.add_argument("--job-id")
    p.add_argument("--callback-task")
    p.add_argument("--callback-queue")
    p.add_argument("--webhook-url")
    p.add_argument("--metadata", help="JSON object passed through to the result (the batch's, with --batch)")
    p.add_argument("--wait", action="store_true", help="wait, showing progress, and print the result")
    p.add_argument("--timeout", type=float, default=3600)
    p.set_defaults(handler=_cmd_submit)

    p = sub.add_parser("status", help="print a job's (or a batch's) record and Celery state as JSON")
    p.add_argument("job_id", help="a job id, or a batch id")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("cancel", help="cancel a job, or every unfinished item of a batch (stopped on GEN)")
    p.add_argument("job_id", help="a job id, or a batch id")
    p.add_argument("--reason", default="cancelled by request")
    p.set_defaults(handler=_cmd_cancel)

    p = sub.add_parser("callbacks", help="list dead-lettered webhooks, or replay them")
    p.add_argument("action", nargs="?", choices=["list", "replay"], default="list")
    p.add_argument("msg_ids", nargs="*", help="webhook ids to replay (default with --all: every one)")
    p.add_argument("--all", action="store_true", help="replay every dead-lettered webhook")
    p.set_defaults(handler=_cmd_callbacks)

    p = sub.add_parser("sweep", help="re-drive overdue jobs once (workers do this by themselves)")
    p.set_defaults(handler=_cmd_sweep)

    # add_help=False: --help and every option go to worker.ops.metrics's own parser.
    p = sub.add_parser("metrics", help="serve Prometheus metrics (--host, --port...)", add_help=False)
    p.set_defaults(handler=_cmd_metrics)

    p = sub.add_parser(
        "events", help="receive GEN's agent events and poll the jobs they name now (docs/events.md)"
    )
    p.add_argument("--host", default=None, help="address to listen on (default: LIPSYNC_EVENTS_HOST)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default: LIPSYNC_EVENTS_PORT)")
    p.set_defaults(handler=_cmd_events)

    p = sub.add_parser("gen-webhook", help="point GEN's agent events at `lipsync-worker events`, test, show")
    hook = p.add_subparsers(dest="action", required=True)
    register = hook.add_parser(
        "register",
        help="set the agent's webhook_url on GEN to the receiver's URL",
        description="URL: the receiver's public address. Without a /gen-events/<token> path the token is "
        "added from LIPSYNC_EVENTS_TOKEN (so it stays out of your shell history); with one, it must be "
        "that token. The token is masked in everything printed.",
    )
    register.add_argument("url")
    hook.add_parser("test", help="ask GEN to post a test event to the registered URL (exit 1: it failed)")
    hook.add_parser("show", help="print the agent's automation config on GEN (tokens masked)")
    hook.add_parser("clear", help="set the agent's webhook_url to null: GEN stops sending events")
    p.set_defaults(handler=_cmd_gen_webhook)

    p = sub.add_parser(
        "health", help="exit 0 when the broker and job-record Redis answer and GEN accepts the key and agent"
    )
    p.set_defaults(handler=_cmd_health)

    add_card_parser(sub)

    p = sub.add_parser("schema", help="write the JSON Schemas of the request, result, failure and events")
    p.add_argument("--out", type=Path, default=Path("docs/schemas"))
    p.set_defaults(handler=_cmd_schema)

    p = sub.add_parser("demo", help="run a few jobs end to end on an embedded Redis and the simulator")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: LIPSYNC_STORAGE_DIR)")
    p.set_defaults(handler=_cmd_demo)
    return parser


# --------------------------------------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    from worker.app import app
    from worker.names import ALL_QUEUES

    argv = ["worker", "-l", args.loglevel, "-Q", args.queues or ",".join(ALL_QUEUES)]
    if args.concurrency:
        argv += ["-c", str(args.concurrency)]
    app.worker_main(argv + extra)
    return 0


def _cmd_simulator(args: argparse.Namespace, _: list[str]) -> int:
    from gensim import serve

    api_key = args.api_key or os.environ.get("LIPSYNC_GEN_API_KEY") or "sim-key"
    agent = args.agent_id or os.environ.get("LIPSYNC_GEN_AGENT_ID") or "42"

    class Announce(io.StringIO):
        """The simulator writes its base URL first (stdout, for programs that start it); people
        get, on stderr, the environment that points a worker at it."""

        line = ""

        def write(self, text: str) -> int:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.line += text
            if "\n" in self.line:
                url, self.line = self.line.split("\n", 1)
                if url.startswith("http"):
                    print(simulator_environment(url.strip(), api_key, agent), file=sys.stderr, flush=True)
            return len(text)

    serve(
        args.host,
        args.port,
        out=Announce(),
        api_key=api_key,
        agent_ids=(agent,),
        durations={"gen": args.gen_seconds, "sync_so": args.sync_so_seconds},
    )
    return 0


def simulator_environment(base_url: str, api_key: str, agent: str) -> str:
    """What to paste into the shell of a worker (and of `lipsync-worker submit`) to use a simulator."""
    return "\n".join(
        [
            f"GEN simulator listening on {base_url}. Point a worker at it with:",
            f"  export LIPSYNC_GEN_BASE_URL={base_url}",
            f"  export LIPSYNC_GEN_API_KEY={api_key}",
            f"  export LIPSYNC_GEN_AGENT_ID={agent}",
            "  export LIPSYNC_ALLOW_PRIVATE_URLS=true   # its outputs are served from this loopback address",
            "Seeded: sheet 101, cells 3000-3099 (layer = cell + 1000), videos 5001-5099, audios 6001-6099.",
        ]
    )


def _cmd_submit(args: argparse.Namespace, _: list[str]) -> int:
    from worker.app import app
    from worker.enqueue import enqueue

    if args.batch_file:
        return _submit_batch(args)
    request = _request_from_args(args)
    result = enqueue(request, app=app)
    print(f"enqueued job {result.id}", file=sys.stderr)
    if not args.wait:
        print(json.dumps({"job_id": result.id}))
        return 0
    return _wait_and_print(result, timeout=args.timeout)


def _submit_batch(args: argparse.Namespace) -> int:
    from worker.cli_batches import read_items, submit_batch

    # The job options describe the batch: its id, its callback and its metadata.
    batch = _request_from_args(argparse.Namespace(**{**vars(args), "json_file": None}))
    batch = {k: v for k, v in batch.items() if k in ("callback", "metadata")}
    batch["items"] = read_items(args.batch_file)
    if args.batch_id:
        batch["batch_id"] = args.batch_id
    if args.max_parallel is not None:
        batch["max_parallel"] = args.max_parallel
    return submit_batch(batch, wait=args.wait, timeout=args.timeout)


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.json_file:
        text = sys.stdin.read() if args.json_file == "-" else Path(args.json_file).read_text()
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise RequestInvalid([{"field": "request", "message": "must be a JSON object"}])
        return loaded
    request: dict[str, Any] = {}
    for name in (
        "job_id",
        "sheet_id",
        "cell_id",
        "layer_id",
        "video_resource_id",
        "audio_resource_id",
        "model",
    ):
        value = getattr(args, name)
        if value is not None:
            request[name] = value
    callback: dict[str, Any] = {}
    if args.callback_task:
        callback["task"] = args.callback_task
    if args.callback_queue:
        callback["queue"] = args.callback_queue
    if args.webhook_url:
        callback["webhook_url"] = args.webhook_url
    if callback:
        request["callback"] = callback
    if args.metadata:
        request["metadata"] = json.loads(args.metadata)
    return request


def _wait_and_print(result: Any, *, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last = ""
    while not result.ready() and time.monotonic() < deadline:
        line = _progress_line(result)
        if line != last:
            print(line, file=sys.stderr)
            last = line
        time.sleep(0.25)
    if not result.ready():
        print(
            f"job {result.id} still running after {timeout:g} s; see `lipsync-worker status {result.id}`",
            file=sys.stderr,
        )
        return EXIT_STILL_RUNNING
    try:
        outcome = result.get(timeout=5)
    except LipsyncJobFailed as exc:
        print(json.dumps(exc.failure, indent=2))
        return EXIT_FAILED
    print(json.dumps(outcome, indent=2))
    return EXIT_OK


def _progress_line(result: Any) -> str:
    info = result.info if isinstance(result.info, dict) else {}
    gen = f" generation {info['generation_id']}" if info.get("generation_id") else ""
    status = f" (GEN: {info['gen_status']}, {info.get('polls', 0)} polls)" if info.get("gen_status") else ""
    return f"  {result.id}: {result.state}{gen}{status}"


def _cmd_status(args: argparse.Namespace, _: list[str]) -> int:
    from worker.app import app
    from worker.callbacks.delivery import MESSAGE_KINDS, message_id
    from worker.cli_batches import print_batch_status
    from worker.enqueue import job_status
    from worker.jobs.resources import resources
    from worker.names import Stage

    if (code := print_batch_status(args.job_id)) is not None:
        return code
    res = resources()
    record = job_status(args.job_id)
    waiting = _waiting(res, args.job_id) if record is None or record.state == Stage.QUEUED else None
    if record is None and waiting is None:
        print(
            f"error: no job {args.job_id!r} (never enqueued here, or expired after LIPSYNC_RESULT_TTL)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    celery = app.AsyncResult(args.job_id)
    info = celery.info if isinstance(celery.info, dict) else None
    owed = [res.outbox.pending(message_id(args.job_id, kind)) for kind in MESSAGE_KINDS]
    print(
        json.dumps(
            {
                "job": record.model_dump(mode="json") if record else None,
                # Where its message waits, when it waits in a queue.
                "waiting": waiting,
                "celery": {"state": celery.state, "info": info},
                # Webhooks not delivered yet (in an attempt, or waiting for the next one).
                "webhooks_pending": [entry for entry in owed if entry is not None],
            },
            indent=2,
        )
    )
    return EXIT_OK


def _waiting(res: Any, job_id: str) -> dict[str, Any] | None:
    from worker.names import ALL_QUEUES
    from worker.ops.misrouted import FIX_HINT, find_message

    broker = res.broker_redis
    found = find_message(broker, job_id, res.settings.misroute_queues) if broker is not None else None
    if found is None:
        return None
    waiting: dict[str, Any] = {"queue": found.queue, "position": found.position, "task": found.task}
    if found.queue not in ALL_QUEUES:
        waiting["problem"] = (
            f"queue {found.queue!r} is not consumed by lipsync workers; a running worker moves it to its "
            f"own queue at its next sweep. Fix the producer: {FIX_HINT}"
        )
    return waiting


def _cmd_cancel(args: argparse.Namespace, _: list[str]) -> int:
    from worker.cli_batches import cancel_batch
    from worker.enqueue import cancel

    if (code := cancel_batch(args.job_id, reason=args.reason)) is not None:
        return code
    outcome = cancel(args.job_id, reason=args.reason)
    if outcome is None:
        print(f"error: no job {args.job_id!r}", file=sys.stderr)
        return 1
    print(json.dumps(outcome, indent=2))
    return 0


def _cmd_callbacks(args: argparse.Namespace, _: list[str]) -> int:
    from worker.app import app
    from worker.callbacks.delivery import replay_dead_letters
    from worker.celery_queue import CeleryQueue
    from worker.jobs.resources import resources

    res = resources()
    if args.action == "list":
        for entry in res.outbox.dead_letters():
            summary = {k: entry[k] for k in ("msg_id", "url", "error", "attempts")}
            print(json.dumps(summary))
        return 0
    if not args.msg_ids and not args.all:
        print("error: name webhook ids to replay, or pass --all", file=sys.stderr)
        return 2
    wanted = None if args.all else set(args.msg_ids)
    replayed = replay_dead_letters(
        CeleryQueue(app), res.outbox, wanted, queued_recovery=res.settings.queued_recovery
    )
    for msg_id in replayed:
        print(f"replaying {msg_id}")
    unknown = sorted((wanted or set()) - set(replayed))
    for msg_id in unknown:
        print(
            f"error: no dead-lettered webhook {msg_id!r} (see `lipsync-worker callbacks list`)",
            file=sys.stderr,
        )
    if args.all and not replayed:
        print("no dead-lettered webhooks to replay", file=sys.stderr)
    return EXIT_FAILED if unknown or not replayed else EXIT_OK


def _cmd_sweep(args: argparse.Namespace, _: list[str]) -> int:
    from worker.app import app
    from worker.celery_queue import CeleryQueue
    from worker.jobs.resources import resources
    from worker.jobs.sweeper import sweep_round

    # An operator asking for a pass has seen the fleet: a silent worker is taken for dead.
    report = sweep_round(CeleryQueue(app), resources(), trust_silence=True)
    print(json.dumps(report.__dict__))
    return 0


def _cmd_metrics(args: argparse.Namespace, extra: list[str]) -> int:
    from worker.ops.metrics import main as metrics_main

    return metrics_main(extra)


def _events_token() -> str | None:
    from worker.settings import get_settings

    token = get_settings().events_token
    return token.get_secret_value() if token is not None else None


def _cmd_events(args: argparse.Namespace, _: list[str]) -> int:
    import logging

    from worker.app import app
    from worker.celery_queue import CeleryQueue
    from worker.events.receiver import EventReceiver, serve
    from worker.events.tokens import BadToken, check_token
    from worker.jobs.resources import resources
    from worker.settings import get_settings

    settings = get_settings()
    try:
        token = check_token(_events_token())
    except BadToken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    receiver = EventReceiver(CeleryQueue(app), resources(), token=token, max_body=settings.events_max_body)
    host = args.host if args.host is not None else settings.events_host
    port = args.port if args.port is not None else settings.events_port
    try:
        serve(receiver, host, port)
    except OSError as exc:  # the port is taken, the host does not resolve
        print(f"error: the event receiver could not listen on {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_gen_webhook(args: argparse.Namespace, _: list[str]) -> int:
    from worker.errors import ConfigurationError
    from worker.events.tokens import mask_text
    from worker.gen.client import GenClient
    from worker.gen.errors import GenAPIError
    from worker.settings import get_settings

    token = _events_token()
    try:
        client = GenClient.from_settings(get_settings())
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with client:
        try:
            if args.action == "register":
                return _register_webhook(client, args.url, token)
            if args.action == "test":
                return _test_webhook(client, token)
            answer = (
                client.set_event_webhook(None) if args.action == "clear" else client.get_automation_config()
            )
        except GenAPIError as exc:
            print(f"error: GEN answered: {mask_text(str(exc), token)}", file=sys.stderr)
            return EXIT_FAILED
    print(_masked_json(answer, token))
    return EXIT_OK


def _register_webhook(client: Any, url: str, token: str | None) -> int:
    """Check the URL is the receiver's (its token ours), set it on GEN, print what GEN answered."""
    import hmac

    from worker.events.tokens import BadToken, check_token, mask_url, receiver_url, token_in

    carried = token_in(url)
    try:
        if carried is None:
            url = receiver_url(url, check_token(token))
        elif token is not None and not hmac.compare_digest(carried.encode(), token.encode()):
            print(
                f"error: {mask_url(url)} carries a token that is not LIPSYNC_EVENTS_TOKEN: "
                "the receiver would refuse every event",
                file=sys.stderr,
            )
            return EXIT_USAGE
        else:
            check_token(carried)
    except BadToken as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not url.startswith(("https://", "http://")):
        print(f"error: {mask_url(url)} is not an http(s) URL", file=sys.stderr)
        return EXIT_USAGE
    if url.startswith("http://"):
        print(
            "warning: an http:// URL sends the token in clear; use https:// outside a test", file=sys.stderr
        )
    answer = client.set_event_webhook(url)
    print(f"GEN will post agent {client.agent_id}'s events to {mask_url(url)}", file=sys.stderr)
    print(_masked_json(answer, token or carried))
    return EXIT_OK


def _test_webhook(client: Any, token: str | None) -> int:
    answer = client.test_event_webhook()
    print(_masked_json(answer, token))
    if answer.get("success") is True:
        print("GEN reached the receiver", file=sys.stderr)
        return EXIT_OK
    from worker.events.tokens import mask_text

    error = mask_text(str(answer.get("error") or "no reason given"), token)
    print(f"error: GEN could not reach the receiver: {error}", file=sys.stderr)
    return EXIT_FAILED


def _masked_json(document: Any, token: str | None) -> str:
    """GEN's answer as JSON, with the receiver's token masked wherever it appears."""
    from worker.events.tokens import mask_text

    return mask_text(json.dumps(document, indent=2), token)


def _cmd_health(args: argparse.Namespace, _: list[str]) -> int:
    import redis

    from worker.errors import ConfigurationError
    from worker.preflight import cached_check, check_gen_now, require_gen_settings
    from worker.settings import get_settings

    settings = get_settings()
    # This process's own settings first: a verdict on another worker's key says nothing about these.
    try:
        require_gen_settings(settings)
    except ConfigurationError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    clients = {}
    for name, url in (("broker", settings.broker_url), ("job records", settings.effective_redis_url)):
        try:
            clients[name] = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
            clients[name].ping()
        except redis.RedisError as exc:
            print(f"unhealthy: {name} Redis does not answer: {type(exc).__name__}", file=sys.stderr)
            return EXIT_FAILED
    # GEN's verdict on this process's base URL, key and agent, as the last check of the same
    # configuration left it (cached a few minutes, per configuration).
    records = clients["job records"]
    check = cached_check(records, settings) or check_gen_now(settings, records)
    if not check.ok and not check.detail.startswith("GEN unreachable"):
        print(f"unhealthy: {check.detail}", file=sys.stderr)
        return EXIT_FAILED
    # GEN being down is not this worker's fault: restarting it would not help (it waits and retries).
    print("ok" if check.ok else f"ok (degraded: {check.detail})")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace, _: list[str]) -> int:
    from worker.jobs.schemas import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace, _: list[str]) -> int:
    from worker.dev.demo import run_demo

    return run_demo(jobs=args.jobs, out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
