"""``lipsync-worker card …`` as a user runs it (a subprocess) against a real Redis, no worker."""

from __future__ import annotations

import json

from tests.unit.test_cli import one_line_error, run_cli
from worker.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE

TARGET = ("--sheet", "101", "--cell", "3000", "--layer", "4000")


def test_a_card_is_set_listed_shown_and_deleted(redis_url: str) -> None:
    env = {"LIPSYNC_BROKER_URL": redis_url}
    done = run_cli(
        "card", "set", *TARGET, "--model", "sync.so", "--auto-generate", "--debounce", "2", env=env
    )
    assert done.returncode == EXIT_OK, done.stderr
    card = json.loads(done.stdout)["card"]
    assert (card["lip_sync_model"], card["auto_generate"], card["debounce_seconds"]) == ("sync_so", True, 2.0)
    listed = run_cli("card", "list", env=env)
    assert [json.loads(line)["target"] for line in listed.stdout.splitlines()] == ["101.3000.4000"]
    shown = json.loads(run_cli("card", "show", *TARGET, env=env).stdout)
    assert shown["state"]["stale"] is False and shown["card"]["has_callback"] is False
    assert run_cli("card", "delete", *TARGET, env=env).returncode == EXIT_OK
    gone = run_cli("card", "show", *TARGET, env=env)
    assert gone.returncode == EXIT_FAILED
    assert "no card" in one_line_error(gone)


def test_a_card_with_an_unknown_model_is_refused_in_one_line_naming_the_field(redis_url: str) -> None:
    done = run_cli("card", "set", *TARGET, "--model", "wav2lip", env={"LIPSYNC_BROKER_URL": redis_url})
    assert done.returncode == EXIT_USAGE
    assert "lip_sync_model" in one_line_error(done)
