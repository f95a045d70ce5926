"""Startup failures as one sentence that names the fix.

When the engine dies while starting, its last lines hold the cause between
hundreds of lines of tracebacks from three processes. The common causes (too
little memory for the KV cache, a context length above the model's, a flag
the engine rejects, an architecture it cannot serve, a full disk, a gated
model) are recognised here by the exact texts of the pinned vLLM and turned
into one sentence that names the variable to change. Anything else is left
to the caller, which then says how the engine exited and keeps its last lines
apart (they are for /info, not for the public /health).

`StartupError` is the exception the whole startup path raises with such a
sentence (the preflight and the download raise it too).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence

from app.config import Settings
from app.lifecycle.engine_args import SETTING_OF_FLAG, resolve_device


class StartupError(Exception):
    """A fatal startup problem; str(error) is one sentence that says what to change."""


NUMBER = r"(\d+(?:\.\d+)?)"
MAX_LEN_TOO_LARGE = re.compile(
    rf"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len \((\w+)={NUMBER}"
)
KV_CACHE_TOO_SMALL = re.compile(
    rf"max seq len \((\d+)\), \({NUMBER} GiB KV cache is needed, "
    rf"which is larger than the available KV cache memory \({NUMBER} GiB\)"
)
ESTIMATED_MAX_LEN = re.compile(r"the estimated maximum model length is (\d+)")
NO_KV_CACHE_MEMORY = re.compile(r"No available memory for the cache blocks")
CPU_KV_CACHE_EXCEEDS_MEMORY = re.compile(
    rf"Available memory on node \d+ \({NUMBER}/{NUMBER} GiB\) on kv cache allocation "
    rf"is less than requested memory for kv \({NUMBER}"
)
CPU_MEMORY_SHORT = re.compile(
    rf"Available memory on node \d+ \({NUMBER}/{NUMBER} GiB\) on startup "
    rf"is less than desired CPU memory utilization \({NUMBER}, {NUMBER} GiB\)"
)
GPU_MEMORY_SHORT = re.compile(
    rf"Free memory on device (\S+) \({NUMBER}/{NUMBER} GiB\) on startup "
    rf"is less than desired GPU memory utilization \({NUMBER}, {NUMBER} GiB\)"
)
OUT_OF_MEMORY = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory")
UNRECOGNIZED_FLAGS = re.compile(r"error: unrecognized arguments: (.+)")
REJECTED_FLAG = re.compile(r"error: argument ([^:\s]+): (.+)")
UNSUPPORTED_ARCHITECTURE = re.compile(
    r"Model architectures \[([^\]]*)\] are not supported for now"
    r"|Cannot find model module\. '(\w+)' is not a registered model"
)
UNKNOWN_MODEL_TYPE = re.compile(r"has model type `([^`]+)` but Transformers does not recognize this architecture")
NEEDS_REMOTE_CODE = re.compile(r"contains custom code which must be executed")
DISK_FULL = re.compile(r"No space left on device")
GATED = re.compile(r"GatedRepoError|Cannot access gated repo|is restricted and you are not in the authorized list")
NOT_FOUND = re.compile(r"RepositoryNotFoundError|is not a local folder and is not a valid model identifier")


def classify_engine_failure(lines: Sequence[str], settings: Settings) -> str | None:
    """One sentence with the fix for the engine's last output lines, or None when the cause is not recognised."""
    text = "\n".join(lines)
    for describe in DESCRIBERS:
        if (sentence := describe(text, settings)) is not None:
            return sentence
    return None


# --- describers: each returns the sentence for its cause, or None ------------------


def _max_len_too_large(text: str, settings: Settings) -> str | None:
    if not (match := MAX_LEN_TOO_LARGE.search(text)):
        return None
    requested, key, limit = match[1], match[2], int(float(match[3]))
    return (
        f"MAX_MODEL_LEN={requested} is above what the model allows ({key}={limit} in its config.json): "
        f"set MAX_MODEL_LEN to {limit} or less, or unset it to use the model's own."
    )


