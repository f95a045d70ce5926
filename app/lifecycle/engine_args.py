"""Turn settings into the vLLM OpenAI server's command line and environment.

Users configure the image with environment variables; vLLM takes flags whose
names and formats change between releases (`--limit-mm-per-prompt` takes JSON
since 0.10, for example). This module is the one place that knows the flags of
the pinned vLLM, so the shell entrypoint stays thin and the mapping is unit
tested.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.config import ConfigError, Settings


ENGINE_MEDIA_DOMAIN = "media-fetch.invalid"

# Engine flags that take a setting's value as it is (skipped when the setting is unset).
VALUE_FLAGS = {
    "--gpu-memory-utilization": "GPU_MEMORY_UTIL",
    "--dtype": "DTYPE",
    "--tensor-parallel-size": "TENSOR_PARALLEL_SIZE",
    "--pipeline-parallel-size": "PIPELINE_PARALLEL_SIZE",
    "--data-parallel-size": "DATA_PARALLEL_SIZE",
    "--max-model-len": "MAX_MODEL_LEN",
    "--max-num-seqs": "MAX_NUM_SEQS",
    "--max-num-batched-tokens": "MAX_BATCHED_TOKENS",
    "--distributed-executor-backend": "DISTRIBUTED_EXECUTOR_BACKEND",
    "--quantization": "QUANTIZATION",
    "--tool-call-parser": "TOOL_CALL_PARSER",
    "--reasoning-parser": "REASONING_PARSER",
    "--chat-template": "CHAT_TEMPLATE",
    "--speculative-config": "SPECULATIVE_CONFIG",
    "--kv-cache-dtype": "KV_CACHE_DTYPE",
    "--generation-config": "GENERATION_CONFIG",
    "--load-format": "LOAD_FORMAT",
    "--runner": "RUNNER",
    "--convert": "CONVERT",
    "--mm-processor-cache-gb": "MM_PROCESSOR_CACHE_GB",
}
# Engine switches that a boolean setting turns on.
SWITCH_FLAGS = {
    "--trust-remote-code": "TRUST_REMOTE_CODE",
    "--enforce-eager": "ENFORCE_EAGER",
    "--enable-auto-tool-choice": "ENABLE_AUTO_TOOL_CHOICE",
}
MEDIA_LIMITS = {"image": "IMAGE_LIMIT", "video": "VIDEO_LIMIT", "audio": "AUDIO_LIMIT"}
# The setting behind every flag the image passes, for error messages.
SETTING_OF_FLAG = {
    **VALUE_FLAGS,
    **SWITCH_FLAGS,
    "--enable-chunked-prefill": "ENABLE_CHUNKED_PREFILL",
    "--no-enable-chunked-prefill": "ENABLE_CHUNKED_PREFILL",
    "--limit-mm-per-prompt": "IMAGE_LIMIT, VIDEO_LIMIT or AUDIO_LIMIT",
    "--mm-encoder-tp-mode": "MM_ENCODER_TP_MODE",
    "--max-loras": "MAX_LORAS",
    "--max-lora-rank": "MAX_LORA_RANK",
    "--lora-modules": "LORA_MODULES",
    "--served-model-name": "SERVED_MODEL_NAME",
}


@dataclass(frozen=True)
class EngineLaunch:
    argv: list[str]
    env: dict[str, str]
    device: str


def resolve_device(requested: str) -> str:
    """`auto` means cuda when an NVIDIA GPU is visible, cpu otherwise."""
    if requested != "auto":
        return requested
    if shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir():
        return "cuda"
    return "cpu"


def build_engine_args(
    settings: Settings,
    model_path: str | Path,
    modalities: frozenset[str],
    lora_paths: Mapping[str, Path] | None = None,
) -> list[str]:
    """vLLM OpenAI server flags for these settings (without the program name)."""
    args = [
        "--model", str(model_path),
        "--served-model-name", *settings.served_model_names,
        "--host", "127.0.0.1",
        "--port", str(settings.VLLM_PORT),
        "--enable-chunked-prefill" if settings.ENABLE_CHUNKED_PREFILL else "--no-enable-chunked-prefill",
        "--disable-uvicorn-access-log",
    ]
    for flag, name in VALUE_FLAGS.items():
        value = getattr(settings, name)
        if value is not None:
            args += [flag, str(value)]

    media_limits = {
        modality: getattr(settings, setting) for modality, setting in MEDIA_LIMITS.items() if modality in modalities
    }
    if media_limits:
        args += ["--limit-mm-per-prompt", json.dumps(media_limits, separators=(",", ":"))]
        # The wrapper fetches media itself (SSRF checks) and forwards data: URLs; the
        # engine is told to fetch nothing, for the routes the wrapper does not inspect.
        args += ["--allowed-media-domains", ENGINE_MEDIA_DOMAIN]

    if modalities & {"image", "video"}:
        args += ["--mm-encoder-tp-mode", settings.MM_ENCODER_TP_MODE]
    args += [flag for flag, name in SWITCH_FLAGS.items() if getattr(settings, name)]
    if lora_paths:
        args += ["--enable-lora", "--max-loras", str(settings.MAX_LORAS), "--max-lora-rank", str(settings.MAX_LORA_RANK)]
        args += ["--lora-modules", *(f"{name}={path}" for name, path in lora_paths.items())]

    try:
        extra = shlex.split(settings.VLLM_EXTRA_ARGS)
    except ValueError as exc:
        raise ConfigError(f"Invalid setting VLLM_EXTRA_ARGS: {exc} (quote it like a shell command line)") from None
    return args + extra


def engine_env(settings: Settings, device: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: the caller's, plus what the CPU build needs."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "0")
    if device == "cpu":
        # The CPU build binds its internal queues to the external address and asks
        # for 92% of the NUMA node's memory unless told otherwise.
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        env.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.VLLM_CPU_KVCACHE_SPACE)
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env


def build_engine_launch(
    settings: Settings,
    model_path: str | Path,
    modalities: frozenset[str],
    lora_paths: Mapping[str, Path] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> EngineLaunch:
    device = resolve_device(settings.DEVICE)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    argv += build_engine_args(settings, model_path, modalities, lora_paths)
    return EngineLaunch(argv=argv, env=engine_env(settings, device, base_env), device=device)
