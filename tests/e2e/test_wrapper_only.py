"""Wrapper-only mode (ENGINE_URL): the wrapper fronts an engine it did not start.

This is the two-container layout: the engine runs as its own process (here
started directly with `python -m vllm.entrypoints.openai.api_server`, in its
own process group, as a separate container would run it) and the stack is
started with ENGINE_URL pointing at it. The tests prove that the wrapper then
serves probes, inference, metrics and request logs for the remote engine;
that an engine outage is reported as `engine_unavailable` with a retryable 503
and heals by itself once the engine is back on the same address, without a
wrapper restart; and that SIGTERM stops the wrapper at once with exit code 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import TEXT_MODEL
from tests.stack import ROOT, Stack, kill_tree, model_dir, port, start_stack

ENGINE_START_TIMEOUT_S = 420.0
OUTAGE_DETECTION_BOUND_S = 60.0


class RemoteEngine:
    """A vLLM CPU engine in its own process group, started and killed by the test."""

    def __init__(self, engine_port: int, log_path: Path) -> None:
        self.port = engine_port
        self.url = f"http://127.0.0.1:{engine_port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("VLLM_")}
        env.update({
            "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
        })
        argv = [
            str(ROOT / ".venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir("tiny-llama")), "--served-model-name", TEXT_MODEL,
            "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager", "--max-model-len", "2048",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"engine not healthy after {ENGINE_START_TIMEOUT_S}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole process group (API server and engine core), like a crashed container."""
        if self.process is None or self.process.poll() is not None:
            return
        tree = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        _, alive = psutil.wait_procs(tree, timeout=15)
        for process in alive:
            process.kill()


@pytest.fixture(scope="module")
def engine(logs_dir: Path) -> Iterator[RemoteEngine]:
    remote = RemoteEngine(port(61), logs_dir / "remote-engine.log")
    remote.start()
    yield remote
    remote.kill()


@pytest.fixture(scope="module")
def front(engine: RemoteEngine, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack in wrapper-only mode, in front of `engine`."""
    stack = start_stack(
        "unused-in-wrapper-only-mode", port=port(62), vllm_port=port(63), log_path=logs_dir / "front.log",
        extra_env={
            "ENGINE_URL": engine.url, "SERVED_MODEL_NAME": TEXT_MODEL,
            "HF_HOME": str(tmp_path_factory.mktemp("front-hf-home")),
        },
    )
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


def chat_body(max_tokens: int = 8, stream: bool = False) -> dict[str, object]:
    return {
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True, "stream": stream,
    }


def wrapper_pids(stack: Stack) -> set[int]:
    return {p.pid for p in stack.descendants() if "app.serve" in " ".join(p.cmdline())}


def test_wrapper_only_serves_probes_inference_metrics_and_logs(engine: RemoteEngine, front: Stack) -> None:
    health = httpx.get(f"{front.base_url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json()["phase"] == "ready" and health.json()["engine_healthy"] is True
    assert httpx.get(f"{front.base_url}/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{front.base_url}/ping", timeout=5).status_code == 200
    # No engine of its own: only the supervisor's wrapper process runs under the stack.
    commands = [" ".join(p.cmdline()) for p in front.descendants()]
    assert not any("vllm.entrypoints" in command for command in commands), commands
    assert wrapper_pids(front)
    assert httpx.get(f"{front.base_url}/info", timeout=5).json()["engine_url"] == engine.url

    reply = httpx.post(f"{front.base_url}/v1/chat/completions", json=chat_body(8), timeout=60)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"]
    assert reply.json()["usage"]["completion_tokens"] == 8

    metrics = httpx.get(f"{front.base_url}/metrics", timeout=10).text
    assert 'vllm_api_requests_total{model="tiny-chat",route="/v1/chat/completions",status="200"}' in metrics
    assert "vllm_api_engine_metrics_up 1.0" in metrics
    assert "vllm:generation_tokens_total{" in metrics and "vllm:num_requests_running{" in metrics

    line = front.request_line(reply.headers["x-request-id"])
    assert line["status"] == 200 and line["model"] == TEXT_MODEL and line["path"] == "/v1/chat/completions"
    assert line["completion_tokens"] == 8 and line["prompt_tokens"] > 0 and "error" not in line


def test_sigterm_stops_a_wrapper_only_instance_at_once_with_exit_0(
    engine: RemoteEngine, wrapper, tmp_path: Path
) -> None:
    instance = wrapper(engine.url, SERVED_MODEL_NAME=TEXT_MODEL, HF_HOME=str(tmp_path))
    processes = [psutil.Process(instance.process.pid), *instance.descendants()]
    assert httpx.post(f"{instance.base_url}/v1/chat/completions", json=chat_body(4), timeout=60).status_code == 200
    signalled = time.monotonic()
    code = instance.stop(signal.SIGTERM, timeout_s=60)
    stopped_after_s = time.monotonic() - signalled
    assert code == 0
    # Well below the drain deadline (DRAIN_TIMEOUT_S=30): an idle instance does not wait for it.
    assert stopped_after_s < 25, f"an idle wrapper-only instance took {stopped_after_s:.1f}s to stop"
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, [p.pid for p in alive]
    # The remote engine is not the wrapper's to stop.
    assert httpx.get(f"{engine.url}/health", timeout=5).status_code == 200


def test_engine_outage_is_a_retryable_503_and_heals_without_wrapper_restart(engine: RemoteEngine, front: Stack) -> None:
    wrappers_before = wrapper_pids(front)
    engine.kill()

    killed_at = time.monotonic()
    while httpx.get(f"{front.base_url}/health", timeout=5).status_code != 503:
        assert time.monotonic() - killed_at < OUTAGE_DETECTION_BOUND_S, "/health still 200 with the engine gone"
        time.sleep(0.1)
    health = httpx.get(f"{front.base_url}/health", timeout=5).json()
    assert health["phase"] == "engine_unavailable" and health["engine_healthy"] is False
    assert httpx.get(f"{front.base_url}/health/ready", timeout=5).status_code == 503
    assert httpx.get(f"{front.base_url}/health/live", timeout=5).status_code == 200

    for stream in (False, True):
        refused = httpx.post(f"{front.base_url}/v1/chat/completions", json=chat_body(4, stream=stream), timeout=30)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "engine_unavailable"
        assert "ENGINE_URL" in error["message"] and "not reachable" in error["message"]
        line = front.request_line(refused.headers["x-request-id"])
        assert line["status"] == 503 and line["error"] == "unavailable"
    refused = httpx.post(f"{front.base_url}/generate", json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "engine_unavailable"
    # Metrics keep answering, and say the engine's series are missing.
    metrics = httpx.get(f"{front.base_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "vllm_api_engine_metrics_up 0.0" in metrics.text

    engine.start()
    front.wait_ready(timeout_s=60)
    assert front.process.poll() is None
    assert wrapper_pids(front) == wrappers_before, "the wrapper was restarted"
    reply = httpx.post(f"{front.base_url}/v1/chat/completions", json=chat_body(8), timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    assert httpx.get(f"{front.base_url}/health", timeout=5).json()["phase"] == "ready"