def _kv_cache_too_small(text: str, settings: Settings) -> str | None:
    if not (match := KV_CACHE_TOO_SMALL.search(text)):
        return None
    length, needed, available = match[1], match[2], match[3]
    estimate = ESTIMATED_MAX_LEN.search(text)
    shorter = f"set MAX_MODEL_LEN to {estimate[1]} or less" if estimate else "lower MAX_MODEL_LEN"
    return (
        f"The KV cache is too small for a context of {length} tokens ({needed} GiB needed, {available} GiB available): "
        f"{shorter}, or raise {_memory_setting(settings)}."
    )


def _no_kv_cache_memory(text: str, settings: Settings) -> str | None:
    if not NO_KV_CACHE_MEMORY.search(text):
        return None
    if _device(settings) == "cpu":
        return f"No memory was left for the KV cache: raise {_memory_setting(settings)}."
    return (
        f"No GPU memory was left for the KV cache after loading the model: raise {_memory_setting(settings)}, "
        "lower MAX_NUM_SEQS, or use a smaller or quantized model (QUANTIZATION)."
    )


def _cpu_kv_cache_exceeds_memory(text: str, settings: Settings) -> str | None:
    if not (match := CPU_KV_CACHE_EXCEEDS_MEMORY.search(text)):
        return None
    available, total, requested = match[1], match[2], match[3]
    return (
        f"The KV cache asks for {requested} GiB but only {available} of {total} GiB of memory are available: "
        f"lower VLLM_CPU_KVCACHE_SPACE (now {settings.VLLM_CPU_KVCACHE_SPACE} GiB)."
    )


def _cpu_memory_short(text: str, settings: Settings) -> str | None:
    if not (match := CPU_MEMORY_SHORT.search(text)):
        return None
    available, total, fraction, wanted = match[1], match[2], match[3], match[4]
    return (
        f"The engine wants {wanted} GiB ({fraction} of the machine's memory) but only {available} of {total} GiB "
        "are available: set VLLM_CPU_KVCACHE_SPACE to a size that fits, or lower GPU_MEMORY_UTIL "
        "(it sets the CPU engine's share of memory too)."
    )


def _gpu_memory_short(text: str, settings: Settings) -> str | None:
    if not (match := GPU_MEMORY_SHORT.search(text)):
        return None
    device, free, total, fraction, wanted = match[1], match[2], match[3], match[4], match[5]
    return (
        f"Only {free} of {total} GiB are free on {device} but GPU_MEMORY_UTIL={fraction} asks for {wanted} GiB: "
        "lower GPU_MEMORY_UTIL, or stop the other processes using the GPU."
    )


def _out_of_memory(text: str, settings: Settings) -> str | None:
    if not OUT_OF_MEMORY.search(text):
        return None
    return (
        "The engine ran out of GPU memory: lower MAX_MODEL_LEN or MAX_NUM_SEQS, set ENFORCE_EAGER=true, "
        "or use a larger GPU, more GPUs (TENSOR_PARALLEL_SIZE) or a quantized model (QUANTIZATION)."
    )


def _rejected_flag(text: str, settings: Settings) -> str | None:
    if match := UNRECOGNIZED_FLAGS.search(text):
        flags = match[1].split()
        flag = next((f for f in flags if f.startswith("-")), flags[0]).split("=", 1)[0]
        if flag in _extra_flags(settings):
            return f"The engine does not know the flag {flag} given in VLLM_EXTRA_ARGS: remove or correct it there."
        if flag in SETTING_OF_FLAG:
            setting = SETTING_OF_FLAG[flag]
            return f"The engine does not know the flag {flag} that {setting} sets: unset {setting}."
        return (
            f"The engine does not know the flag {flag} that the image passes itself: "
            "the image's engine arguments do not match its vLLM version."
        )
    if match := REJECTED_FLAG.search(text):
        names = match[1].split("/")
        flag = next((name for name in names if name.startswith("--")), names[0])
        detail = match[2].strip()
        if flag in _extra_flags(settings) or flag not in SETTING_OF_FLAG:
            return f"The engine rejected {flag} ({detail}): correct it in VLLM_EXTRA_ARGS."
        return f"The engine rejected {flag} ({detail}): correct {SETTING_OF_FLAG[flag]}."
    return None


