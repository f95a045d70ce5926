"""The models of a multi-model deployment, each with the settings its engine runs with.

`MODELS` lists the models (`[served-name=]source`, comma-separated) and
`MODELS_CONFIG` names an optional YAML or JSON file of per-model overrides:

    tiny:                       # a served name from MODELS
      MAX_MODEL_LEN: 2048
      VLLM_EXTRA_ARGS: --max-num-seqs 8

The catalog turns them into one complete `Settings` per model (the global
settings, its overrides, its source as MODEL_NAME, its served name, its own
internal port), so the single-model code that preflights, downloads and
launches an engine is reused as it is, once per model. Every mistake is
found here, at start, as one sentence that names the model and the fix.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from app.config import ConfigError, Settings, model_aliases, split_csv

# Settings a model may override: what its engine is launched with. The rest
# (ports, keys, limits of the wrapper, logs) belongs to the whole deployment.
PER_MODEL_SETTINGS = frozenset(
    {
        "MODEL_REVISION", "LORA_MODULES", "MAX_LORAS", "MAX_LORA_RANK",
        "MAX_MODEL_LEN", "GPU_MEMORY_UTIL", "MAX_NUM_SEQS", "MAX_BATCHED_TOKENS", "ENABLE_CHUNKED_PREFILL",
        "TENSOR_PARALLEL_SIZE", "PIPELINE_PARALLEL_SIZE", "DATA_PARALLEL_SIZE", "DISTRIBUTED_EXECUTOR_BACKEND",
        "IMAGE_LIMIT", "VIDEO_LIMIT", "AUDIO_LIMIT", "DTYPE", "QUANTIZATION", "TRUST_REMOTE_CODE",
        "ENFORCE_EAGER", "VLLM_EXTRA_ARGS", "VLLM_CPU_KVCACHE_SPACE", "ENGINE_STARTUP_TIMEOUT_S",
        "ENGINE_HEALTH_TIMEOUT_S", "ENABLE_AUTO_TOOL_CHOICE", "TOOL_CALL_PARSER", "REASONING_PARSER",
        "CHAT_TEMPLATE", "SPECULATIVE_CONFIG", "KV_CACHE_DTYPE", "GENERATION_CONFIG", "LOAD_FORMAT",
        "RUNNER", "CONVERT", "MM_ENCODER_TP_MODE", "MM_PROCESSOR_CACHE_GB",
    }
)
# Global settings that describe one model: with MODELS they go in MODELS_CONFIG instead.
ONE_MODEL_SETTINGS = ("MODEL_REVISION", "LORA_MODULES")


@dataclass(frozen=True)
class CatalogModel:
    name: str  # the served name clients send in `model`
    source: str  # a Hub id or a local directory
    settings: Settings  # what its engine is prepared and launched with

    @property
    def port(self) -> int:
        return self.settings.VLLM_PORT


class ModelCatalog:
    """The configured models, in the order MODELS lists them."""

    def __init__(self, models: tuple[CatalogModel, ...]) -> None:
        self.models = models
        self._by_name = {model.name: model for model in models}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def get(self, name: str) -> CatalogModel | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[CatalogModel]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    @classmethod
    def build(cls, base: Settings, models: str, config_path: str | None = None) -> ModelCatalog:
        """The catalog of `models` (the MODELS value); ConfigError with one sentence per mistake.

        MODEL_NAME and SERVED_MODEL_NAME are ignored: MODELS names every model.
        """
        errors: list[str] = []
        entries = _parse_models(models, errors)
        errors += [
            f"{name} describes one model; with MODELS set it per model in MODELS_CONFIG."
            for name in ONE_MODEL_SETTINGS if getattr(base, name)
        ]
        if base.ENGINE_URL:
            errors.append("ENGINE_URL fronts one remote engine; it cannot be combined with MODELS.")
        port_errors = _port_clashes(base, len(entries))
        errors += port_errors
        overrides = _load_overrides(config_path, [name for name, _ in entries], errors) if config_path else {}
        built: list[CatalogModel] = []
        if not port_errors:
            for index, (name, source) in enumerate(entries):
                settings = _model_settings(base, name, source, base.VLLM_PORT + index, overrides.get(name, {}), errors)
                if settings is not None:
                    built.append(CatalogModel(name, source, settings))
        if errors:
            raise ConfigError(" ".join(errors))
        return cls(tuple(built))


def _parse_models(value: str, errors: list[str]) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in split_csv(value):
        name, sep, source = item.partition("=")
        name, source = (name.strip(), source.strip()) if sep else ("", item)
        if sep and (not name or not source):
            errors.append(f"MODELS: '{item}' is not served-name=hub-id-or-directory (or the source alone).")
            continue
        name = name or model_aliases(source)[0]
        if name in seen:
            errors.append(f"MODELS: the served name '{name}' is given twice; give each model its own as name=source.")
            continue
        seen.add(name)
        entries.append((name, source))
    if not entries and not errors:
        errors.append("MODELS lists no model; write hub-id-or-directory, or name=source, comma-separated.")
    return entries


def _port_clashes(base: Settings, count: int) -> list[str]:
    if count == 0:
        return []
    first, last = base.VLLM_PORT, base.VLLM_PORT + count - 1
    span = f"VLLM_PORT to VLLM_PORT+{count - 1} ({first}-{last}), one internal port per model,"
    if last > 65535:
        return [f"MODELS: {span} go past 65535; lower VLLM_PORT."]
    taken = [f"{name}={port}" for name, port in (("PORT", base.PORT), ("PORT_HEALTH", base.PORT_HEALTH))
             if port is not None and first <= port <= last]
    if taken:
        return [f"MODELS: {span} include {' and '.join(taken)}; move VLLM_PORT or {taken[0].split('=')[0]}."]
    return []


def _load_overrides(path_value: str, names: list[str], errors: list[str]) -> dict[str, dict[str, Any]]:
    """The file's overrides by served name, its keys upper-cased; mistakes go to `errors`."""
    path = Path(path_value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        errors.append(f"MODELS_CONFIG: cannot read {path} ({error.strerror or error}); give the path of a YAML or JSON file.")
        return {}
    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        where = _error_position(error)
        errors.append(f"MODELS_CONFIG: {path} is not valid {kind}{where}.")
        return {}
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        errors.append(f"MODELS_CONFIG: {path} must map served names to their settings (name: {{SETTING: value}}).")
        return {}
    overrides: dict[str, dict[str, Any]] = {}
    for name, block in document.items():
        if name not in names:
            errors.append(f"MODELS_CONFIG names the model '{name}', which MODELS does not list (it lists {', '.join(names)}).")
            continue
        if block is None:
            continue
        if not isinstance(block, Mapping):
            errors.append(f"MODELS_CONFIG: model '{name}': give its settings as a mapping (SETTING: value).")
            continue
        overrides[name] = _check_block(name, block, errors)
    return overrides


def _check_block(name: str, block: Mapping[Any, Any], errors: list[str]) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, value in block.items():
        setting = str(key).upper()
        if setting not in PER_MODEL_SETTINGS:
            errors.append(f"MODELS_CONFIG: model '{name}': {_unknown_key(setting)}")
        elif isinstance(value, (Mapping, list)):
            errors.append(f"MODELS_CONFIG: model '{name}': {setting} takes one value (a string, number or boolean).")
        else:
            checked[setting] = value
    return checked


def _unknown_key(setting: str) -> str:
    if setting in Settings.model_fields:
        return f"{setting} applies to the whole deployment, not to one model; set it in the environment."
    close = difflib.get_close_matches(setting, sorted(PER_MODEL_SETTINGS), n=1)
    hint = f"did you mean {close[0]}?" if close else "see PER_MODEL_SETTINGS in app/catalog.py for the ones a model may set."
    return f"{setting} is not a per-model setting; {hint}"


def _model_settings(
    base: Settings, name: str, source: str, port: int, overrides: dict[str, Any], errors: list[str]
) -> Settings | None:
    values = {
        **base.model_dump(),
        **overrides,
        "MODEL_NAME": source,
        "SERVED_MODEL_NAME": name,
        "VLLM_PORT": port,
        "MODELS": "",  # a model's own settings describe that one model
        "MODELS_CONFIG": None,
    }
    try:
        settings = Settings(**values)
        _ = settings.lora_modules
        return settings
    except ValidationError as exc:
        for error in exc.errors():
            setting = str(error["loc"][0]).upper() if error["loc"] else "configuration"
            shown = f"={overrides[setting]!r}" if setting in overrides else ""
            message = error["msg"].removeprefix("Value error, ")
            errors.append(f"MODELS_CONFIG: model '{name}': invalid {setting}{shown}: {message}.")
    except ConfigError as error:  # LORA_MODULES that are not name=source pairs
        errors.append(f"MODELS_CONFIG: model '{name}': {error}.")
    return None


def _error_position(error: BaseException) -> str:
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f" (line {mark.line + 1}: {getattr(error, 'problem', 'syntax error')})"
    line = getattr(error, "lineno", None)
    if line is not None:
        return f" (line {line}: {getattr(error, 'msg', 'syntax error')})"
    return ""
