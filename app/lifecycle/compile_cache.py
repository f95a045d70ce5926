"""The engine's compile cache on the model cache's volume, one folder per engine configuration.

vLLM keeps what it computes at start-up and can reuse (torch.compile and
Inductor artefacts, Triton kernels, FlashInfer autotuning, model inspection
results) under `VLLM_CACHE_ROOT`, by default `~/.cache/vllm` inside the
container: thrown away with the container, so every restart recompiles
(minutes on a GPU). Here it moves to the volume that already holds the model
(`<cache_dir>/vllm-cache`), so a restart finds it.

vLLM keys its own entries, but a volume outlives images: a folder per
configuration keeps a different vLLM version, device, model, revision or set
of engine flags from ever opening another's entries, and lets an operator
delete old ones by name. The key leaves out what cannot change a compiled
graph (the engine's address, port and served name). Each folder holds
`key.json`, the values it was made from.

An operator who sets VLLM_CACHE_ROOT keeps it; a volume that cannot be
written falls back to vLLM's default with a warning (a cache must never fail
a start). vLLM's CPU build writes the cache but cannot load it back
(vLLM 0.32: "Compiling model again due to a load failure"); it recompiles,
which costs what it did before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from app.config import Settings
from app.lifecycle.engine_args import EngineLaunch

logger = logging.getLogger(__name__)

CACHE_ROOT_ENV = "VLLM_CACHE_ROOT"
FOLDER = "vllm-cache"
KEY_FILE = "key.json"
# Flags that change where the engine listens or what it is called, never what it computes.
UNKEYED_FLAGS = frozenset({"--model", "--host", "--port", "--served-model-name", "--disable-uvicorn-access-log"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def engine_version() -> str:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_key(
    *, version: str, device: str, model: str, revision: str | None, config_digest: str, args: Sequence[str]
) -> dict[str, object]:
    """The values a folder is keyed by; `args` is the engine's command line after the interpreter."""
    return {
        "vllm": version,
        "device": device,
        "model": model,
        "revision": revision,
        "config_sha256": config_digest,
        "flags": keyed_flags(args),
    }


def keyed_flags(args: Sequence[str]) -> list[str]:
    """The engine flags that can change what it computes, in their order."""
    kept: list[str] = []
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in UNKEYED_FLAGS:
            skip_value = "=" not in arg and name != "--disable-uvicorn-access-log"
            continue
        kept.append(arg)
    return kept


def folder_for(cache_dir: Path, key: dict[str, object]) -> Path:
    """`<cache_dir>/vllm-cache/<vllm version>/<model>-<digest of the key>`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    model = _UNSAFE.sub("-", str(key["model"]).strip("/").replace("/", "--"))[-48:].strip("-.") or "model"
    version = _UNSAFE.sub("-", str(key["vllm"]))
    return cache_dir / FOLDER / version / f"{model}-{digest}"


def config_digest(model_path: Path) -> str:
    """The model's config.json, hashed: a local directory whose model changed gets a new folder."""
    try:
        return hashlib.sha256((model_path / "config.json").read_bytes()).hexdigest()
    except OSError:
        return ""


def with_compile_cache(
    launch: EngineLaunch, settings: Settings, model_path: Path, revision: str | None
) -> EngineLaunch:
    """The launch with VLLM_CACHE_ROOT set to this configuration's folder on the volume."""
    if CACHE_ROOT_ENV in launch.env:
        logger.info("VLLM_CACHE_ROOT is set; the engine's compile cache stays there",
                    extra={"vllm_cache_root": launch.env[CACHE_ROOT_ENV]})
        return launch
    model = settings.MODEL_NAME if revision is not None else str(model_path)
    key = cache_key(
        version=engine_version(), device=launch.device, model=model, revision=revision,
        config_digest=config_digest(model_path), args=launch.argv[1:],
    )
    folder = folder_for(settings.cache_dir, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / KEY_FILE).write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        logger.warning(
            "the compile cache cannot be written on the volume; the engine keeps its default (lost on restart)",
            extra={"folder": str(folder), "reason": f"{type(exc).__name__}: {exc.strerror or exc}"},
        )
        return launch
    logger.info("engine compile cache", extra={"vllm_cache_root": str(folder)})
    return replace(launch, env={**launch.env, CACHE_ROOT_ENV: str(folder)})
