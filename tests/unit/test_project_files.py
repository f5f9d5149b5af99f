"""The files users read and run: README, docker-compose.yml, the published schemas, CI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import AnyUrl

from gensim import GenSimulator
from worker.jobs.models import LipsyncFailure
from worker.jobs.schemas import PUBLISHED, schema_of
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_fresh_machine_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).strip().splitlines()]
    assert commands == ["./dev demo", "./dev test"]
    assert README.index(first_block.group(0)) < README.index("\n## ")


def test_ci_runs_the_readmes_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev test" in ci


def test_every_setting_is_documented() -> None:
    for name in Settings.model_fields:
        assert f"`LIPSYNC_{name.upper()}`" in README, f"LIPSYNC_{name.upper()} is not in the README"


def test_the_documented_defaults_are_the_real_ones() -> None:
    rows = re.findall(r"^\| `LIPSYNC_(\w+)` \| `([^`]*)` \|", README, re.M)
    assert len(rows) > 30, "the settings table moved or changed shape"
    for name, documented in rows:
        actual = Settings.model_fields[name.lower()].get_default(call_default_factory=True)
        assert _same_setting(documented, actual), f"LIPSYNC_{name}: README {documented!r}, code {actual!r}"


def _same_setting(documented: str, actual: object) -> bool:
    if isinstance(actual, bool):
        return documented == str(actual).lower()
    if isinstance(actual, int | float):
        return float(documented) == actual
    if isinstance(actual, list):  # comma separated, each item of the list's own type
        parts = [part.strip() for part in documented.split(",")]
        return len(parts) == len(actual) and all(type(a)(p) == a for a, p in zip(actual, parts, strict=True))
    if isinstance(actual, AnyUrl):
        return AnyUrl(documented) == actual  # pydantic adds the trailing slash
    return documented == str(actual)


def test_committed_schemas_match_the_models() -> None:
    for name in PUBLISHED:
        committed = json.loads((ROOT / "docs" / "schemas" / f"{name}.json").read_text())
        assert committed == schema_of(name), f"docs/schemas/{name}.json is stale: run lipsync-worker schema"


def test_docker_compose_is_valid_and_scalable() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker", "flower", "simulator"} <= set(services)
    worker = services["worker"]
    # --scale needs replicas without fixed names or host ports.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"][:2] == ["lipsync-worker", "worker"]
    env = worker["environment"]
    assert env["LIPSYNC_BROKER_URL"].startswith("redis://redis:")
    assert any("--basic-auth" in part for part in services["flower"]["command"])
    assert "noeviction" in services["redis"]["command"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).exists()


def test_every_compose_service_has_a_healthcheck_of_its_own() -> None:
    # The image's HEALTHCHECK pings a Celery worker: inherited by the simulator or Flower it would
    # mark them unhealthy forever.
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    tests = {
        name: json.dumps(service.get("healthcheck", {}).get("test")) for name, service in services.items()
    }
    assert all(test != "null" for test in tests.values()), tests
    assert len(set(tests.values())) == len(tests), "two services share a healthcheck"
    assert "inspect ping" in tests["worker"] and "lipsync-worker health" in tests["worker"]


def test_the_simulators_compose_healthcheck_passes_on_a_running_simulator_only() -> None:
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["simulator"][
        "healthcheck"
    ]
    assert command["test"][:3] == ["CMD", "python", "-c"]
    code = command["test"][3]
    with GenSimulator(api_key="k", agent_ids=("42",)) as sim:
        port = str(sim.base_url.rsplit(":", 1)[1])
        assert subprocess.run([sys.executable, "-c", code.replace("8700", port)], timeout=30).returncode == 0
    assert (
        subprocess.run(
            [sys.executable, "-c", code.replace("8700", port)], timeout=30, capture_output=True
        ).returncode
        != 0
    )


def test_dockerfile_runs_commands_that_exist() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'CMD ["lipsync-worker", "worker"' in dockerfile
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_image_holds_every_package_and_the_extras_the_documented_settings_need() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"the image does not copy {pattern}"
    installed = re.search(r'pip install "\.\[([\w,]*)\]"', dockerfile)
    assert installed is not None, "the image does not install the project with its extras"
    # Extras the README's settings table sends users to (e.g. LIPSYNC_STORAGE_BACKEND=s3).
    settings_table = README[README.index("## Settings") : README.index("## Running it")]
    needed = set(re.findall(r"lipsync-worker\[(\w+)\]", settings_table))
    assert needed, "the settings table names no extra any more: update this test"
    assert needed <= set(installed.group(1).split(","))


def test_monitoring_and_licence_need_no_extra() -> None:
    project = _pyproject()["project"]
    # `pip install lipsync-worker` then `celery -A worker flower` must just work.
    assert any(re.match(r"flower\b", dep) for dep in project["dependencies"])
    # An SPDX expression, not the deprecated {text = ...} table.
    assert project["license"] == "MIT"


def test_local_links_in_the_docs_resolve_inside_the_repository() -> None:
    ours = [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("deploy/**/*.md"),
        *ROOT.glob("examples/**/*.md"),
    ]
    # Not what other tests install there (the Node example's node_modules).
    documents = [path for path in ours if "node_modules" not in path.parts]
    broken = []
    for document in documents:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            resolved = (document.parent / target).resolve()
            if not resolved.exists() or ROOT.resolve() not in resolved.parents:
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_failure_status_is_in_the_readmes_status_table() -> None:
    table = set(re.findall(r"^\| `(\w+)` \|", README, re.M))
    statuses = set(get_args(LipsyncFailure.model_fields["status"].annotation))
    assert statuses <= table, statuses - table


def _compose_worker_env() -> dict[str, str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {k: str(v) for k, v in compose["services"]["worker"]["environment"].items()}


def _workers_redis(env: dict[str, str]) -> tuple[str, str]:
    """The broker and result backend a worker with this environment uses (Settings' defaults when unset)."""
    settings = Settings.model_validate(
        {"broker_url": env["LIPSYNC_BROKER_URL"], "result_backend": env.get("LIPSYNC_RESULT_BACKEND")}
    )
    return settings.broker_url, settings.effective_result_backend


def test_the_any_service_snippet_reads_results_where_the_compose_workers_write_them() -> None:
    section = README.split("### From any service", 1)[1].split("\n### ", 1)[0]
    found = re.search(r'Celery\(broker="([^"]+)", backend="([^"]+)"\)', section)
    assert found is not None, "the snippet no longer names its broker and backend"
    assert found.groups() == _workers_redis(_compose_worker_env())
    assert "LIPSYNC_RESULT_BACKEND" in section and "LIPSYNC_BROKER_URL" in section


def test_the_examples_use_the_compose_workers_broker_and_backend() -> None:
    broker, backend = _workers_redis(_compose_worker_env())
    raw = (ROOT / "examples" / "raw_redis_enqueue.py").read_text()
    found = re.search(r"--broker (\S+) \\\s+--backend (\S+)", raw)
    assert found is not None and found.groups() == (broker, backend)
    for name in ("README.md", "enqueue.js"):
        text = (ROOT / "examples" / "node" / name).read_text()
        assert re.findall(r"\bBROKER_URL=(\S+)", text) == [broker], name
        assert re.findall(r"\bRESULT_BACKEND=(\S+)", text) == [backend], name
