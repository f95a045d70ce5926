"""Each memory retry changes the setting the failure names, once.

The failures are the real output of vLLM's CPU engine failing to start
(tests/fixtures/engine_failures, see its README). "No room for the cache
blocks" is the same text on a GPU (vllm/v1/core/kv_cache_utils.py), so its
fixture is read with GPU settings; the GPU-only texts (free memory below the
utilisation, CUDA out of memory) cannot be produced here and are one line
copied from the pinned vLLM and torch sources, as in test_startup_errors.py.

The last test runs the supervisor's own loop against a stand-in engine that
prints a fixture and exits until its environment carries the changed
setting, and reads the change where /health shows it (the status file).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from app.config import Settings, load_settings
from app.lifecycle import supervisor as supervisor_module
from app.lifecycle.engine_args import EngineLaunch
from app.lifecycle.memory_retry import Change, plan_retry
from app.lifecycle.model_source import PreparedModel
from app.lifecycle.startup_errors import classify_engine_failure
from app.lifecycle.status import Phase, read_status
from app.lifecycle.supervisor import Supervisor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "engine_failures"
GPU_FREE_MEMORY_SHORT = (
    "ValueError: Free memory on device cuda:0 (10.5/23.68 GiB) on startup is less than desired GPU memory "
    "utilization (0.9, 21.31 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."
)
CUDA_OUT_OF_MEMORY = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
NOTHING_USED: frozenset[str] = frozenset()


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def cpu(**env: str) -> Settings:
    return load_settings({"DEVICE": "cpu", "MODEL_NAME": "org/model", "VLLM_CPU_KVCACHE_SPACE": "1", **env})


def gpu(**env: str) -> Settings:
    return load_settings({"DEVICE": "cuda", "MODEL_NAME": "org/model", **env})


def test_a_kv_cache_too_small_for_the_context_shortens_the_context_to_the_engines_estimate() -> None:
    retry = plan_retry(lines("kv_cache_too_small.log"), cpu(MAX_MODEL_LEN="4194304"), "cpu", NOTHING_USED)

    assert retry is not None and retry.knob == "context"
    assert retry.changes == (Change("MAX_MODEL_LEN", 4194304, 2097024),)
    assert retry.settings.MAX_MODEL_LEN == 2097024
    assert retry.settings.ENFORCE_EAGER is False  # nothing the failure did not name


def test_a_kv_cache_larger_than_the_memory_left_shrinks_vllm_cpu_kvcache_space() -> None:
    # "Available memory on node 0 (14.43/18.59 GiB) on kv cache allocation is less than requested memory for kv (64.0 GiB)"
    retry = plan_retry(lines("kv_cache_exceeds_memory.log"), cpu(VLLM_CPU_KVCACHE_SPACE="64"), "cpu", NOTHING_USED)

    assert retry is not None and retry.knob == "kv_cache"
    assert retry.changes == (Change("VLLM_CPU_KVCACHE_SPACE", 64, 13),)  # 14.43 GiB left, less 1 GiB


def test_available_memory_below_the_utilisation_lowers_the_utilisation() -> None:
    # "Available memory on node 0 (14.76/18.59 GiB) on startup is less than desired CPU memory utilization (0.92, ...)"
    retry = plan_retry(lines("kvcache_space_unset.log"), cpu(GPU_MEMORY_UTIL="0.92"), "cpu", NOTHING_USED)

    assert retry is not None and retry.knob == "utilisation"
    assert retry.changes == (Change("GPU_MEMORY_UTIL", 0.92, 0.77),)  # 14.76 / 18.59 = 0.79, less 0.02


def test_free_gpu_memory_below_the_utilisation_lowers_the_utilisation() -> None:
    retry = plan_retry([GPU_FREE_MEMORY_SHORT], gpu(), "cuda", NOTHING_USED)

    assert retry is not None
    assert retry.changes == (Change("GPU_MEMORY_UTIL", 0.9, 0.42),)  # 10.5 / 23.68 = 0.44, less 0.02


def test_no_room_for_the_cache_blocks_on_a_gpu_makes_the_batch_smaller() -> None:
    retry = plan_retry(lines("kv_cache_zero.log"), gpu(), "cuda", NOTHING_USED)

    assert retry is not None and retry.knob == "batch"
    assert retry.changes == (Change("MAX_NUM_SEQS", None, 128), Change("MAX_BATCHED_TOKENS", None, 1024))


def test_a_set_batch_is_halved_and_a_cuda_out_of_memory_also_names_the_batch() -> None:
    retry = plan_retry([CUDA_OUT_OF_MEMORY], gpu(MAX_NUM_SEQS="256", MAX_BATCHED_TOKENS="8192"), "cuda", NOTHING_USED)

    assert retry is not None
    assert retry.changes == (Change("MAX_NUM_SEQS", 256, 128), Change("MAX_BATCHED_TOKENS", 8192, 4096))


def test_without_chunked_prefill_the_step_size_stays() -> None:
    settings = gpu(MAX_NUM_SEQS="64", ENABLE_CHUNKED_PREFILL="false", MAX_BATCHED_TOKENS="8192")

    retry = plan_retry(lines("kv_cache_zero.log"), settings, "cuda", NOTHING_USED)

    assert retry is not None and retry.changes == (Change("MAX_NUM_SEQS", 64, 32),)


def test_no_room_for_the_cache_blocks_on_the_cpu_has_no_batch_to_blame() -> None:
    # The CPU build's KV cache has the fixed size VLLM_CPU_KVCACHE_SPACE: the classifier's sentence says to raise it.
    assert plan_retry(lines("kv_cache_zero.log"), cpu(), "cpu", NOTHING_USED) is None


@pytest.mark.parametrize(
    ("fixture", "settings", "device", "knob"),
    [
        ("kv_cache_too_small.log", cpu(MAX_MODEL_LEN="4194304"), "cpu", "context"),
        ("kv_cache_exceeds_memory.log", cpu(VLLM_CPU_KVCACHE_SPACE="64"), "cpu", "kv_cache"),
        ("kvcache_space_unset.log", cpu(GPU_MEMORY_UTIL="0.92"), "cpu", "utilisation"),
        ("kv_cache_zero.log", gpu(), "cuda", "batch"),
    ],
)
def test_a_setting_is_changed_at_most_once(fixture: str, settings: Settings, device: str, knob: str) -> None:
    failure = lines(fixture)
    first = plan_retry(failure, settings, device, NOTHING_USED)
    assert first is not None and first.knob == knob

    assert plan_retry(failure, first.settings, device, frozenset({knob})) is None
    assert classify_engine_failure(failure, first.settings) is not None  # then the start fails with the sentence


@pytest.mark.parametrize("fixture", ["bad_flag.log", "max_model_len_too_large.log", "unsupported_architecture.log"])
def test_failures_that_are_not_about_memory_are_not_retried(fixture: str) -> None:
    assert plan_retry(lines(fixture), cpu(MAX_MODEL_LEN="100000"), "cpu", NOTHING_USED) is None


# --- the supervisor's loop -------------------------------------------------------------

# Prints the fixture and exits 1 while VLLM_CPU_KVCACHE_SPACE is 64; otherwise answers GET /health.
ENGINE_STAND_IN = """
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
if os.environ["VLLM_CPU_KVCACHE_SPACE"] == "64":
    print(open(sys.argv[2]).read(), flush=True)
    sys.exit(1)
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_the_supervisor_retries_with_the_changed_setting_and_publishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings({
        "DEVICE": "cpu", "MODEL_NAME": str(tmp_path), "VLLM_PORT": str(free_port()), "VLLM_CPU_KVCACHE_SPACE": "64",
        "WARMUP": "false", "HF_HOME": str(tmp_path / "cache"), "CACHE_VOLUMES": str(tmp_path / "no-volume"),
    })
    launches: list[EngineLaunch] = []

    def launch(settings: Settings, *args: object, **kwargs: object) -> EngineLaunch:
        env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.VLLM_CPU_KVCACHE_SPACE)}
        argv = [sys.executable, "-c", ENGINE_STAND_IN, str(settings.VLLM_PORT),
                str(FIXTURES / "kv_cache_exceeds_memory.log")]
        launches.append(EngineLaunch(argv, env, "cpu"))
        return launches[-1]

    async def prepared(self: Supervisor) -> PreparedModel:
        return PreparedModel(path=tmp_path, revision=None, lora_paths={}, offline=True)

    monkeypatch.setattr(supervisor_module, "build_engine_launch", launch)
    monkeypatch.setattr(Supervisor, "_prepare_model", prepared)
    supervisor = Supervisor(settings, tmp_path)
    async with aiohttp.ClientSession() as session:
        supervisor.session = session
        lifecycle = asyncio.ensure_future(supervisor._lifecycle())
        try:
            while (status := read_status(supervisor.board.path)) is None or status.phase != Phase.READY:
                assert not lifecycle.done(), lifecycle.result()
                await asyncio.sleep(0.1)
        finally:
            lifecycle.cancel()
            if supervisor.engine is not None:
                await supervisor.engine.kill()

    assert [launch.env["VLLM_CPU_KVCACHE_SPACE"] for launch in launches] == ["64", "13"]
    published = json.loads(supervisor.board.path.read_text())["startup_adjustments"]
    assert published == [{"setting": "VLLM_CPU_KVCACHE_SPACE", "from": 64, "to": 13,
                          "reason": "the KV cache is larger than the memory left"}]
