"""A RunPod Serverless cold start: a cached vision model, served offline, compiled onto the volume, warmed up.

RunPod places the model an endpoint selects under
`/runpod-volume/huggingface-cache/hub/models--ORG--NAME/snapshots/SHA/`, with the
folder name lower-cased and none of the metadata huggingface_hub writes beside
its own downloads. That layout is built here from the tiny Qwen2-VL, in a
directory that stands in for `/runpod-volume` (CACHE_VOLUMES; a `/workspace`
stand-in exists too, and must lose). The Hub double (tests/fakehub.py) serves
the same repository and downloads are allowed, so a request to the Hub would
succeed and be counted: none may be made.

One stack, started as a user would with `MODEL_NAME=Org/Tiny-Qwen2-VL`, in
graph mode (ENFORCE_EAGER=false) so that the engine compiles; it shows:

- the cached snapshot served under the name asked for, with zero Hub requests;
- the compiled graphs written to the volume, in the folder keyed by this
  configuration (vLLM's CPU build cannot load them back: it recompiles);
- the warm-up: the engine answered a text and an image request before /ping
  turned 200 (its own request counter says so), and its time is reported.
  How much it saves the first client is a speed figure: README, "Cold start".
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.fakehub import FakeHub, hub_environment
from tests.stack import Stack, engine_gauge, kill_tree, model_dir, port, start_stack

MODEL_ID = "Org/Tiny-Qwen2-VL"
RUNPOD_FOLDER = "models--org--tiny-qwen2-vl"  # RunPod lower-cases it
SNAPSHOT = "317b7eb96312eda0c431d1dab1af958a308cb35e"
JSON = {"Content-Type": "application/json"}


@dataclass
class ColdStart:
    stack: Stack
    volume: Path
    snapshot: Path
    engine_requests_at_ready: float  # the engine's own count of finished requests when /ping first said 200


def place_like_runpod(source: Path, hub_cache: Path) -> Path:
    """Blobs and snapshot symlinks, lower-cased folder, no refs/ and no trees/."""
    storage = hub_cache / RUNPOD_FOLDER
    snapshot = storage / "snapshots" / SNAPSHOT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))):
        blob = storage / "blobs" / f"{index:064x}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def image_request(color: tuple[int, int, int]) -> dict[str, object]:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "What is in the image?"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def wait_for_ping_200(stack: Stack, timeout_s: float = 420.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert stack.process.poll() is None, stack.raw_log()[-4000:]
        try:
            if httpx.get(f"{stack.base_url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"/ping not 200 after {timeout_s}s:\n{stack.raw_log()[-4000:]}")


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub({MODEL_ID: model_dir("tiny-qwen2-vl")}) as fake:
        yield fake


@pytest.fixture(scope="module")
def coldstart(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ColdStart]:
    mounts = tmp_path_factory.mktemp("mounts")
    volume, workspace = mounts / "runpod-volume", mounts / "workspace"
    workspace.mkdir()
    snapshot = place_like_runpod(model_dir("tiny-qwen2-vl"), volume / "huggingface-cache" / "hub")
    hub.reset_counters()
    stack = start_stack(
        MODEL_ID,
        port=port(75),
        vllm_port=port(76),
        log_path=tmp_path_factory.mktemp("logs") / "coldstart.log",
        extra_env={
            **hub_environment(hub),
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": "",
            "HF_HOME": str(mounts / "home"),
            "CACHE_VOLUMES": f"{volume},{workspace}",
            "ENFORCE_EAGER": "false",
            "MAX_MODEL_LEN": "2048",
            "IMAGE_LIMIT": "1",
            "VIDEO_LIMIT": "0",
        },
        wait=False,
    )
    try:
        wait_for_ping_200(stack)
        # Before any client request: what the engine has answered so far is the warm-up.
        at_ready = engine_gauge(stack.engine_url, "vllm:request_success_total")
        yield ColdStart(stack, volume, snapshot, at_ready)
    finally:
        stack.stop(signal.SIGTERM, timeout_s=60)
        kill_tree(stack.process.pid)


def test_the_runpod_cached_model_is_served_under_its_name_with_zero_hub_requests(
    coldstart: ColdStart, hub: FakeHub
) -> None:
    assert dict(hub.requests) == {}
    health = httpx.get(f"{coldstart.stack.base_url}/health", timeout=5).json()
    assert health["model_path"] == str(coldstart.snapshot) and health["resolved_revision"] == SNAPSHOT
    assert "downloading" not in health["phase_seconds"]
    models = httpx.get(f"{coldstart.stack.base_url}/v1/models", timeout=10).json()
    assert [model["id"] for model in models["data"]] == [MODEL_ID]
    reply = httpx.post(
        f"{coldstart.stack.base_url}/v1/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["model"] == MODEL_ID
    assert dict(hub.requests) == {}


def test_the_compiled_graphs_are_written_to_the_volume_in_this_configurations_folder(coldstart: ColdStart) -> None:
    versions = coldstart.volume / "huggingface-cache" / "vllm-cache"
    (folder,) = [folder for version in versions.iterdir() for folder in version.iterdir()]
    key = json.loads((folder / "key.json").read_text())
    assert key["model"] == MODEL_ID and key["revision"] == SNAPSHOT
    assert "--enforce-eager" not in key["flags"] and "2048" in key["flags"]
    saved = re.findall(r"saved AOT compiled function to (\S+)", coldstart.stack.raw_log())
    assert saved, "the engine compiled nothing"
    assert all(Path(path.rstrip('",')).is_relative_to(folder / "torch_compile_cache") for path in saved), saved
    assert any((folder / "torch_compile_cache").rglob("*")), "nothing was written"
    assert not (coldstart.volume.parent / "workspace" / "huggingface-cache").exists()  # /runpod-volume won


def test_the_warm_up_ran_before_ready_and_its_time_is_reported(coldstart: ColdStart) -> None:
    logs = coldstart.stack.logs()
    (warmup,) = [line for line in logs if line["message"] == "warm-up done"]
    assert warmup["sent"] == ["chat", "image"]
    # The engine's own counter: both requests reached it before /ping said 200.
    assert coldstart.engine_requests_at_ready >= 2
    health = httpx.get(f"{coldstart.stack.base_url}/health", timeout=5).json()
    info = httpx.get(f"{coldstart.stack.base_url}/info", timeout=30).json()
    assert health["phase_seconds"]["warmup"] > 0
    assert info["startup"]["warmup"] == health["phase_seconds"]["warmup"]
    reply = httpx.post(f"{coldstart.stack.base_url}/v1/chat/completions", json=image_request((40, 90, 160)), timeout=120)
    assert reply.status_code == 200, reply.text
