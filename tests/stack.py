"""Start the real stack (`scripts/start.sh`) as a subprocess for end-to-end tests.

The stack is started exactly as the container starts it: the entrypoint, the
supervisor, the CPU engine and the wrapper, configured by environment
variables only. Its JSON log lines go to a file so tests can read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.config import Settings

SETTING_NAMES = frozenset(Settings.model_fields)

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("TEST_MODELS_DIR", ROOT / ".models"))
START_SH = ROOT / "scripts" / "start.sh"
ENGINE_READY_TIMEOUT_S = 420.0
# How long a test waits for an event (a counter, a state) before it fails: the machine may be busy.
EVENT_TIMEOUT_S = 120.0
# A request's log line follows its response; on a busy machine, a while after.
LOG_LINE_TIMEOUT_S = 60.0
# Every stack port is PORT_BASE + a fixed offset, so two test runs on one
# machine can use different bases (E2E_PORT_BASE) without colliding.
PORT_BASE = int(os.environ.get("E2E_PORT_BASE", "9000"))


def port(offset: int) -> int:
    return PORT_BASE + offset

# Small and fast on two CPU cores: eager mode (no compile), a 1 GiB KV cache.
CPU_ENGINE_ENV = {
    "DEVICE": "cpu",
    "ENFORCE_EAGER": "true",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "2",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "DEBUG",
    "HF_HUB_OFFLINE": "1",
}

# SmolLM2's greedy first token for "What is the capital of France?" is a near tie
# between "The" and "L" in bfloat16, and which way it falls depends on the CPU's
# bf16 kernels (machines with AMX / AVX512-BF16 answer "L'Étoile..."). In float32
# "The capital of France is Paris." wins by 0.1 in log-probability.
SMOLLM2_ENV = {"DTYPE": "float32"}


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    base_url: str
    engine_url: str
    log_path: Path
    env: dict[str, str]
    _log_file: object = field(repr=False, default=None)
    health_history: list[int] = field(default_factory=list)

    def logs(self) -> list[dict[str, object]]:
        """Every JSON line the stack wrote so far (non-JSON lines fail the caller's checks)."""
        text = self.log_path.read_text(errors="replace")
        # A last line without its newline is still being written: it is not a line yet.
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(raw) for raw in complete.split("\n") if raw.strip()]

    def raw_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request_lines(self) -> list[dict[str, object]]:
        return [line for line in self.logs() if line.get("logger") == "app.access"]

    def request_line(self, request_id: str, timeout_s: float = LOG_LINE_TIMEOUT_S) -> dict[str, Any]:
        """The one access-log line of the request with this X-Request-ID.

        The wrapper writes it after the response has left, so a client that has its
        answer may still be ahead of the line: wait for it.
        """
        lines = self.wait_for_request_lines(lambda line: line.get("request_id") == request_id, 1, timeout_s)
        assert len(lines) == 1, f"expected one log line for request {request_id}, found {lines}"
        return lines[0]

    def wait_for_request_lines(
        self, keep: Callable[[dict[str, Any]], bool], count: int, timeout_s: float = LOG_LINE_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """The access-log lines that `keep` selects, once there are at least `count` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in self.request_lines() if keep(line)]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout_s: float = ENGINE_READY_TIMEOUT_S) -> None:
        """Wait for /health 200; a failed start raises at once with the stack's last log lines."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"stack exited with {self.process.returncode}:\n{self.raw_log()[-4000:]}")
            try:
                response = httpx.get(f"{self.base_url}/health", timeout=2)
                status, phase = response.status_code, response.json().get("phase")
            except (httpx.HTTPError, ValueError):
                status, phase = 0, None
            self.health_history.append(status)
            if status == 200:
                return
            if phase == "failed":
                raise RuntimeError(f"stack failed to start: {response.json().get('error')}\n{self.raw_log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"stack not ready after {timeout_s}s:\n{self.raw_log()[-4000:]}")

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 90.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                kill_tree(self.process.pid)
                self.process.wait(10)
        return self.process.returncode


def engine_gauge(engine_url: str, name: str, label: str = "") -> float:
    """Sum of one series' samples in the engine's own /metrics (those that carry `label`, if given)."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") and label in line
    )


def engine_completed(stack: Stack) -> float:
    """Requests the engine finished at their max_tokens (an aborted request is not counted)."""
    return engine_gauge(stack.engine_url, "vllm:request_success_total", 'finished_reason="length"')


def engine_chats_ended(stack: Stack) -> float:
    """Chat requests the engine's API server is done with, however they ended (a client that left included)."""
    return engine_gauge(stack.engine_url, "http_requests_total", 'handler="/v1/chat/completions"')


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = EVENT_TIMEOUT_S) -> None:
    """Poll `condition` until it holds; after `timeout_s`, fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout_s:g} s)"
        time.sleep(0.1)


def assert_engine_stopped_early(stack: Stack, completed_before: float) -> None:
    """Wait until the engine is idle; it must not have completed the request (it was aborted)."""
    wait_until(lambda: engine_gauge(stack.engine_url, "vllm:num_requests_running") == 0, "the engine stayed busy")
    assert engine_completed(stack) == completed_before, "the engine generated the whole reply: it was not aborted"


def engine_process(stack: Stack) -> psutil.Process:
    for process in stack.descendants():
        if "vllm.entrypoints.openai.api_server" in " ".join(process.cmdline()):
            return process
    raise AssertionError("no engine process found")


def engine_processes(stack: Stack) -> list[psutil.Process]:
    """The engine's API server and everything in its process group (engine core, workers)."""
    leader = engine_process(stack)
    group = []
    for process in stack.descendants():
        try:
            if os.getpgid(process.pid) == leader.pid:
                group.append(process)
        except ProcessLookupError:
            pass
    return group


@contextlib.contextmanager
def engine_core_held(stack: Stack) -> Iterator[None]:
    """The engine's core held still (its processes but the API server suspended), then let go.

    Requests reach the engine's API server, which answers `/metrics` and sees a
    client leave, but no token is generated: what the test does meanwhile happens
    before any generation, however fast the engine.
    """
    leader = engine_process(stack)
    held = [process for process in engine_processes(stack) if process.pid != leader.pid]
    assert held, "the engine has no process besides its API server"
    for process in held:
        process.suspend()
    try:
        yield
    finally:
        for process in held:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


def kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()


def start_stack(
    model: str | Path,
    port: int,
    vllm_port: int,
    log_path: Path,
    extra_env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Stack:
    """Start `scripts/start.sh` for `model`; with `wait`, return once /health is 200."""
    # The caller's own settings (a developer's shell, `make`) never leak into a stack: it gets exactly
    # what the test asks for.
    env = {key: value for key, value in os.environ.items() if not _is_setting(key)}
    env.update(CPU_ENGINE_ENV)
    env.update({"MODEL_NAME": str(model), "PORT": str(port), "VLLM_PORT": str(vllm_port), "HOST": "127.0.0.1"})
    # One wrapper process unless a test asks for more: WORKERS=auto would follow the machine's cores.
    env.setdefault("WORKERS", "1")
    env.update(extra_env or {})
    env["PYTHON"] = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else env.get("PYTHON", "python3")
    log_file = open(log_path, "wb")
    process = subprocess.Popen(["bash", str(START_SH)], env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    engine_url = env.get("ENGINE_URL") or f"http://127.0.0.1:{vllm_port}"
    stack = Stack(process, f"http://127.0.0.1:{port}", engine_url, log_path, env, log_file)
    if wait:
        try:
            stack.wait_ready()
        except BaseException:
            stack.stop(signal.SIGKILL)
            kill_tree(process.pid)
            raise
    return stack


def _is_setting(name: str) -> bool:
    return name.upper() in SETTING_NAMES or name.startswith(("VLLM_", "MODEL_"))


def model_dir(name: str) -> Path:
    path = MODELS / name
    if not (path / "config.json").exists():
        raise RuntimeError(f"{path} is missing: run `make models` (tools/build_test_models.py) first")
    return path
