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

# The only host the engine may fetch media from: a reserved name (RFC 2606) that never
# resolves, so the engine fetches nothing. Split layouts (compose, Kubernetes) pass it too.
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


# Secrets that are no setting: the Hub token's older name, the PostgreSQL password the
# conversation store's driver reads, and vLLM's own API key (with it the engine answers
# the wrapper's requests with 401).
# RUNPOD_API_KEY: the key RunPod gives pods for its own API, which the engine has no use for.
WITHHELD_VARIABLES = frozenset({"HUGGING_FACE_HUB_TOKEN", "PGPASSWORD", "VLLM_API_KEY", "RUNPOD_API_KEY"})
# Settings whose variable the engine's libraries read as well.
SETTINGS_THE_ENGINE_READS = frozenset({"HF_HOME"})


def _withheld_names() -> frozenset[str]:
    settings = {name.upper() for name in Settings.model_fields} - SETTINGS_THE_ENGINE_READS
    return WITHHELD_VARIABLES | settings


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
    # The wrapper fetches media itself (SSRF checks) and forwards data: URLs; the engine
    # is told to fetch nothing, whatever the model (modality detection can be wrong).
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


# Where vLLM puts its inter-process sockets: a directory of the engine's own (ChildProcess's private_dir_env).
ENGINE_IPC_DIR_ENV = "VLLM_RPC_BASE_PATH"


def engine_env(settings: Settings, device: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: the container's, without the wrapper's settings and secrets.

    The rule is a denylist, on purpose. The engine needs whatever the operator set
    for vLLM, CUDA, NCCL, torch, OpenMP, Ray, libfabric or a model loader
    (`VLLM_*`, `CUDA_VISIBLE_DEVICES`, `NCCL_*`, `OMP_NUM_THREADS`, `LD_PRELOAD`,
    cloud storage credentials, ...): an allowlist would have to know all of them
    and would drop the next one silently. What the engine must not see is known
    exactly: every variable named by a setting in app/config.py (its flags carry
    what it needs of them; VLLM_PORT would also move vLLM's internal ports),
    except HF_HOME, which the engine's Hugging Face libraries read too; and
    WITHHELD_VARIABLES. Names are matched in any case, as settings are. The
    model and its adapters are on disk before the engine starts, so the engine
    needs no Hub token.
    """
    source = os.environ if base is None else base
    env = {name: value for name, value in source.items() if name.upper() not in _withheld_names()}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Belt and braces with --allowed-media-domains: a media fetch never follows a redirect.
    env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] = "0"
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