def _unsupported_architecture(text: str, settings: Settings) -> str | None:
    if not (match := UNSUPPORTED_ARCHITECTURE.search(text)):
        return None
    architecture = (match[1] or match[2]).replace("'", "")
    return (
        f"This vLLM cannot serve the architecture {architecture} of MODEL_NAME '{settings.MODEL_NAME}': "
        "choose a model with a supported architecture, "
        "or set TRUST_REMOTE_CODE=true if the repository ships its own modeling code."
    )


def _unknown_model_type(text: str, settings: Settings) -> str | None:
    if not (match := UNKNOWN_MODEL_TYPE.search(text)):
        return None
    return (
        f"The model type '{match[1]}' of MODEL_NAME '{settings.MODEL_NAME}' is unknown to this image's Transformers: "
        "choose a supported model, or set TRUST_REMOTE_CODE=true if the repository ships its own code."
    )


def _needs_remote_code(text: str, settings: Settings) -> str | None:
    if not NEEDS_REMOTE_CODE.search(text):
        return None
    return (
        f"MODEL_NAME '{settings.MODEL_NAME}' ships its own modeling code: "
        "set TRUST_REMOTE_CODE=true if you trust that repository."
    )


def _disk_full(text: str, settings: Settings) -> str | None:
    if not DISK_FULL.search(text):
        return None
    return (
        f"The disk is full (No space left on device): free space or mount a larger volume for the model cache "
        f"({settings.cache_dir}) and temporary files."
    )


def _gated(text: str, settings: Settings) -> str | None:
    if not GATED.search(text):
        return None
    # The image downloads MODEL_NAME and LORA_MODULES itself; the engine gets no HF_TOKEN.
    return (
        "The engine was refused a gated repository named in VLLM_EXTRA_ARGS: the engine gets no HF_TOKEN, "
        "so download that repository beforehand and give its local path there."
    )


def _not_found(text: str, settings: Settings) -> str | None:
    if not NOT_FOUND.search(text):
        return None
    return (
        "The engine could not find a model: check MODEL_NAME and any repository named in VLLM_EXTRA_ARGS "
        "(a private one must be given as a local path: the engine gets no HF_TOKEN)."
    )


# Specific causes before general ones: a KV-cache failure also mentions max_model_len.
DESCRIBERS: tuple[Callable[[str, Settings], str | None], ...] = (
    _rejected_flag,
    _max_len_too_large,
    _kv_cache_too_small,
    _no_kv_cache_memory,
    _cpu_kv_cache_exceeds_memory,
    _cpu_memory_short,
    _gpu_memory_short,
    _out_of_memory,
    _unsupported_architecture,
    _unknown_model_type,
    _needs_remote_code,
    _disk_full,
    _gated,
    _not_found,
)


# --- helpers --------------------------------------------------------------------


def _device(settings: Settings) -> str:
    return resolve_device(settings.DEVICE)


def _memory_setting(settings: Settings) -> str:
    """The variable that sizes the KV cache on this device, with its current value."""
    if _device(settings) == "cpu":
        return f"VLLM_CPU_KVCACHE_SPACE (now {settings.VLLM_CPU_KVCACHE_SPACE} GiB)"
    return f"GPU_MEMORY_UTIL (now {settings.GPU_MEMORY_UTIL})"


def _extra_flags(settings: Settings) -> set[str]:
    try:
        words = shlex.split(settings.VLLM_EXTRA_ARGS)
    except ValueError:
        words = settings.VLLM_EXTRA_ARGS.split()
    return {word.split("=", 1)[0] for word in words if word.startswith("-")}
