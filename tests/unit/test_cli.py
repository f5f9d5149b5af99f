"""The lipsync-worker command's answers to the mistakes people make, run as a user runs it (a
subprocess), against a real Redis and no worker: one line on stderr, a documented exit code, no
traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from gensim import GenSimulator
from tests.conftest import REPO
from tests.unit.conftest import AGENT_ID, API_KEY, unit_settings
from worker.cli import EXIT_FAILED, EXIT_STILL_RUNNING, EXIT_UNREACHABLE
from worker.dev.embedded_redis import free_port
from worker.errors import ConfigurationError
from worker.preflight import EXIT_CONFIG, preflight

CLI = [sys.executable, "-m", "worker.cli"]


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    return subprocess.run(
        [*CLI, *args], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_every_command_and_the_exit_codes() -> None:
    done = run_cli("--help", env={})
    assert done.returncode == 0
    readme = (REPO / "README.md").read_text()
    # The README's command list (Running it > CLI) is what users read: --help must list the same.
    cli_block = re.search(r"### CLI\n\n```\n(.*?)```", readme, re.S)
    assert cli_block is not None
    documented = set(re.findall(r"^lipsync-worker ([\w-]+)", cli_block.group(1), re.MULTILINE))
    listed = re.search(r"^\s+\{([\w,-]+)\}\s*$", done.stdout, re.MULTILINE)
    assert listed is not None
    assert set(listed.group(1).split(",")) == documented
    for name in documented:
        assert re.search(rf"^\s+{name}\s+\S", done.stdout, re.MULTILINE), f"{name} missing from --help"
    # The exit codes: the same in --help as in the README's list.
    errors = readme.split("Errors are one line on stderr", 1)[1].split("\n\n", 1)[0]
    readme_codes = set(re.findall(r"`(\d+)` ", errors))
    help_codes = set(re.findall(r"^  (\d+) +\w", done.stdout, re.MULTILINE))
    assert readme_codes == help_codes
    assert {"0", "1", "2", "3", "4", str(EXIT_CONFIG)} <= help_codes


def test_an_unreachable_redis_is_one_line_naming_the_url_without_its_password() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"
    for args in (
        ("status", "j1"),
        ("submit", "--sheet", "1", "--cell", "2", "--video", "3", "--audio", "4"),
        ("callbacks", "list"),
        ("cancel", "j1"),
    ):
        done = run_cli(*args, env={"LIPSYNC_BROKER_URL": url})
        assert done.returncode == EXIT_UNREACHABLE, (args, done.stderr)
        line = one_line_error(done)
        assert "cannot reach Redis" in line and "127.0.0.1" in line
        assert "hunter2-secret" not in done.stderr + done.stdout


def test_status_of_an_unknown_job_says_so_in_one_line(redis_url: str) -> None:
    done = run_cli("status", "no-such-job", env={"LIPSYNC_BROKER_URL": redis_url})
    assert done.returncode == EXIT_FAILED
    assert "no job 'no-such-job'" in one_line_error(done)
    assert done.stdout == ""


def test_replaying_an_unknown_webhook_names_it(redis_url: str) -> None:
    done = run_cli("callbacks", "replay", "job-x.outcome", env={"LIPSYNC_BROKER_URL": redis_url})
    assert done.returncode == EXIT_FAILED
    assert "no dead-lettered webhook 'job-x.outcome'" in one_line_error(done)


def test_submit_wait_past_its_timeout_says_the_job_goes_on(redis_url: str, tmp_path: Path) -> None:
    # No worker consumes the queue: the job waits, and --wait gives up on waiting, not on the job.
    env = {"LIPSYNC_BROKER_URL": redis_url, "LIPSYNC_STORAGE_DIR": str(tmp_path)}
    args = ("submit", "--job-id", "slow-1", "--sheet", "1", "--cell", "2", "--video", "3", "--audio", "4")
    done = run_cli(*args, "--wait", "--timeout", "1", env=env)
    assert done.returncode == EXIT_STILL_RUNNING
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == "job slow-1 still running after 1 s; see `lipsync-worker status slow-1`"


def _gen_env(redis_url: str, sim: GenSimulator, **overrides: str) -> dict[str, str]:
    env = {
        "LIPSYNC_BROKER_URL": redis_url,
        "LIPSYNC_GEN_BASE_URL": sim.base_url,
        "LIPSYNC_GEN_API_KEY": API_KEY,
        "LIPSYNC_GEN_AGENT_ID": AGENT_ID,
        "LIPSYNC_ALLOW_PRIVATE_URLS": "true",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v}


def test_health_without_a_key_is_unhealthy_even_when_another_worker_left_a_good_verdict(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    preflight(unit_settings(redis_url, sim.base_url, tmp_path), redis.Redis.from_url(redis_url), say=print)
    assert run_cli("health", env=_gen_env(redis_url, sim)).returncode == 0
    done = run_cli("health", env=_gen_env(redis_url, sim, LIPSYNC_GEN_API_KEY="", LIPSYNC_GEN_AGENT_ID=""))
    assert done.returncode == EXIT_FAILED, done.stdout
    assert "LIPSYNC_GEN_API_KEY and LIPSYNC_GEN_AGENT_ID are not set" in done.stderr
    assert done.stdout == ""


def test_health_is_not_told_unhealthy_by_a_bad_verdict_on_another_configuration(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    wrong = unit_settings(redis_url, sim.base_url, tmp_path, gen_api_key="sk-wrong")
    with pytest.raises(ConfigurationError):
        preflight(wrong, redis.Redis.from_url(redis_url), say=print)
    done = run_cli("health", env=_gen_env(redis_url, sim))
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    # ...while the misconfigured process itself still hears GEN's refusal.
    done = run_cli("health", env=_gen_env(redis_url, sim, LIPSYNC_GEN_API_KEY="sk-wrong"))
    assert done.returncode == EXIT_FAILED
    assert "GEN refused LIPSYNC_GEN_API_KEY (401)" in done.stderr
    assert "sk-wrong" not in done.stderr
