"""The image itself, built and run as a user would: Dockerfile, HEALTHCHECK, signals.

The other end-to-end tests run `scripts/start.sh` on the host; this one proves
the packaging: the project Dockerfile builds on a vLLM CPU base image, the
container's own HEALTHCHECK turns healthy once the model is served, a chat
completion works through the published port, and SIGTERM drains an in-flight
stream and ends the container with exit code 0.

The `baked` target is built as a user would build it, with
`build_and_push.sh --bake org/Tiny-Llama --hf-token-file FILE --no-push`, from
the local Hub double (tests/fakehub.py: the Hub cannot be reached here; the
build step reaches it on the host's network). The model is gated there, so
the build needs the token, passed as a BuildKit secret; afterwards the token
is in no layer, no history entry and no image setting. The baked image is then
started with no network at all (`--network none`) and serves the model under
its Hub name.

No registry is reachable here, so the base image is assembled locally by
`tools/docker/build_cpu_base.sh` (about 90 s the first time, cached after).
The Docker daemon is started by `tools/docker/dockerd.sh` when none answers,
and stopped again afterwards. Budget: about 5 minutes fresh, 3 cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fakehub import FakeHub
from tests.stack import model_dir, port

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "vllm-inference-api/cpu-base:local"
BASE_LABEL = "vllm-inference-api.cpu-base.fingerprint"  # set by tools/docker/build_cpu_base.sh
IMAGE = "vllm-inference-api:smoke-test"
CONTAINER = "vllm-inference-api-smoke"
HOST_PORT = port(730)
DRAIN_TIMEOUT_S = 20
HEALTHY_TIMEOUT_S = 420
SERVED_NAME = "tiny-chat"
BAKED_MODEL = "org/Tiny-Llama"
BAKED_IMAGE = "local/vllm-inference-api:smoke-test-tiny-llama-cpu"  # what build_and_push.sh tags it
BAKED_CONTAINER = "vllm-inference-api-smoke-baked"
BUILD_TOKEN = "hf_smoke_build_secret_token_4711"


@dataclass(frozen=True)
class Docker:
    """A Docker client that can build with BuildKit (RUN --mount), and its environment."""

    cli: str
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.cli, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )


def _buildkit_client() -> str | None:
    """`docker` with buildx, or Debian's 20.10 client, which has BuildKit built in."""
    override = os.environ.get("DOCKER")
    if override:
        return override
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "buildx", "version"], capture_output=True, check=False).returncode == 0
    ):
        return "docker"
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return None


def _missing_prerequisite() -> str | None:
    if _buildkit_client() is None:
        return "no Docker client with BuildKit: apt-get install docker.io (tools/setup_system.sh)"
    if (
        shutil.which("dockerd") is None
        and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0
    ):
        return "no Docker daemon and no dockerd to start: apt-get install docker.io"
    if os.geteuid() != 0:
        return "building the local CPU base image needs root (debootstrap, chroot)"
    if shutil.which("debootstrap") is None:
        return "debootstrap missing: apt-get install debootstrap (tools/setup_system.sh)"
    return None


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    missing = _missing_prerequisite()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"container smoke test cannot run in CI: {missing}")
        pytest.skip(missing)
    cli = _buildkit_client()
    assert cli is not None
    client = Docker(cli, {**os.environ, "DOCKER_BUILDKIT": "1", "DOCKER": cli})
    started_here = client.run("version", "--format", "{{.Server.Version}}", check=False).returncode != 0
    if started_here:
        subprocess.run([str(ROOT / "tools/docker/dockerd.sh"), "start"], check=True, timeout=120)
    yield client
    # Release what this run superseded, a whole base image (4 GB) each time the base changes: earlier
    # builds of the project's images (untagged now; all carry the base's label) and the build cache
    # that pins their layers. Only dangling entries go; tagged images and live cache stay.
    client.run("image", "prune", "--force", "--filter", f"label={BASE_LABEL}", check=False)
    client.run("builder", "prune", "--force", check=False)
    if started_here:
        subprocess.run([str(ROOT / "tools/docker/dockerd.sh"), "stop"], check=True, timeout=120)


@pytest.fixture(scope="module")
def image(docker: Docker) -> str:
    subprocess.run([str(ROOT / "tools/docker/build_cpu_base.sh"), BASE_IMAGE], env=docker.env, check=True, timeout=900)
    # The host network, as for the baked build (its Hub double listens on the host): the same cache
    # keys, so the baked image is this image plus the bake step's layer.
    build = docker.run(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", IMAGE, str(ROOT),
        timeout=900, check=False,
    )
    assert build.returncode == 0, f"docker build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    return IMAGE


