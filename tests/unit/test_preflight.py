"""What a worker checks before it takes work, against the GEN simulator over HTTP and a real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from gensim import Fault, GenSimulator
from tests.conftest import REPO
from tests.unit.conftest import API_KEY, unit_settings
from worker.dev.embedded_redis import free_port
from worker.errors import ConfigurationError
from worker.gen.client import GenClient
from worker.gen.errors import GenTransportError
from worker.preflight import (
    cached_check,
    check_gen_now,
    preflight,
    private_gen_warning,
    require_gen_settings,
    verify_gen,
)


def test_missing_credentials_are_named(redis_url: str, sim: GenSimulator, tmp_path: Path) -> None:
    settings = unit_settings(redis_url, sim.base_url, tmp_path, gen_api_key=None, gen_agent_id=None)
    with pytest.raises(ConfigurationError, match="LIPSYNC_GEN_API_KEY and LIPSYNC_GEN_AGENT_ID are not set"):
        require_gen_settings(settings)


def test_a_key_gen_refuses_stops_the_worker(redis_url: str, sim: GenSimulator, tmp_path: Path) -> None:
    settings = unit_settings(redis_url, sim.base_url, tmp_path, gen_api_key="sk-wrong")
    with pytest.raises(ConfigurationError, match=r"GEN refused LIPSYNC_GEN_API_KEY \(401\)"):
        preflight(settings, redis.Redis.from_url(redis_url), say=print)
    check = cached_check(redis.Redis.from_url(redis_url), settings)
    assert check is not None and not check.ok and "401" in check.detail


def test_an_agent_the_key_cannot_see_stops_the_worker(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    settings = unit_settings(redis_url, sim.base_url, tmp_path, gen_agent_id="777")
    with pytest.raises(ConfigurationError, match="LIPSYNC_GEN_AGENT_ID=777"):
        verify_gen(GenClient.from_settings(settings), say=print)


def test_good_credentials_pass_and_are_remembered_for_health(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    settings = unit_settings(redis_url, sim.base_url, tmp_path)
    r = redis.Redis.from_url(redis_url)
    preflight(settings, r, say=print)
    check = cached_check(r, settings)
    assert check is not None and check.ok
    assert sim.stats()["counts"]["me"] == 1 and sim.stats()["counts"]["automation_config"] == 1


def test_an_unreachable_gen_is_waited_for_not_a_refusal(redis_url: str, tmp_path: Path) -> None:
    settings = unit_settings(redis_url, f"http://127.0.0.1:{free_port()}", tmp_path, gen_connect_timeout=0.2)
    said: list[str] = []
    slept: list[float] = []
    with pytest.raises(GenTransportError):
        verify_gen(GenClient.from_settings(settings), say=said.append, sleep=slept.append, attempts=4)
    assert len(said) == 3 and all(line.startswith("waiting for GEN at http://127.0.0.1:") for line in said)
    assert len(slept) == 3 and all(0 <= s <= 60 for s in slept)
    # health does not cache "unreachable" as a verdict
    r = redis.Redis.from_url(redis_url)
    assert not check_gen_now(settings, r).ok
    assert cached_check(r, settings) is None


def test_a_loopback_gen_with_private_urls_refused_is_warned_about(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    refused = unit_settings(redis_url, sim.base_url, tmp_path, allow_private_urls=False)
    warning = private_gen_warning(refused)
    assert warning is not None and "LIPSYNC_ALLOW_PRIVATE_URLS=true" in warning and "unsafe_url" in warning
    assert private_gen_warning(unit_settings(redis_url, sim.base_url, tmp_path)) is None


def test_verdicts_are_kept_per_configuration_and_never_name_the_key(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(redis_url)
    good = unit_settings(redis_url, sim.base_url, tmp_path)
    wrong_key = unit_settings(redis_url, sim.base_url, tmp_path, gen_api_key="sk-wrong-SECRET")
    with pytest.raises(ConfigurationError):
        preflight(wrong_key, r, say=print)
    # Another process's refusal is no verdict on these settings.
    assert cached_check(r, good) is None
    preflight(good, r, say=print)
    good_check, wrong_check = cached_check(r, good), cached_check(r, wrong_key)
    assert good_check is not None and good_check.ok
    assert wrong_check is not None and not wrong_check.ok
    for other in (
        unit_settings(redis_url, sim.base_url, tmp_path, gen_api_key=None, gen_agent_id=None),
        unit_settings(redis_url, sim.base_url, tmp_path, gen_agent_id="43"),
        unit_settings(redis_url, "http://127.0.0.1:1", tmp_path),
    ):
        assert cached_check(r, other) is None
    keys = [k.decode() for k in redis.Redis.from_url(redis_url).scan_iter("lipsync:gen_check*")]
    assert len(keys) == 2
    assert not any("SECRET" in k or API_KEY in k for k in keys)


def test_the_compose_placeholder_webhook_secret_is_warned_about_once_at_start(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    compose = (REPO / "docker-compose.yml").read_text()
    placeholder = "change-me-compose-webhook-secret"
    assert f"LIPSYNC_WEBHOOK_SECRET:-{placeholder}" in compose  # the value a compose user gets unless set
    said: list[str] = []
    settings = unit_settings(redis_url, sim.base_url, tmp_path, webhook_secret=placeholder)
    preflight(settings, redis.Redis.from_url(redis_url), say=said.append)
    assert len(said) == 1, said
    assert said[0].startswith("warning: LIPSYNC_WEBHOOK_SECRET is docker-compose's public placeholder")
    assert placeholder not in said[0]
    said.clear()
    preflight(
        unit_settings(redis_url, sim.base_url, tmp_path), redis.Redis.from_url(redis_url), say=said.append
    )
    assert said == []


def test_a_422_on_the_credential_check_stops_the_worker_without_waiting(
    redis_url: str, sim: GenSimulator, tmp_path: Path
) -> None:
    # GEN answers 422 (e.g. agent_not_found) on the agent's automation config: a refusal, not an outage.
    sim.add_fault(Fault(endpoint="automation_config", status=422, times=None))
    settings = unit_settings(redis_url, sim.base_url, tmp_path)
    said: list[str] = []
    slept: list[float] = []
    with pytest.raises(ConfigurationError, match=r"^GEN refused the worker's configuration: .*422"):
        verify_gen(GenClient.from_settings(settings), say=said.append, sleep=slept.append)
    assert said == [] and slept == []
    assert sim.stats()["counts"]["automation_config"] == 1
    r = redis.Redis.from_url(redis_url)
    with pytest.raises(ConfigurationError):
        preflight(settings, r, say=said.append)
    check = cached_check(r, settings)
    assert check is not None and not check.ok and "422" in check.detail
