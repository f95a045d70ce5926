"""build_and_push.sh: the commands it runs, and its refusals, with a stand-in `docker` on PATH.

The stand-in records every call, so the tests see exactly what a real Docker
would have been asked to do, without a daemon or a registry.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "build_and_push.sh"
VLLM_VERSION = re.search(
    r"^ARG BASE_IMAGE=vllm/vllm-openai:v(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE
).group(1)


def fake_docker(bin_dir: Path, calls: Path, daemon_up: bool = True) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "docker"
    info_status = 0 if daemon_up else 1
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n'
        f'if [[ "$1" == info ]]; then exit {info_status}; fi\n'
        "exit 0\n"
    )
    script.chmod(0o755)


def run(args: list[str], path: str, docker_config: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path, "HOME": str(docker_config.parent), "DOCKER_CONFIG": str(docker_config)}
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30, check=False
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    bin_dir, calls, config = tmp_path / "bin", tmp_path / "calls.txt", tmp_path / "docker-config"
    config.mkdir()
    return bin_dir, calls, config


def logged_in(config: Path, registry_key: str) -> None:
    (config / "config.json").write_text(json.dumps({"auths": {registry_key: {"auth": "eDp5"}}}))


def test_dry_run_prints_build_tag_and_push_with_the_vllm_version(setup: tuple[Path, Path, Path]) -> None:
    _, _, config = setup
    result = run(["--dry-run", "alice", "0.1.0"], "/usr/bin:/bin", config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("docker build ") and "--tag alice/vllm-inference-api:0.1.0" in lines[0]
    assert lines[1:] == [
        f"docker tag alice/vllm-inference-api:0.1.0 alice/vllm-inference-api:0.1.0-vllm{VLLM_VERSION}",
        "docker push alice/vllm-inference-api:0.1.0",
        f"docker push alice/vllm-inference-api:0.1.0-vllm{VLLM_VERSION}",
    ]


def test_cpu_builds_on_vllms_cpu_image(setup: tuple[Path, Path, Path]) -> None:
    _, _, config = setup
    result = run(["--dry-run", "--cpu", "--no-push", "alice", "0.1.0"], "/usr/bin:/bin", config)
    assert f"--build-arg BASE_IMAGE=vllm/vllm-openai-cpu:v{VLLM_VERSION}-x86_64" in result.stdout
    assert result.stdout.splitlines()[-1].endswith(f"alice/vllm-inference-api:0.1.0-vllm{VLLM_VERSION}-cpu")
    assert "push" not in result.stdout


def test_without_docker_it_says_to_install_it(setup: tuple[Path, Path, Path]) -> None:
    bin_dir, _, config = setup
    bin_dir.mkdir()
    for name in ("dirname", "sed"):  # what the script needs before it looks for docker
        (bin_dir / name).symlink_to(shutil.which(name))
    result = run(["alice", "0.1.0"], str(bin_dir), config)
    assert result.returncode == 1
    assert "docker not found" in result.stderr


def test_without_a_daemon_it_says_so(setup: tuple[Path, Path, Path]) -> None:
    bin_dir, calls, config = setup
    fake_docker(bin_dir, calls, daemon_up=False)
    result = run(["alice", "0.1.0"], f"{bin_dir}:/usr/bin:/bin", config)
    assert result.returncode == 1
    assert "Docker daemon does not answer" in result.stderr


@pytest.mark.parametrize(("user", "login"), [("alice", "docker login"), ("ghcr.io/alice", "docker login ghcr.io")])
def test_without_a_login_it_names_the_login_command(setup: tuple[Path, Path, Path], user: str, login: str) -> None:
    bin_dir, calls, config = setup
    fake_docker(bin_dir, calls)
    result = run([user, "0.1.0"], f"{bin_dir}:/usr/bin:/bin", config)
    assert result.returncode == 1
    assert f"run '{login}' first" in result.stderr
    assert "build" not in calls.read_text()


def test_logged_in_it_builds_tags_and_pushes_both_tags(setup: tuple[Path, Path, Path]) -> None:
    bin_dir, calls, config = setup
    fake_docker(bin_dir, calls)
    logged_in(config, "https://index.docker.io/v1/")
    result = run(["alice", "0.2.0"], f"{bin_dir}:/usr/bin:/bin", config)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in calls.read_text().splitlines()]
    assert commands == ["info", "build", "tag", "push", "push"]
    assert calls.read_text().splitlines()[-1] == f"push alice/vllm-inference-api:0.2.0-vllm{VLLM_VERSION}"


def test_bad_arguments_are_refused(setup: tuple[Path, Path, Path]) -> None:
    _, _, config = setup
    assert "expected <registry-user> <tag>" in run(["alice"], "/usr/bin:/bin", config).stderr
    assert "not a valid image tag" in run(["--dry-run", "alice", "bad tag!"], "/usr/bin:/bin", config).stderr
    assert os.access(SCRIPT, os.X_OK)
