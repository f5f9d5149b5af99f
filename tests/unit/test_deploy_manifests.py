"""The deployment files under deploy/: Kubernetes manifests and systemd units, checked by parsing.

Neither Docker nor Kubernetes is needed: every YAML document is loaded with ``yaml.safe_load_all``
and every unit with ``configparser``, then cross-checked against the code (queues, settings, CLI
commands) and against each other (names, labels, grace periods).
"""

from __future__ import annotations

import configparser
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.names import (
    ACTIVE_JOBS_KEY,
    ALL_QUEUES,
    IN_FLIGHT_STAGES,
    JOB_KEY_PREFIX,
    QUEUE_FETCH,
    QUEUE_JOBS,
    STAGES_BY_QUEUE,
)
from worker.ops.metrics import MetricsCollector
from worker.preflight import EXIT_CONFIG
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"

Doc = dict[str, Any]

#: In deploy/kubernetes but never applied by ``kubectl apply -k``.
NOT_APPLIED = {"secret.example.yaml", "hpa.yaml"}
SETTING_VARS = {f"LIPSYNC_{name.upper()}" for name in Settings.model_fields}
SECRET_VARS = {"LIPSYNC_GEN_API_KEY", "LIPSYNC_WEBHOOK_SECRET", "LIPSYNC_EVENTS_TOKEN"}
DOWNLOAD_TIMEOUT = float(Settings.model_fields["download_timeout"].default)
PLACEHOLDER = "REPLACE_ME"
WORKER_COMMAND = re.compile(r"^lipsync-worker worker (?:.* )?-Q (\S+)")


# -- loading ----------------------------------------------------------------------------------------


@functools.cache
def documents(filename: str) -> tuple[Doc, ...]:
    loaded = yaml.safe_load_all((K8S / filename).read_text())
    return tuple(doc for doc in loaded if doc is not None)


def manifest_files() -> list[str]:
    return sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def all_docs() -> list[Doc]:
    return [doc for name in manifest_files() for doc in documents(name)]


def of_kind(kind: str) -> list[Doc]:
    return [doc for doc in all_docs() if doc.get("kind") == kind]


def named(kind: str, name: str) -> Doc:
    matches = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def the_one(kind: str) -> Doc:
    docs = of_kind(kind)
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def kustomization() -> Doc:
    (doc,) = documents("kustomization.yaml")
    return doc


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> list[Doc]:
    found: list[Doc] = pod_spec(workload)["containers"]
    return found


def command_line(container: Doc) -> str:
    return shlex.join([*container.get("command", []), *container.get("args", [])])


def worker_queues(deployment: Doc) -> list[str]:
    """The queues a Deployment's ``lipsync-worker worker -Q …`` consumes (none for other Deployments)."""
    queues: list[str] = []
    for container in containers(deployment):
        match = WORKER_COMMAND.match(command_line(container))
        if match:
            queues += match.group(1).split(",")
    return queues


def deployment_for_queue(queue: str) -> Doc:
    (deployment,) = [d for d in of_kind("Deployment") if queue in worker_queues(d)]
    return deployment


def labels_select(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def configmap() -> Doc:
    return the_one("ConfigMap")


def secret() -> Doc:
    return the_one("Secret")


def exec_command(probe: Doc) -> str:
    return shlex.join(probe["exec"]["command"])


def workload_id(workload: Doc) -> str:
    """The test id of a parameter from WORKLOADS: ``Kind/name``."""
    return f"{workload['kind']}/{workload['metadata']['name']}"


WORKLOADS = [doc for doc in all_docs() if doc.get("kind") in ("Deployment", "StatefulSet")]
DEPLOYMENTS = [doc for doc in WORKLOADS if doc["kind"] == "Deployment"]
WORKER_DEPLOYMENTS = [doc for doc in DEPLOYMENTS if worker_queues(doc)]


# -- every document ---------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", manifest_files())
def test_every_document_has_api_version_kind_and_name(filename: str) -> None:
    docs = documents(filename)
    assert docs, f"{filename} holds no document"
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], filename
        assert isinstance(doc.get("kind"), str) and doc["kind"], filename
        assert isinstance(doc.get("metadata", {}).get("name"), str), f"{filename}: {doc['kind']} has no name"


