"""After the engine ran out of memory while starting: retry with the setting the failure names changed.

A memory failure costs a whole model load (minutes on a GPU), so a retry is
worth it only if it changes what the engine complained about. Each failure
text of the pinned vLLM names its cause, and each cause has one setting
that relieves it:

| the engine says | changed | to |
|---|---|---|
| the KV cache cannot hold one sequence of max_model_len | MAX_MODEL_LEN (context) | the length the engine estimated would fit |
| free GPU memory is below the requested utilisation | GPU_MEMORY_UTIL (utilisation) | the free share, less a margin |
| (CPU) available memory is below the requested utilisation | GPU_MEMORY_UTIL (utilisation) | the available share, less a margin |
| (CPU) the KV cache is larger than the memory left | VLLM_CPU_KVCACHE_SPACE (KV cache) | what is left, less 1 GiB |
| (GPU) no room for the cache blocks, or CUDA out of memory | MAX_NUM_SEQS, MAX_BATCHED_TOKENS (batch size) | halved, or 128 and 1024 when unset |

Each of these is changed at most once per start, so a start makes at most
four retries and never repeats one. The supervisor logs every change and
publishes it in /health (`startup_adjustments`), so the operator learns
which setting to fix for good.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from app.config import Settings
from app.lifecycle.startup_errors import (
    CPU_KV_CACHE_EXCEEDS_MEMORY,
    CPU_MEMORY_SHORT,
    ESTIMATED_MAX_LEN,
    GPU_MEMORY_SHORT,
    KV_CACHE_TOO_SMALL,
    NO_KV_CACHE_MEMORY,
    OUT_OF_MEMORY,
)

# Kept free below a measured share of memory, for what else starts meanwhile.
UTILISATION_MARGIN = 0.02
MIN_UTILISATION = 0.05
KV_CACHE_MARGIN_GIB = 1
# Batch limits when the engine chose its own: well below its defaults on any GPU.
DEFAULT_RETRY_NUM_SEQS = 128
DEFAULT_RETRY_BATCHED_TOKENS = 1024


@dataclass(frozen=True)
class Change:
    setting: str
    before: object
    after: object

    def to_json(self) -> dict[str, object]:
        return {"setting": self.setting, "from": self.before, "to": self.after}


@dataclass(frozen=True)
class Retry:
    knob: str  # context | utilisation | kv_cache | batch: each is turned once per start
    reason: str  # the engine's complaint, in a few words
    changes: tuple[Change, ...]
    settings: Settings


def plan_retry(lines: Sequence[str], settings: Settings, device: str, used: frozenset[str]) -> Retry | None:
    """The retry for this failure, or None: not a memory failure, nothing left to change, or already changed."""
    text = "\n".join(lines)
    for planner in (_context, _gpu_utilisation, _cpu_utilisation, _cpu_kv_cache, _batch):
        retry = planner(text, settings, device)
        if retry is not None:
            return None if retry.knob in used else retry
    return None


def _retry(knob: str, reason: str, settings: Settings, **values: object) -> Retry | None:
    changes = tuple(Change(name, getattr(settings, name), value) for name, value in values.items())
    if all(change.before == change.after for change in changes):
        return None
    return Retry(knob, reason, changes, settings.model_copy(update=values))


def _context(text: str, settings: Settings, device: str) -> Retry | None:
    match = KV_CACHE_TOO_SMALL.search(text)
    if match is None:
        return None
    estimate = ESTIMATED_MAX_LEN.search(text)
    fitting = int(estimate[1]) if estimate else 0
    if fitting <= 0 or fitting >= int(match[1]):
        return None
    return _retry("context", "the KV cache cannot hold one sequence of the context length", settings,
                  MAX_MODEL_LEN=fitting)


def _gpu_utilisation(text: str, settings: Settings, device: str) -> Retry | None:
    match = GPU_MEMORY_SHORT.search(text)
    if match is None:
        return None
    return _utilisation(float(match[2]), float(match[3]), settings, "free GPU memory is below GPU_MEMORY_UTIL")


def _cpu_utilisation(text: str, settings: Settings, device: str) -> Retry | None:
    match = CPU_MEMORY_SHORT.search(text)
    if match is None:
        return None
    return _utilisation(float(match[1]), float(match[2]), settings, "available memory is below GPU_MEMORY_UTIL")


def _utilisation(free_gib: float, total_gib: float, settings: Settings, reason: str) -> Retry | None:
    share = math.floor((free_gib / total_gib - UTILISATION_MARGIN) * 100) / 100
    if share < MIN_UTILISATION or share >= settings.GPU_MEMORY_UTIL:
        return None
    return _retry("utilisation", reason, settings, GPU_MEMORY_UTIL=share)


def _cpu_kv_cache(text: str, settings: Settings, device: str) -> Retry | None:
    match = CPU_KV_CACHE_EXCEEDS_MEMORY.search(text)
    if match is None:
        return None
    space = math.floor(float(match[1])) - KV_CACHE_MARGIN_GIB
    if space < 1 or space >= settings.VLLM_CPU_KVCACHE_SPACE:
        return None
    return _retry("kv_cache", "the KV cache is larger than the memory left", settings, VLLM_CPU_KVCACHE_SPACE=space)


def _batch(text: str, settings: Settings, device: str) -> Retry | None:
    if device == "cpu" or not (NO_KV_CACHE_MEMORY.search(text) or OUT_OF_MEMORY.search(text)):
        return None  # the CPU build's KV cache has a fixed size: the batch does not make room for it
    seqs = max(1, settings.MAX_NUM_SEQS // 2) if settings.MAX_NUM_SEQS else DEFAULT_RETRY_NUM_SEQS
    values: dict[str, object] = {"MAX_NUM_SEQS": seqs}
    if settings.ENABLE_CHUNKED_PREFILL:  # without it, a step must hold a whole prompt of MAX_MODEL_LEN
        tokens = settings.MAX_BATCHED_TOKENS // 2 if settings.MAX_BATCHED_TOKENS else DEFAULT_RETRY_BATCHED_TOKENS
        values["MAX_BATCHED_TOKENS"] = max(tokens, seqs, 16)
    return _retry("batch", "no GPU memory was left for the cache blocks or the batch", settings, **values)


def describe(retry: Retry) -> str:
    """`MAX_MODEL_LEN 4194304 -> 2097024`, for the log line."""
    return ", ".join(f"{c.setting} {_shown(c.before)} -> {c.after}" for c in retry.changes)


def _shown(value: object) -> str:
    return "(engine default)" if value is None else str(value)