@pytest.fixture(scope="module")
def container(docker: Docker, image: str) -> Iterator[str]:
    """The image started like the README's `docker run` on a CPU, with the tiny model mounted."""
    docker.run("rm", "--force", CONTAINER, check=False)
    models = model_dir("tiny-llama").parent
    docker.run(
        "run",
        "--detach",
        "--name",
        CONTAINER,
        "--shm-size",
        "1g",
        "--cap-add",
        "SYS_NICE",
        "--publish",
        f"127.0.0.1:{HOST_PORT}:8000",
        "--volume",
        f"{models}:/models:ro",
        "--env",
        "MODEL_NAME=/models/tiny-llama",
        "--env",
        f"SERVED_MODEL_NAME={SERVED_NAME}",
        "--env",
        "DEVICE=cpu",
        "--env",
        "ENFORCE_EAGER=true",
        "--env",
        "VLLM_CPU_KVCACHE_SPACE=1",
        "--env",
        "MAX_MODEL_LEN=512",
        "--env",
        f"DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
        "--env",
        "HF_HUB_OFFLINE=1",
        image,
    )
    yield CONTAINER
    logs = docker.run("logs", "--tail", "40", CONTAINER, check=False)
    print(f"--- last container log lines ---\n{logs.stdout}{logs.stderr}")
    docker.run("rm", "--force", CONTAINER, check=False)


def _state(docker: Docker, name: str) -> dict[str, object]:
    return json.loads(docker.run("inspect", "--format", "{{json .State}}", name).stdout)