def test_names_are_unique_per_kind_and_namespaces_consistent() -> None:
    seen = [(doc["kind"], doc["metadata"]["name"]) for doc in all_docs()]
    assert len(seen) == len(set(seen)), "two documents share a kind and a name"
    namespace = the_one("Namespace")["metadata"]["name"]
    assert kustomization()["namespace"] == namespace
    for doc in all_docs():
        assert doc["metadata"].get("namespace", namespace) == namespace


def test_kustomization_lists_existing_files_except_the_examples() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    for filename in listed:
        assert (K8S / filename).is_file(), f"kustomization.yaml lists a missing file: {filename}"
        assert documents(filename), filename
    assert set(listed) == set(manifest_files()) - NOT_APPLIED
    images = {image["name"] for image in kustomization().get("images", [])}
    for workload in WORKLOADS:
        for container in containers(workload):
            if not container["image"].startswith("redis:"):
                assert container["image"] in images, "an image kustomization.yaml does not set"


# -- workloads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
def test_workload_selector_matches_its_pod_labels(workload: Doc) -> None:
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector
    assert labels_select(selector, workload["spec"]["template"]["metadata"]["labels"])
    # No other workload's pods may fall under this selector (a Deployment would adopt them).
    for other in WORKLOADS:
        if other is not workload:
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert not labels_select(selector, other_labels)


@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
def test_workload_containers_have_image_probes_and_resources(workload: Doc) -> None:
    for container in containers(workload):
        assert container.get("image")
        assert container.get("command") or container.get("args")
        assert "livenessProbe" in container and "readinessProbe" in container
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{kind} incomplete"


@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
def test_workload_is_restricted_and_has_writable_tmp_only_where_mounted(workload: Doc) -> None:
    spec = pod_spec(workload)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    # Docker-link env vars would inject FLOWER_PORT=tcp://… (Flower exits) or LIPSYNC_*_PORT=tcp://….
    assert spec["enableServiceLinks"] is False
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    pvcs = {doc["metadata"]["name"] for doc in of_kind("PersistentVolumeClaim")}
    for container in containers(workload):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in claims, mount["name"]
        if container["image"] == "lipsync-worker":
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]]
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in pvcs


@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
def test_workload_env_refers_to_the_configmap_and_secret_that_exist(workload: Doc) -> None:
    configmaps = {doc["metadata"]["name"] for doc in of_kind("ConfigMap")}
    secret_keys = {secret()["metadata"]["name"]: set(secret()["stringData"])}
    for container in containers(workload):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secret_keys
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secret_keys.get(ref["name"], set()), var["name"]


# -- the worker Deployments -------------------------------------------------------------------------


def test_each_queue_is_consumed_by_exactly_one_deployment() -> None:
    consumers: dict[str, list[str]] = {}
    for deployment in WORKER_DEPLOYMENTS:
        for queue in worker_queues(deployment):
            consumers.setdefault(queue, []).append(deployment["metadata"]["name"])
    assert set(consumers) == set(ALL_QUEUES)
    for queue, names in consumers.items():
        assert len(names) == 1, f"{queue} is consumed by {names}"


@pytest.mark.parametrize("deployment", WORKER_DEPLOYMENTS, ids=workload_id)
def test_worker_loads_settings_and_secrets(deployment: Doc) -> None:
    (container,) = containers(deployment)
    refs = container["envFrom"]
    assert {"configMapRef": {"name": configmap()["metadata"]["name"]}} in refs
    assert {"secretRef": {"name": secret()["metadata"]["name"]}} in refs


