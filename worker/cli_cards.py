"""``lipsync-worker card set|show|list|delete``: a target's Lipsync card (docs/cards.md).

The card is read and written in the job-record Redis directly (no worker needed), through the same
code the ``lipsync.configure_card`` task runs. A card whose callback is a webhook URL (which may
carry a receiver's token) is set from a file (``--json``), never typed on a command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_card_parser(sub: Any) -> None:
    p = sub.add_parser("card", help="set, show, list or delete a target's Lipsync card (docs/cards.md)")
    actions = p.add_subparsers(dest="action", required=True)

    def target_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
        parser.add_argument("--sheet", required=required)
        parser.add_argument("--cell", required=required)
        parser.add_argument("--layer", default=None)

    set_ = actions.add_parser("set", help="store a card (replacing the target's card)")
    target_arguments(set_, required=False)
    set_.add_argument("--json", type=Path, default=None, help="the card as a JSON file (schemas/card.json)")
    set_.add_argument("--model", dest="lip_sync_model", default=None, help="sync_so (or sync.so) or gen")
    set_.add_argument("--auto-generate", action=argparse.BooleanOptionalAction, default=None)
    set_.add_argument("--debounce", dest="debounce_seconds", type=float, default=None)
    set_.add_argument("--callback-task", default=None, help="a Celery task to send the outcomes to")
    set_.add_argument("--callback-queue", default=None)
    set_.add_argument("--metadata", default=None, help="a JSON object passed through to the outcomes")
    show = actions.add_parser(
        "show", help="a card and its target's sources (stale: no output for the latest)"
    )
    target_arguments(show)
    actions.add_parser("list", help="every card, one JSON line each")
    delete = actions.add_parser("delete", help="forget a card and its target's sources")
    target_arguments(delete)
    p.set_defaults(handler=run_card_command)


def run_card_command(args: argparse.Namespace, _: list[str]) -> int:
    from worker.cards import flow
    from worker.cards.models import Target
    from worker.cards.store import CardStore
    from worker.jobs.resources import resources

    res = resources()
    if args.action == "set":
        card = flow.configure(res, _card_from_args(args))
        print(json.dumps(flow.show(res, card.target), indent=2))
        return EXIT_OK
    if args.action == "list":
        for target in CardStore(res.redis).targets():
            print(json.dumps(flow.show(res, target)))
        return EXIT_OK
    target = Target(sheet_id=args.sheet, cell_id=args.cell, layer_id=args.layer)
    if args.action == "delete":
        if not CardStore(res.redis).delete_card(target):
            print(f"error: no card for {target.key}", file=sys.stderr)
            return EXIT_FAILED
        print(f"deleted the card of {target.key}")
        return EXIT_OK
    shown = flow.show(res, target)
    if shown is None:
        print(f"error: no card and no sources for {target.key}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(shown, indent=2))
    return EXIT_OK


def _card_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from worker.errors import RequestInvalid

    card: dict[str, Any] = {}
    if args.json is not None:
        loaded = json.loads(args.json.read_text())
        if not isinstance(loaded, dict):
            raise RequestInvalid([{"field": "card", "message": "must be a JSON object"}])
        card.update(loaded)
    for name, value in (("sheet_id", args.sheet), ("cell_id", args.cell), ("layer_id", args.layer)):
        if value is not None:
            card[name] = value
    for name in ("lip_sync_model", "auto_generate", "debounce_seconds"):
        value = getattr(args, name)
        if value is not None:
            card.pop({"lip_sync_model": "lipSyncModel", "auto_generate": "autoGenerate"}.get(name, ""), None)
            card[name] = value
    if args.callback_task is not None:
        card["callback"] = {"task": args.callback_task, "queue": args.callback_queue}
    if args.metadata is not None:
        try:
            card["metadata"] = json.loads(args.metadata)
        except ValueError:
            raise RequestInvalid([{"field": "metadata", "message": "must be a JSON object"}]) from None
    return card
