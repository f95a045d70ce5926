"""The engine fetches no media itself, in every shipped layout.

The wrapper fetches and checks every media URL and hands the engine inline
data. The engine's own fetcher checks nothing (no private-address rules,
redirects followed), so every place that starts an engine must turn it off:
`--allowed-media-domains media-fetch.invalid` (a name that never resolves)
and `VLLM_MEDIA_URL_ALLOW_REDIRECTS=0`. Layouts:

- the image (compose `api`, Kubernetes one-pod Deployment, RunPod): the
  supervisor starts the engine with `build_engine_launch`;
- the split layouts (compose profile `split`, `deploy/k8s/split`): vLLM's
  stock image, configured in the compose file and the manifest.

A new manifest that starts vLLM's stock image fails the last test until it
is checked here too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from app.config import load_settings
from app.lifecycle.engine_args import ENGINE_MEDIA_DOMAIN, build_engine_launch
from tests.unit.test_static_checks import COMPOSE_VARIANTS, K8S_DIRS, PROFILES, ROOT, compose_config, render

STOCK_ENGINE_IMAGE = "vllm/vllm-openai"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")


def assert_fetches_nothing(argv: list[str], env: dict[str, str], where: str) -> None:
    flags = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--allowed-media-domains"]
    assert flags == [ENGINE_MEDIA_DOMAIN], f"{where}: --allowed-media-domains {ENGINE_MEDIA_DOMAIN} missing"
    assert env.get("VLLM_MEDIA_URL_ALLOW_REDIRECTS") == "0", f"{where}: VLLM_MEDIA_URL_ALLOW_REDIRECTS=0 missing"


@pytest.mark.parametrize("modalities", [{"text"}, {"text", "image", "video"}], ids=["text-only", "vision"])
def test_the_supervisor_starts_every_engine_fetching_nothing(modalities: set[str]) -> None:
    settings = load_settings({"MODEL_NAME": "org/model", "DEVICE": "cpu"})
    launch = build_engine_launch(
        settings, "/m", frozenset(modalities), base_env={"VLLM_MEDIA_URL_ALLOW_REDIRECTS": "1"}
    )
    assert_fetches_nothing(launch.argv, launch.env, "supervisor")


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    for name in COMPOSE_FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    return tmp_path


@pytest.mark.parametrize("variant", sorted(COMPOSE_VARIANTS))
def test_compose_engines_fetch_nothing(compose_dir: Path, variant: str) -> None:
    engines = 0
    for profiles in PROFILES:
        services: dict[str, Any] = compose_config(compose_dir, COMPOSE_VARIANTS[variant], profiles)["services"]
        for name, service in services.items():
            if service.get("image", "").startswith(STOCK_ENGINE_IMAGE):
                engines += 1
                environment = {key: str(value) for key, value in (service.get("environment") or {}).items()}
                assert_fetches_nothing(service["command"], environment, f"{variant} compose service {name}")
    assert engines > 0, "no stock engine service found: the split profile moved?"


def test_kubernetes_engines_fetch_nothing() -> None:
    engines = 0
    for directory in K8S_DIRS:
        for resource in render(str(ROOT / directory)):
            for container in resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []:
                if container["image"].startswith(STOCK_ENGINE_IMAGE):
                    engines += 1
                    environment = {item["name"]: item.get("value", "") for item in container.get("env", [])}
                    argv = [*container.get("command", []), *container.get("args", [])]
                    assert_fetches_nothing(argv, environment, f"{directory} container {container['name']}")
    assert engines > 0, "no stock engine container found: deploy/k8s/split moved?"


def test_every_manifest_that_starts_the_stock_engine_is_checked_here() -> None:
    checked = {ROOT / name for name in COMPOSE_FILES} | {
        path for directory in K8S_DIRS for path in (ROOT / directory).glob("*.yaml")
    }
    candidates = [
        *ROOT.glob("docker-compose*.y*ml"),
        *(ROOT / "deploy").rglob("*.y*ml"),
        *(ROOT / "deploy").rglob("*.json"),
    ]
    starting = {path for path in candidates if STOCK_ENGINE_IMAGE in path.read_text()}
    assert starting, "no manifest names the stock engine image"
    assert starting <= checked, f"not checked for media fetching: {sorted(map(str, starting - checked))}"