def _wait_healthy(docker: Docker, name: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < HEALTHY_TIMEOUT_S:
        state = _state(docker, name)
        health = state.get("Health") or {}
        if health.get("Status") == "healthy":
            return time.monotonic() - start
        if state["Status"] != "running" or health.get("Status") == "unhealthy":
            logs = docker.run("logs", "--tail", "60", name, check=False)
            pytest.fail(f"container {state['Status']}, health {health.get('Status')}:\n{logs.stdout}{logs.stderr}")
        time.sleep(2)
    pytest.fail(f"container not healthy after {HEALTHY_TIMEOUT_S} s")


def test_image_runs_tini_as_pid1_and_declares_healthcheck(docker: Docker, image: str) -> None:
    config = json.loads(docker.run("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["Entrypoint"][:2] == ["tini", "--"]
    assert config["Entrypoint"][2].endswith("scripts/start.sh")
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/ping" in " ".join(config["Healthcheck"]["Test"])
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in config["Env"]


def test_container_turns_healthy_and_serves_chat(docker: Docker, container: str) -> None:
    # /ping answers 204 while the engine loads: the container must stay "starting" until 200.
    waited = _wait_healthy(docker, container)
    print(f"healthy after {waited:.0f} s")
    assert httpx.get(f"http://127.0.0.1:{HOST_PORT}/ping", timeout=5).status_code == 200

    reply = httpx.post(
        f"http://127.0.0.1:{HOST_PORT}/v1/chat/completions",
        json={"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == SERVED_NAME
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 8

    pid1 = docker.run("exec", container, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert Path(pid1[0]).name == "tini"


def test_sigterm_drains_inflight_stream_and_exits_zero(docker: Docker, container: str) -> None:
    _wait_healthy(docker, container)
    request = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": "Count"}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"http://127.0.0.1:{HOST_PORT}/v1/chat/completions", json=request, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        docker.run("kill", "--signal", "TERM", container)
        signalled = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    assert first
    # The request that was running when SIGTERM arrived finished normally.
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["length"]

    while _state(docker, container)["Status"] == "running":
        assert time.monotonic() - signalled < DRAIN_TIMEOUT_S + 15, "container still running after the drain time"
        time.sleep(0.5)
    assert _state(docker, container)["ExitCode"] == 0


# --- the baked target ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baked_image(docker: Docker, image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`build_and_push.sh --bake`, on the CPU base, from the Hub double where the model is gated."""
    work = tmp_path_factory.mktemp("bake")
    token_file = work / "hf_token"
    token_file.write_text(BUILD_TOKEN)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").symlink_to(shutil.which(docker.cli) or docker.cli)  # the client with BuildKit
    with FakeHub(
        {BAKED_MODEL: model_dir("tiny-llama")}, gated={BAKED_MODEL}, tokens={BUILD_TOKEN: {BAKED_MODEL}}
    ) as hub:
        build = subprocess.run(
            [str(ROOT / "build_and_push.sh"), "--no-push", "--cpu", "--bake", BAKED_MODEL,
             "--hf-token-file", str(token_file), "local", "smoke-test"],
            env={
                **docker.env,
                "PATH": f"{bin_dir}:{docker.env.get('PATH', '')}",
                "BASE_IMAGE_CPU": BASE_IMAGE,
                "HF_ENDPOINT": hub.url,
                "DOCKER_BUILD_FLAGS": "--network host --progress plain",
            },
            capture_output=True, text=True, timeout=900, check=False,
        )
        weights_fetched = hub.bytes_served.get("model.safetensors", 0)
    assert build.returncode == 0, f"build_and_push.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    assert weights_fetched > 0, "the gated weights were not fetched: was the token used?"
    return BAKED_IMAGE


@pytest.fixture(scope="module")
def baked_container(docker: Docker, baked_image: str) -> Iterator[str]:
    """The baked image with no network: nothing to download from, no Hub to ask."""
    docker.run("rm", "--force", BAKED_CONTAINER, check=False)
    docker.run(
        "run", "--detach", "--name", BAKED_CONTAINER, "--network", "none", "--shm-size", "1g",
        "--env", "DEVICE=cpu", "--env", "ENFORCE_EAGER=true", "--env", "VLLM_CPU_KVCACHE_SPACE=1",
        "--env", "MAX_MODEL_LEN=512",
        baked_image,
    )
    yield BAKED_CONTAINER
    logs = docker.run("logs", "--tail", "40", BAKED_CONTAINER, check=False)
    print(f"--- last baked container log lines ---\n{logs.stdout}{logs.stderr}")
    docker.run("rm", "--force", BAKED_CONTAINER, check=False)


def _inside(docker: Docker, container: str, *curl_args: str) -> dict[str, object]:
    """A request from inside the container (it has no network to publish a port on)."""
    result = docker.run("exec", container, "curl", "--silent", "--max-time", "60", *curl_args)
    return json.loads(result.stdout)


def test_the_baked_image_starts_with_no_network_and_serves_under_the_model_name(
    docker: Docker, baked_container: str
) -> None:
    _wait_healthy(docker, baked_container)

    reply = _inside(
        docker, baked_container, "http://127.0.0.1:8000/v1/chat/completions", "-H", "Content-Type: application/json",
        "-d", json.dumps({"model": BAKED_MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}),
    )
    assert reply["model"] == BAKED_MODEL and reply["usage"]["completion_tokens"] == 4
    health = _inside(docker, baked_container, "http://127.0.0.1:8000/health")
    assert health["model_path"] == "/opt/model" and "downloading" not in health["phase_seconds"]
    networks = docker.run("inspect", "--format", "{{json .NetworkSettings.Networks}}", baked_container).stdout
    assert list(json.loads(networks)) == ["none"]


def test_the_build_token_is_in_no_layer_history_or_setting(docker: Docker, image: str, baked_image: str) -> None:
    history = docker.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", baked_image).stdout
    assert "BAKE_MODEL=org/Tiny-Llama" in history  # the build arguments are there, the secret is not
    assert BUILD_TOKEN not in history
    assert BUILD_TOKEN not in docker.run("image", "inspect", baked_image).stdout
    # Only the bake step sees the secret, and it adds exactly one layer to the runtime image, with no
    # later layer that could hide a file it wrote: so its files are all in the baked image's filesystem.
    runtime_layers, baked_layers = (
        json.loads(docker.run("image", "inspect", "--format", "{{json .RootFS.Layers}}", name).stdout)
        for name in (image, baked_image)
    )
    assert baked_layers[:-1] == runtime_layers and len(baked_layers) == len(runtime_layers) + 1
    # Every file of that filesystem, binary ones included, searched in place: no export to disk.
    search = docker.run(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", baked_image, "-c",
        'grep --recursive --files-with-matches --fixed-strings --devices=skip -- "$0" '
        '$(ls -d /* | grep -vxE "/(proc|sys|dev)")',
        BUILD_TOKEN,
        timeout=900, check=False,
    )
    assert search.returncode == 1, f"grep found the token or failed: {search.stdout}{search.stderr}"
