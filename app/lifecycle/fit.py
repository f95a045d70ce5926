"""Will the model fit the engine's memory? Answered from config.json and file sizes, before the download.

Without this check a model too large for the machine is downloaded (minutes
to hours), loaded, and only then refused by the engine, and a RunPod worker
bills for all of it. The weights' size is known from the Hub's file listing,
and the KV cache one sequence needs from config.json (layers, key-value
heads, head size, dtype); the memory the engine gets is known before it
starts: on a GPU, NVML's total memory times GPU_MEMORY_UTIL across the
TENSOR_PARALLEL_SIZE x PIPELINE_PARALLEL_SIZE GPUs of a replica; on the CPU
build, VLLM_CPU_KVCACHE_SPACE for the KV cache and the machine's (or the
container's) memory for everything.

Every estimate here is a lower bound of what the engine will need (no
activations, no CUDA graphs, sliding-window layers counted at their window,
online quantization at its smallest), so a refusal means the engine would
certainly fail; a model that passes may still fail later, and the engine's
own error then says why. Architectures the estimate does not understand
(state-space and linear-attention hybrids) skip the KV-cache part. The
KV-cache part also applies only to a MAX_MODEL_LEN the user set: for the
model's own length the engine's memory retry finds the length that fits.
FIT_CHECK=false turns the check off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import psutil
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from app.config import Settings
from app.lifecycle.download import select_files
from app.lifecycle.engine_args import resolve_device
from app.lifecycle.preflight import RepoListing
from app.lifecycle.startup_errors import StartupError
from app.observability.gpu import gpu_memory

logger = logging.getLogger(__name__)

GiB = 1024**3
DTYPE_BYTES = {"float64": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Block granularity of the engine's KV cache: suggested lengths are multiples of it.
BLOCK_TOKENS = 16
# Keys of config.json that mark layers without a per-token KV cache (state-space, linear attention).
HYBRID_KEYS = ("layers_block_type", "attn_layer_indices", "hybrid_override_pattern", "mamba_d_state", "ssm_cfg")
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
CGROUP_MEMORY_LIMIT = Path("/sys/fs/cgroup/memory.max")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Footprint:
    """What the model needs: its weights in memory, and KV-cache bytes as a function of the context."""

    weight_bytes: int
    kv_bytes_per_token_layer: int | None  # None: the KV cache cannot be estimated for this architecture
    full_layers: int = 0
    window_layers: int = 0
    window_tokens: int = 0

    def kv_bytes(self, tokens: int) -> int | None:
        if self.kv_bytes_per_token_layer is None:
            return None
        windowed = min(tokens, self.window_tokens) * self.window_layers
        return self.kv_bytes_per_token_layer * (tokens * self.full_layers + windowed)

    def tokens_fitting(self, kv_bytes: int) -> int:
        """The longest context whose KV cache fits in kv_bytes, in whole blocks."""
        per_token = (self.kv_bytes_per_token_layer or 0) * (self.full_layers + self.window_layers)
        tokens = kv_bytes // per_token if per_token else 0
        return max(0, tokens // BLOCK_TOKENS * BLOCK_TOKENS)


@dataclass(frozen=True)
class Budget:
    """The memory the engine will have."""

    device: str
    total_bytes: int  # weights and KV cache together must fit in this
    kv_bytes: int | None  # the CPU build's fixed KV-cache size; None on a GPU (whatever the weights leave)
    gpus: int = 0
    per_gpu_bytes: int = 0  # total memory of the smallest GPU of the replica


# --- the model ----------------------------------------------------------------------


def footprint(config: Mapping[str, Any], weight_file_bytes: int, settings: Settings) -> Footprint:
    text = _text_config(config)
    kv_dtype = _kv_dtype_bytes(config, settings)
    per_layer, full, window_layers, window = _kv_layout(text)
    return Footprint(
        weight_bytes=_weights_in_memory(config, weight_file_bytes, settings),
        kv_bytes_per_token_layer=None if per_layer is None else per_layer * kv_dtype,
        full_layers=full,
        window_layers=window_layers,
        window_tokens=window,
    )


def weight_files(paths: Iterable[str], index: Mapping[str, Any] | None) -> set[str]:
    """The weight files the engine loads: those the safetensors index names, else the top-level ones."""
    if index and isinstance(index.get("weight_map"), dict):
        return set(index["weight_map"].values())
    selected = [p for p in select_files(paths) if "/" not in p and p.endswith(WEIGHT_SUFFIXES)]
    # Mistral repositories ship a consolidated copy beside the Hugging Face files.
    plain = [p for p in selected if not p.startswith("consolidated")]
    return set(plain or selected)


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), Mapping):
            return config[key]
    return config


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    return next((config[key] for key in keys if config.get(key) is not None), None)


def _checkpoint_dtype_bytes(config: Mapping[str, Any]) -> int:
    name = _first(config, "torch_dtype", "dtype") or _first(_text_config(config), "torch_dtype", "dtype")
    return DTYPE_BYTES.get(str(name).removeprefix("torch."), 2)


def _is_prequantized(config: Mapping[str, Any]) -> bool:
    return "quantization_config" in config or "quantization_config" in _text_config(config)


def _weights_in_memory(config: Mapping[str, Any], file_bytes: int, settings: Settings) -> int:
    if _is_prequantized(config):
        return file_bytes
    stored = _checkpoint_dtype_bytes(config)
    parameters = file_bytes / stored
    if settings.QUANTIZATION:
        # Quantized while loading: 8-bit formats keep a byte per parameter, the others less.
        per_parameter = 1.0 if "fp8" in settings.QUANTIZATION or "int8" in settings.QUANTIZATION else 0.5
        return int(parameters * per_parameter)
    if settings.DTYPE == "auto":
        # The engine serves float32 checkpoints in 16 bits.
        return int(parameters * min(stored, 2))
    return int(parameters * DTYPE_BYTES[settings.DTYPE])


def _kv_dtype_bytes(config: Mapping[str, Any], settings: Settings) -> int:
    if any(word.startswith("fp8") for word in _extra_flag_values(settings, "--kv-cache-dtype")):
        return 1
    if settings.DTYPE != "auto":
        return DTYPE_BYTES[settings.DTYPE]
    return min(_checkpoint_dtype_bytes(config), 2)


def _kv_layout(text: Mapping[str, Any]) -> tuple[int | None, int, int, int]:
    """Elements per token and layer, the full-attention layers, the sliding-window layers and their window."""
    layer_types = text.get("layer_types")
    if any(key in text for key in HYBRID_KEYS) or (
        isinstance(layer_types, list) and not set(layer_types) <= ATTENTION_LAYER_TYPES
    ):
        return None, 0, 0, 0
    layers = _first(text, "num_hidden_layers", "n_layer", "num_layers")
    if not isinstance(layers, int) or layers <= 0:
        return None, 0, 0, 0
    if text.get("kv_lora_rank"):  # multi-head latent attention: one compressed vector per token and layer
        per_layer = int(text["kv_lora_rank"]) + int(text.get("qk_rope_head_dim") or 0)
    else:
        heads = _first(text, "num_attention_heads", "n_head")
        kv_heads = _first(text, "num_key_value_heads", "n_head_kv", "num_kv_heads") or (
            1 if text.get("multi_query") else heads
        )
        head_dim = _first(text, "head_dim") or (
            text["hidden_size"] // heads if isinstance(text.get("hidden_size"), int) and heads else None
        )
        if not all(isinstance(v, int) and v > 0 for v in (heads, kv_heads, head_dim)):
            return None, 0, 0, 0
        per_layer = 2 * kv_heads * head_dim  # keys and values
    window = text.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or text.get("use_sliding_window") is False:
        return per_layer, layers, 0, 0
    if isinstance(layer_types, list):
        sliding = sum(1 for kind in layer_types if kind == "sliding_attention")
        return per_layer, layers - sliding, sliding, window
    return per_layer, 0, layers, window


def _extra_flag_values(settings: Settings, flag: str) -> list[str]:
    try:
        words = shlex.split(settings.VLLM_EXTRA_ARGS)
    except ValueError:
        return []
    values = []
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            values.append(words[index + 1])
        elif word.startswith(flag + "="):
            values.append(word.split("=", 1)[1])
    return values


def apply_hf_overrides(config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """config.json as the engine will read it: with VLLM_EXTRA_ARGS's --hf-overrides applied."""
    for value in _extra_flag_values(settings, "--hf-overrides"):
        try:
            overrides = json.loads(value)
        except ValueError:
            continue
        if isinstance(overrides, dict):
            config = _merged(config, overrides)
    return config