@pytest.mark.parametrize("deployment", WORKER_DEPLOYMENTS, ids=workload_id)
def test_worker_probes_ping_the_node_and_check_redis(deployment: Doc) -> None:
    (container,) = containers(deployment)
    liveness = container["livenessProbe"]
    shell, flag, script = liveness["exec"]["command"]
    assert (shell, flag) == ("sh", "-c")
    # Inside sh, $(HOSTNAME) would run a command called HOSTNAME; the variable is ${HOSTNAME}.
    assert "$(HOSTNAME)" not in script
    assert re.fullmatch(r'celery -A worker inspect ping -d "?celery@\$\{?HOSTNAME\}?"? --timeout 10', script)
    assert liveness["timeoutSeconds"] > 10, "the probe must outlast the ping's own --timeout"
    assert exec_command(container["readinessProbe"]) == "lipsync-worker health"


def test_fetch_worker_outlasts_the_longest_download() -> None:
    configured = float(configmap()["data"].get("LIPSYNC_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT))
    fetch = deployment_for_queue(QUEUE_FETCH)
    assert pod_spec(fetch)["terminationGracePeriodSeconds"] > max(DOWNLOAD_TIMEOUT, configured)
    assert "-c 4" in command_line(containers(fetch)[0])
    # The job queue's worker is given the same cap (it exits as soon as its short steps end).
    assert pod_spec(deployment_for_queue(QUEUE_JOBS))["terminationGracePeriodSeconds"] > DOWNLOAD_TIMEOUT
    assert "-c 8" in command_line(containers(deployment_for_queue(QUEUE_JOBS))[0])


def test_fetch_worker_writes_outputs_to_a_shared_volume() -> None:
    (container,) = containers(deployment_for_queue(QUEUE_FETCH))
    storage = configmap()["data"]["LIPSYNC_STORAGE_DIR"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == storage]
    volume = next(
        v for v in pod_spec(deployment_for_queue(QUEUE_FETCH))["volumes"] if v["name"] == mount["name"]
    )
    claim = named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    # Several fetch pods write, consumers read: the volume must be shareable.
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_pdbs_cover_every_worker_deployment_once() -> None:
    pdbs = of_kind("PodDisruptionBudget")
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        covered = [
            d
            for d in of_kind("Deployment")
            if labels_select(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert covered, f"PodDisruptionBudget {pdb['metadata']['name']} selects no Deployment"
        assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    for deployment in WORKER_DEPLOYMENTS:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert sum(labels_select(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs) == 1


# -- autoscaling ------------------------------------------------------------------------------------


def test_keda_scales_the_workers_on_jobs_in_flight_and_the_fetch_queue() -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    objects = of_kind("ScaledObject")
    targets = [obj["spec"]["scaleTargetRef"]["name"] for obj in objects]
    assert len(targets) == len(set(targets)), "two ScaledObjects on one Deployment"
    for target in targets:
        assert target in deployments
        # The autoscaler owns the replica count; a fixed one would be reset by every apply.
        assert "replicas" not in deployments[target]["spec"]
    by_target = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in objects}

    jobs = by_target[deployment_for_queue(QUEUE_JOBS)["metadata"]["name"]]
    queries = [t["metadata"]["query"] for t in jobs["spec"]["triggers"] if t["type"] == "prometheus"]
    assert queries and all("lipsync_jobs_in_flight" in query for query in queries)

    fetch = by_target[deployment_for_queue(QUEUE_FETCH)["metadata"]["name"]]
    (redis_trigger,) = [t["metadata"] for t in fetch["spec"]["triggers"] if t["type"] == "redis"]
    assert redis_trigger["listName"] == QUEUE_FETCH
    broker = urlsplit(configmap()["data"]["LIPSYNC_BROKER_URL"])
    assert redis_trigger["databaseIndex"] == broker.path.lstrip("/")
    namespace = the_one("Namespace")["metadata"]["name"]
    assert redis_trigger["address"] == f"{broker.hostname}.{namespace}.svc.cluster.local:{broker.port}"


def test_hpa_alternative_targets_the_same_deployments() -> None:
    deployments = {d["metadata"]["name"] for d in of_kind("Deployment")}
    hpas = of_kind("HorizontalPodAutoscaler")
    assert all(doc["apiVersion"] == "autoscaling/v2" for doc in hpas)
    targets = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas}
    assert targets <= deployments
    assert targets == {obj["spec"]["scaleTargetRef"]["name"] for obj in of_kind("ScaledObject")}
    jobs = next(h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == "lipsync-worker")
    external = [m["external"]["metric"]["name"] for m in jobs["spec"]["metrics"] if m["type"] == "External"]
    assert external == ["lipsync_jobs_in_flight"]
    # Only one of KEDA or the HPAs may be applied: the kustomization picks KEDA.
    assert "hpa.yaml" not in kustomization()["resources"]


# -- metrics, Flower, Redis ------------------------------------------------------------------------


def test_metrics_deployment_serves_prometheus_once() -> None:
    deployment = named("Deployment", "lipsync-metrics")
    (container,) = containers(deployment)
    assert command_line(container) == "lipsync-worker metrics --host 0.0.0.0 --port 9808"
    # A second replica would be scraped too and double sum(lipsync_jobs_in_flight).
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}
    assert "prometheus.io/scrape" not in named("Service", "lipsync-metrics")["metadata"].get(
        "annotations", {}
    )
    # It reads Redis only: no secrets.
    assert all("secretRef" not in source for source in container["envFrom"])


def test_events_receiver_takes_only_its_token_from_the_secret() -> None:
    deployment = named("Deployment", "lipsync-events")
    (container,) = containers(deployment)
    port = Settings.model_fields["events_port"].default
    assert command_line(container) == f"lipsync-worker events --host 0.0.0.0 --port {port}"
    assert port in {p["containerPort"] for p in container["ports"]}
    # The Redis URLs from the ConfigMap; of the secrets, the token only (no GEN key, no webhook secret).
    assert container["envFrom"] == [{"configMapRef": {"name": configmap()["metadata"]["name"]}}]
    assert container["env"] == [
        {
            "name": "LIPSYNC_EVENTS_TOKEN",
            "valueFrom": {
                "secretKeyRef": {"name": secret()["metadata"]["name"], "key": "LIPSYNC_EVENTS_TOKEN"}
            },
        }
    ]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    # Stateless: more than one replica keeps GEN answered through a rollout.
    assert deployment["spec"]["replicas"] >= 2
    assert named("Service", "lipsync-events")["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_flower_requires_basic_auth_from_the_secret_and_stays_internal() -> None:
    deployment = named("Deployment", "lipsync-flower")
    (container,) = containers(deployment)
    args = [*container["command"], *container.get("args", [])]
    assert args[:3] == ["celery", "--app=worker", "flower"]
    assert "--basic-auth=$(FLOWER_BASIC_AUTH)" in args
    (var,) = [v for v in container["env"] if v["name"] == "FLOWER_BASIC_AUTH"]
    assert var["valueFrom"]["secretKeyRef"] == {
        "name": secret()["metadata"]["name"],
        "key": "FLOWER_BASIC_AUTH",
    }
    # /metrics and /healthcheck are unauthenticated in Flower: never expose the Service.
    service = named("Service", "lipsync-flower")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


@pytest.mark.parametrize("service", of_kind("Service"), ids=lambda s: s["metadata"]["name"])
def test_services_select_a_workload_and_its_ports(service: Doc) -> None:
    selector = service["spec"]["selector"]
    matched = [
        workload
        for workload in WORKLOADS
        if labels_select(selector, workload["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(matched) == 1
    ports = [port for c in containers(matched[0]) for port in c.get("ports", [])]
    known = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
    for port in service["spec"]["ports"]:
        assert port.get("targetPort", port["port"]) in known


def test_example_redis_never_evicts_and_is_what_the_settings_point_at() -> None:
    statefulset = named("StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == 1
    (container,) = containers(statefulset)
    flags = " ".join([*container["command"], *container["args"]])
    assert "--maxmemory-policy noeviction" in flags
    assert "--appendonly yes" in flags
    service = named("Service", statefulset["spec"]["serviceName"])
    for key in ("LIPSYNC_BROKER_URL", "LIPSYNC_RESULT_BACKEND", "LIPSYNC_REDIS_URL"):
        url = urlsplit(configmap()["data"][key])
        assert (url.scheme, url.hostname, url.port) == ("redis", service["metadata"]["name"], 6379)


# -- settings and secrets ---------------------------------------------------------------------------


def test_configmap_holds_real_non_secret_settings_as_strings() -> None:
    data = configmap()["data"]
    assert set(data) <= SETTING_VARS, f"not settings: {set(data) - SETTING_VARS}"
    assert not set(data) & SECRET_VARS
    # Kubernetes rejects a ConfigMap whose values are not strings (e.g. an unquoted 600).
    assert all(isinstance(value, str) for value in data.values())
    # And the values are valid settings.
    Settings.from_environ({k: v for k, v in data.items() if v})


def test_secret_example_holds_only_placeholders() -> None:
    doc = secret()
    assert "data" not in doc, "base64 values could hide a real secret: use stringData placeholders"
    values = doc["stringData"]
    assert set(values) == SECRET_VARS | {"FLOWER_BASIC_AUTH"}
    for key, value in values.items():
        assert PLACEHOLDER in value, f"{key} does not look like a placeholder"
    assert "secret.example.yaml" not in kustomization()["resources"]


# -- systemd ----------------------------------------------------------------------------------------


def unit(filename: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / filename).read_text())
    return parser


def directives(filename: str, key: str) -> list[str]:
    """Every value of a directive that may repeat (configparser keeps only the last)."""
    lines = (SYSTEMD / filename).read_text().splitlines()
    return [line.split("=", 1)[1] for line in lines if line.startswith(f"{key}=")]


def env_file(filename: str) -> dict[str, str]:
    pairs = {}
    for line in (SYSTEMD / filename).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


UNITS = [
    "lipsync-worker@.service",
    "lipsync-flower.service",
    "lipsync-metrics.service",
    "lipsync-events.service",
]


@pytest.mark.parametrize("filename", UNITS)
def test_units_restart_read_the_settings_and_are_hardened(filename: str) -> None:
    service = unit(filename)["Service"]
    assert service["Restart"] == "always"
    assert service["User"] == "lipsync"
    assert service["KillSignal"] == "SIGTERM"
    assert "/etc/lipsync-worker/env" in directives(filename, "EnvironmentFile")
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert service[key] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert unit(filename)["Install"]["WantedBy"] == "multi-user.target"


def test_worker_unit_runs_one_queue_per_instance_and_outlasts_a_download() -> None:
    service = unit("lipsync-worker@.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == ["/opt/lipsync-worker/.venv/bin/lipsync-worker", "worker"]
    assert argv[argv.index("-Q") + 1] == "%i"
    # Several queues' workers on one host need distinct Celery node names.
    assert "--hostname=%i@%H" in argv
    assert float(service["TimeoutStopSec"]) > DOWNLOAD_TIMEOUT
    assert float(service["TimeoutStopSec"]) > float(env_file("env.example")["LIPSYNC_DOWNLOAD_TIMEOUT"])
    # SIGTERM to the main process only: the pool's children would die on it mid-download.
    assert service["KillMode"] == "mixed"
    # A worker that refused to start (bad GEN settings) is not restarted into the same refusal.
    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert service["ReadWritePaths"] == "/var/lib/lipsync-worker"
    assert env_file("env.example")["LIPSYNC_STORAGE_DIR"].startswith("/var/lib/lipsync-worker/")


def test_flower_unit_needs_credentials_and_listens_on_loopback() -> None:
    service = unit("lipsync-flower.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[:3] == ["/opt/lipsync-worker/.venv/bin/celery", "--app=worker", "flower"]
    assert "--address=127.0.0.1" in argv
    assert "/etc/lipsync-worker/flower.env" in directives("lipsync-flower.service", "EnvironmentFile")
    assert "FLOWER_BASIC_AUTH" in service["ExecStartPre"]
    assert set(env_file("flower.env.example")) == {"FLOWER_BASIC_AUTH"}
    assert PLACEHOLDER in env_file("flower.env.example")["FLOWER_BASIC_AUTH"]


def test_metrics_unit_runs_the_metrics_command() -> None:
    argv = shlex.split(unit("lipsync-metrics.service")["Service"]["ExecStart"])
    assert argv == [
        "/opt/lipsync-worker/.venv/bin/lipsync-worker",
        "metrics",
        "--host",
        "0.0.0.0",
        "--port",
        "9808",
    ]


def test_events_unit_runs_the_receiver_behind_a_local_proxy() -> None:
    argv = shlex.split(unit("lipsync-events.service")["Service"]["ExecStart"])
    port = str(Settings.model_fields["events_port"].default)
    assert argv == [
        "/opt/lipsync-worker/.venv/bin/lipsync-worker",
        "events",
        "--host",
        "127.0.0.1",
        "--port",
        port,
    ]


def test_env_example_holds_real_settings_and_placeholder_secrets() -> None:
    env = env_file("env.example")
    assert set(env) <= SETTING_VARS, f"not settings: {set(env) - SETTING_VARS}"
    for key in SECRET_VARS & set(env):
        assert PLACEHOLDER in env[key], f"{key} does not look like a placeholder"


# -- the commands the files run exist ---------------------------------------------------------------


def run_help(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@functools.cache
def cli_help() -> str:
    return run_help("-m", "worker.cli", "--help")


@pytest.mark.parametrize(
    "subcommand",
    ["worker", "metrics", "health", "events"],
)
def test_cli_has_the_subcommands_the_deploy_files_run(subcommand: str) -> None:
    listed = re.search(r"\{([\w,-]+)\}", cli_help())
    assert listed is not None
    assert subcommand in listed.group(1).split(",")


def test_worker_command_flags_exist() -> None:
    assert {"-Q", "-c"} <= set(
        re.findall(r"(?<![\w-])-\w\b", run_help("-m", "worker.cli", "worker", "--help"))
    )
    # Everything else goes through to `celery worker`.
    assert "--hostname" in run_help("-m", "celery", "-A", "worker", "worker", "--help")


def test_liveness_ping_flags_exist() -> None:
    text = run_help("-m", "celery", "-A", "worker", "inspect", "--help")
    assert "--destination" in text and "-d," in text
    assert "--timeout" in text


def test_flower_options_exist() -> None:
    pytest.importorskip("flower.options")  # importing it defines Flower's options
    from tornado.options import options

    used = ["basic_auth", "port", "address", "purge_offline_workers"]
    assert all(name in options for name in used)


# -- the autoscalers' queries, evaluated against what the code exports ------------------------------

#: Jobs seeded per stage: distinct powers of two, so any wrong selection of stages sums differently.
SEEDED = {stage: 2**i for i, stage in enumerate(IN_FLIGHT_STAGES)}
#: Messages seeded in each queue, likewise.
BACKLOG = {queue: 2 ** (i + len(SEEDED)) for i, queue in enumerate(ALL_QUEUES)}

Sample = tuple[str, frozenset[tuple[str, str]], float]


@pytest.fixture
def exported(redis_url: str) -> list[Sample]:
    """One scrape of the metrics the code exports, over a Redis holding SEEDED jobs in flight (and a
    finished one, which no autoscaler may count) and BACKLOG messages waiting."""
    client = redis.Redis.from_url(redis_url)
    n = 0
    for stage, count in SEEDED.items():
        for _ in range(count):
            n += 1
            client.hset(f"{JOB_KEY_PREFIX}j{n}", mapping={"created_at": "1", "state": stage.value})
            client.zadd(ACTIVE_JOBS_KEY, {f"j{n}": 1e12})
    client.hset(f"{JOB_KEY_PREFIX}done", mapping={"created_at": "1", "state": "completed", "outcome": "{}"})
    client.zadd(ACTIVE_JOBS_KEY, {"done": 1e12})
    for queue, count in BACKLOG.items():
        client.rpush(queue, *(["{}"] * count))
    registry = CollectorRegistry()
    registry.register(MetricsCollector(client))
    samples = [
        (sample.name, frozenset(sample.labels.items()), sample.value)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    ]
    client.close()
    return samples


def select(samples: list[Sample], metric: str, matchers: list[tuple[str, str, list[str]]]) -> float:
    """sum(metric{matchers}): ``(label, "=" | "=~" | "In", values)``, as Prometheus and the HPA's
    selector evaluate them."""
    names = {name for name, _, _ in samples}
    assert metric in names, f"{metric} is not exported (exported: {sorted(names)})"
    total = 0.0
    for name, labels, value in samples:
        found = dict(labels)
        if name == metric and all(found.get(label) in values for label, _, values in matchers):
            total += value
    return total


def promql(query: str) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """The metric and label matchers of a ``sum(metric{label="v", label=~"a|b"})`` query."""
    match = re.fullmatch(r"sum\((\w+)\{(.*)\}\)", query.strip())
    assert match, f"query not of the form sum(metric{{...}}): {query}"
    matchers = [
        (label, op, value.split("|") if op == "=~" else [value])
        for label, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', match.group(2))
    ]
    return match.group(1), matchers


def hpa_selector(metric: Doc) -> list[tuple[str, str, list[str]]]:
    selector = metric.get("selector", {})
    matchers = [(k, "=", [v]) for k, v in selector.get("matchLabels", {}).items()]
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        matchers.append((expr["key"], "In", list(expr["values"])))
    return matchers


def expected_load(deployment: Doc, metric: str) -> float:
    """What the deployment's autoscaler should count: the jobs in the stages its queues carry, or
    the messages waiting in its queues."""
    queues = worker_queues(deployment)
    if metric == "lipsync_queue_depth":
        return float(sum(BACKLOG[q] for q in queues))
    return float(sum(SEEDED[stage] for q in queues for stage in STAGES_BY_QUEUE.get(q, ())))


def test_keda_queries_count_exactly_the_stages_each_deployment_carries(exported: list[Sample]) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    checked = 0
    for obj in of_kind("ScaledObject"):
        deployment = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        for trigger in obj["spec"]["triggers"]:
            if trigger["type"] != "prometheus":
                continue
            metric, matchers = promql(trigger["metadata"]["query"])
            value = select(exported, metric, matchers)
            assert value == expected_load(deployment, metric), (trigger["metadata"]["query"], value)
            checked += 1
    assert checked >= 2


def test_hpa_metrics_count_exactly_the_stages_each_deployment_carries(exported: list[Sample]) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    checked = 0
    for hpa in of_kind("HorizontalPodAutoscaler"):
        deployment = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        for entry in hpa["spec"]["metrics"]:
            if entry["type"] != "External":
                continue
            metric = entry["external"]["metric"]
            value = select(exported, metric["name"], hpa_selector(metric))
            assert value == expected_load(deployment, metric["name"]), (metric, value)
            checked += 1
    assert checked >= 3


# -- the deployments agree with each other and with the defaults ----------------------------------


def compose_worker_env() -> dict[str, str]:
    """docker-compose.yml's worker environment, ``${VAR:-default}`` read as its default."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["worker"]["environment"]
    return {k: re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", str(v)) for k, v in env.items()}


def test_compose_configmap_and_env_example_use_the_default_dialect() -> None:
    default = Settings.model_fields["gen_dialect"].default
    assert compose_worker_env()["LIPSYNC_GEN_DIALECT"] == default
    assert configmap()["data"]["LIPSYNC_GEN_DIALECT"] == default
    assert env_file("env.example")["LIPSYNC_GEN_DIALECT"] == default