def _merged(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- the memory ---------------------------------------------------------------------


def budget(settings: Settings) -> Budget | None:
    """The memory the engine will have; None when it cannot be known here (no NVML, too few GPUs)."""
    device = resolve_device(settings.DEVICE)
    if device == "cpu":
        return Budget("cpu", machine_memory_bytes(), settings.VLLM_CPU_KVCACHE_SPACE * GiB)
    replica = settings.TENSOR_PARALLEL_SIZE * settings.PIPELINE_PARALLEL_SIZE
    totals = _visible(gpu_memory())
    if len(totals) < replica:
        return None
    smallest = min(totals[:replica])
    return Budget("cuda", int(smallest * settings.GPU_MEMORY_UTIL * replica), None, replica, smallest)


def machine_memory_bytes() -> int:
    """Physical memory, or the container's memory limit when it is lower (cgroup v2)."""
    total = psutil.virtual_memory().total
    try:
        limit = CGROUP_MEMORY_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _visible(readings: list[Any]) -> list[int]:
    """Total memory of the GPUs the engine will see, in CUDA_VISIBLE_DEVICES order."""
    by_index = {reading.index: reading.total_bytes for reading in readings}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", visible):
        return [by_index[index] for index in sorted(by_index)]
    return [by_index[int(i)] for i in visible.split(",") if int(i) in by_index]


# --- the decision -------------------------------------------------------------------


def check(model: Footprint, memory: Budget, settings: Settings) -> None:
    """Raise StartupError with the fix when the model certainly cannot fit."""
    label = f"MODEL_NAME '{settings.MODEL_NAME}'"
    weights = model.weight_bytes
    if memory.device == "cpu":
        kv_space = memory.kv_bytes or 0
        if weights + kv_space > memory.total_bytes:
            lower = ", or lower VLLM_CPU_KVCACHE_SPACE" if weights < memory.total_bytes else ""
            raise StartupError(
                f"{label} needs about {_gib(weights)} GiB for its weights plus VLLM_CPU_KVCACHE_SPACE="
                f"{settings.VLLM_CPU_KVCACHE_SPACE} GiB for its KV cache, but this machine has {_gib(memory.total_bytes)} "
                f"GiB of memory: use a smaller or quantized variant of the model (QUANTIZATION){lower}."
            )
        _check_context(model, kv_space, settings, "VLLM_CPU_KVCACHE_SPACE")
        return
    if weights > memory.total_bytes:
        raise StartupError(
            f"{label} needs about {_gib(weights)} GiB for its weights but the engine may use {_gib(memory.total_bytes)} "
            f"GiB ({_gpu_words(memory, settings)}): {_more_gpus(weights, memory, settings)}, "
            "or use a quantized variant of the model (QUANTIZATION)."
        )
    _check_context(model, memory.total_bytes - weights, settings, "GPU")


def _check_context(model: Footprint, kv_space: int, settings: Settings, where: str) -> None:
    length = settings.MAX_MODEL_LEN
    needed = model.kv_bytes(length) if length else None
    if length is None or needed is None or needed <= kv_space:
        return
    fitting = model.tokens_fitting(kv_space)
    shorter = f"set MAX_MODEL_LEN to {fitting} or less" if fitting else "use a smaller model"
    if where == "VLLM_CPU_KVCACHE_SPACE":
        raise StartupError(
            f"MAX_MODEL_LEN={length} needs {_gib(needed)} GiB of KV cache for one sequence but "
            f"VLLM_CPU_KVCACHE_SPACE={settings.VLLM_CPU_KVCACHE_SPACE} GiB holds {fitting} tokens: {shorter}, "
            f"or raise VLLM_CPU_KVCACHE_SPACE to {math.ceil(needed / GiB)}."
        )
    raise StartupError(
        f"MAX_MODEL_LEN={length} needs {_gib(needed)} GiB of KV cache for one sequence but at most "
        f"{_gib(kv_space)} GiB are left after the weights: {shorter}, raise GPU_MEMORY_UTIL "
        f"(now {settings.GPU_MEMORY_UTIL}), or use more GPUs (TENSOR_PARALLEL_SIZE)."
    )


def _gpu_words(memory: Budget, settings: Settings) -> str:
    return f"GPU_MEMORY_UTIL={settings.GPU_MEMORY_UTIL} of {memory.gpus} x {_gib(memory.per_gpu_bytes)} GiB GPU"


def _more_gpus(weights: int, memory: Budget, settings: Settings) -> str:
    per_gpu = memory.per_gpu_bytes * settings.GPU_MEMORY_UTIL
    needed = math.ceil(weights / per_gpu / settings.PIPELINE_PARALLEL_SIZE) if per_gpu else 0
    tensor_parallel = 2 ** math.ceil(math.log2(max(needed, 1)))
    return f"use more GPUs (TENSOR_PARALLEL_SIZE={tensor_parallel} or more)"


def _gib(value: float) -> str:
    return f"{value / GiB:.1f}"


# --- the check at start-up ----------------------------------------------------------


def check_model(
    settings: Settings, config: dict[str, Any] | None, files: Mapping[str, int], index: Mapping[str, Any] | None
) -> None:
    """The whole check for one model: its config.json, its files with their sizes, its safetensors index."""
    if not settings.FIT_CHECK:
        return
    if config is None:
        logger.info("fit check skipped: the model has no config.json")
        return
    memory = budget(settings)
    if memory is None:
        logger.info("fit check skipped: the GPUs' memory cannot be read (NVML)")
        return
    weights = sum(files.get(name, 0) for name in weight_files(files, index))
    try:
        model = footprint(apply_hf_overrides(config, settings), weights, settings)
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:
        logger.warning("fit check skipped: config.json has an unexpected shape", extra={"reason": repr(exc)})
        return
    check(model, memory, settings)
    kv = model.kv_bytes(settings.MAX_MODEL_LEN) if settings.MAX_MODEL_LEN else None
    logger.info(
        "fit check passed",
        extra={
            "weights_gib": round(model.weight_bytes / GiB, 3),
            "kv_gib_one_sequence": None if kv is None else round(kv / GiB, 3),
            "memory_gib": round(memory.total_bytes / GiB, 1),
            "device": memory.device,
        },
    )


def check_remote_model(settings: Settings, listing: RepoListing, token: str | None, endpoint: str) -> None:
    """The check for a model on the Hub: its config.json (and safetensors index) fetched into the cache, nothing else."""
    if not settings.FIT_CHECK:
        return
    files = {f.path: f.size for f in listing.files}
    wanted = [name for name in ("config.json", INDEX_FILE) if name in files]
    fetched: dict[str, dict[str, Any] | None] = {}
    for name in wanted:
        try:
            path = hf_hub_download(
                listing.repo.repo_id, name, revision=listing.commit, cache_dir=settings.cache_dir / "hub",
                token=token or False, endpoint=endpoint,
            )
        except (HfHubHTTPError, httpx2.TransportError, OSError) as exc:
            logger.warning("fit check skipped: %s could not be fetched", name, extra={"reason": type(exc).__name__})
            return
        fetched[name] = read_json(Path(path))
    check_model(settings, fetched.get("config.json"), files, fetched.get(INDEX_FILE))


def check_local_model(settings: Settings, path: Path) -> None:
    """The check for a model already on disk (a local directory, a cached or pre-cached snapshot)."""
    if not settings.FIT_CHECK:
        return
    files = {entry.name: entry.stat().st_size for entry in path.iterdir() if entry.is_file()}
    check_model(settings, read_json(path / "config.json"), files, _local_index(path))


def _local_index(path: Path) -> Mapping[str, Any] | None:
    index = path / INDEX_FILE
    return read_json(index) if index.is_file() else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
