"""Render the RunPod Hub listing and the RunPod templates from `app/config.py`.

RunPod users deploy this image from one of three forms: the Hub listing
(`.runpod/hub.json`, with `.runpod/tests.json`, the request the Hub sends to a
fresh deployment before it publishes a release), the pod template and the
Serverless template (`deploy/runpod/`). The forms must agree with each other and
with the settings, so none of them is written by hand: every input's type,
description, default and bounds come from `Settings`, the model presets come from
the one table below, and `tools/settings_docs.py` writes the four files together
with the README table. `tests/unit/test_runpod_listing.py` fails when a file
differs from what this module renders, or when a setting is neither on the form
nor deliberately left off it.

Hub format: https://docs.runpod.io/hub/publishing-guide (hub.json, tests.json);
templates: RunPod's REST API `POST /v1/templates` (TemplateCreateInput).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import SecretStr

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
HUB_JSON = ROOT / ".runpod" / "hub.json"
TESTS_JSON = ROOT / ".runpod" / "tests.json"
POD_TEMPLATE = ROOT / "deploy" / "runpod" / "template.json"
SERVERLESS_TEMPLATE = ROOT / "deploy" / "runpod" / "template-serverless.json"

IMAGE_NAME = "docker.io/YOUR_REGISTRY_USER/vllm-inference-api:0.1.0"
# vllm/vllm-openai images are built on CUDA 13.0 (the reference worker, runpod-workers/worker-vllm,
# lists the same for its vllm-openai base); the Hub schedules workers only on hosts whose driver has it.
CUDA_VERSIONS = ["13.0"]
# 24 GB and larger GPUs: the presets' models with an 8k context fit on each.
GPU_POOLS = "ADA_24,AMPERE_24,AMPERE_48,ADA_48_PRO,AMPERE_80,ADA_80_PRO"
TEST_GPU = "NVIDIA GeForce RTX 4090"
# The model cache lands on the container disk when no network volume is attached: room for a 7B model.
HUB_CONTAINER_DISK_GB = 60
# The request the Hub sends to a fresh deployment (tests.json), and its route.
HUB_TEST_ROUTE = "/v1/chat/completions"
HUB_TEST_BODY = {
    "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    "max_tokens": 16,
    "temperature": 0,
}
# Model download, load and graph capture of the test model on a fresh worker fit well within it.
HUB_TEST_TIMEOUT_MS = 600_000

# RunPod's load balancer routes to PORT and probes PORT_HEALTH (default PORT), both 80 unless the
# endpoint sets them and exposes the port. The Hub form has no ports, so the listing keeps 80.
HUB_STATIC_ENV = {"PORT": "80"}
POD_STATIC_ENV = {"PORT": "8000"}
SERVERLESS_STATIC_ENV = {"PORT": "8000", "PORT_HEALTH": "8000"}
# A Serverless load-balancing request may carry 30 MB and run 5.5 minutes: the wrapper answers
# 413 and 504 itself first, in the OpenAI shape, instead of RunPod cutting the request.
SERVERLESS_LIMITS: dict[str, Any] = {"REQUEST_TIMEOUT_S": 320, "MAX_REQUEST_BYTES": 31_457_280}


def secret_note(name: str) -> str:
    return "Use a RunPod secret: {{ RUNPOD_SECRET_" + name + " }}."


@dataclass(frozen=True)
class FormInput:
    """How a setting appears on the Hub form; its type, description and default come from Settings."""

    label: str
    advanced: bool = True
    required: bool = False
    note: str = ""  # RunPod-specific advice, after the setting's own description


# The settings a user sets from the Hub form, in the form's order. The basic ones (advanced=False)
# also appear, with their values, in the two templates (secrets excepted).
FORM: dict[str, FormInput] = {
    "MODEL_NAME": FormInput("Model", advanced=False, required=True),
    "HF_TOKEN": FormInput("Hugging Face token", advanced=False, note=secret_note("hf_token")),
    "MAX_MODEL_LEN": FormInput("Context length (tokens)", advanced=False),
    "GPU_MEMORY_UTIL": FormInput("GPU memory share", advanced=False),
    "IMAGE_LIMIT": FormInput("Images per request", advanced=False),
    "VIDEO_LIMIT": FormInput("Videos per request", advanced=False),
    "API_KEY": FormInput(
        "API key",
        advanced=False,
        note="Leave it empty on a Serverless endpoint: RunPod takes that header for your RunPod API key. "
        "On a pod, set it from a RunPod secret: {{ RUNPOD_SECRET_api_key }}.",
    ),
    "MAX_CONCURRENT_REQUESTS": FormInput("Concurrent requests", advanced=False),
    "MODEL_REVISION": FormInput("Model revision"),
    "SERVED_MODEL_NAME": FormInput("Served model name"),
    "RUNNER": FormInput("Runner (pooling for embedding and scoring models)"),
    "CONVERT": FormInput("Convert the model to"),
    "TOOL_CALL_PARSER": FormInput("Tool-call parser"),
    "ENABLE_AUTO_TOOL_CHOICE": FormInput("Automatic tool choice"),
    "REASONING_PARSER": FormInput("Reasoning parser"),
    "CHAT_TEMPLATE": FormInput("Chat template"),
    "AUDIO_LIMIT": FormInput("Audio clips per request"),
    "SPECULATIVE_CONFIG": FormInput("Speculative decoding (JSON)"),
    "KV_CACHE_DTYPE": FormInput("KV cache data type"),
    "GENERATION_CONFIG": FormInput("Generation config"),
    "LOAD_FORMAT": FormInput("Weight format"),
    "MM_ENCODER_TP_MODE": FormInput("Vision encoder across GPUs"),
    "MM_PROCESSOR_CACHE_GB": FormInput("Media processor cache (GiB)"),
    "VLLM_EXTRA_ARGS": FormInput("Extra engine flags"),
    "QUANTIZATION": FormInput("Quantization"),
    "DTYPE": FormInput("Data type"),
    "TRUST_REMOTE_CODE": FormInput("Trust remote code"),
    "ENFORCE_EAGER": FormInput("Eager mode"),
    "TENSOR_PARALLEL_SIZE": FormInput("GPUs per replica"),
    "MAX_NUM_SEQS": FormInput("Batched sequences"),
    "MAX_BATCHED_TOKENS": FormInput("Tokens per engine step"),
    "ENABLE_CHUNKED_PREFILL": FormInput("Chunked prefill"),
    "LORA_MODULES": FormInput("LoRA adapters"),
    "MAX_LORAS": FormInput("LoRA adapters per batch"),
    "MAX_LORA_RANK": FormInput("Highest LoRA rank"),
    "ENGINE_STARTUP_TIMEOUT_S": FormInput("Startup timeout (s)"),
    "FIT_CHECK": FormInput("Check that the model fits before downloading it"),
    "WARMUP": FormInput("Warm up the engine before ready"),
    "ON_STARTUP_FAILURE": FormInput("After a failed start"),
    "MAX_QUEUE": FormInput("Queued requests"),
    "QUEUE_TIMEOUT_S": FormInput("Queue timeout (s)"),
    "REQUEST_TIMEOUT_S": FormInput(
        "Request timeout (s)", note="RunPod Serverless ends a request after 5.5 minutes: stay below 330."
    ),
    "MAX_TOKENS_CAP": FormInput("max_tokens cap for /generate"),
    "MAX_REQUEST_BYTES": FormInput(
        "Largest request (bytes)", note="RunPod Serverless accepts at most 30 MB per request."
    ),
    "MAX_IMAGE_BYTES": FormInput("Largest image (bytes)"),
    "MAX_VIDEO_BYTES": FormInput("Largest video (bytes)"),
    "MAX_IMAGE_PIXELS": FormInput("Largest image (pixels)"),
    "MAX_IMAGE_SIDE": FormInput("Downscale images above (pixels per side)"),
    "MAX_VIDEO_PIXELS": FormInput("Largest video frame (pixels)"),
    "MAX_VIDEO_FRAMES": FormInput("Most video frames"),
    "MAX_VIDEO_SECONDS": FormInput("Longest video (s)"),
    "ALLOWED_MEDIA_DOMAINS": FormInput("Media URL hosts"),
    "MEDIA_FETCH_TIMEOUT_S": FormInput("Media fetch timeout (s)"),
    "PUBLIC_METRICS": FormInput("Public /metrics and /info"),
    "CORS_ALLOW_ORIGINS": FormInput("CORS origins"),
    "CONVERSATIONS_ENABLED": FormInput("Store /generate conversations"),
    "CONVERSATIONS_DB_URL": FormInput(
        "Conversation database",
        note="Set it when a Serverless endpoint has several workers, so that every worker sees every "
        "conversation. " + secret_note("conversations_db_url"),
    ),
    "CONVERSATIONS_TTL_S": FormInput("Conversation lifetime (s)"),
    "LOG_FORMAT": FormInput("Log format"),
    "LOG_LEVEL": FormInput("Log level"),
    "MODELS": FormInput(
        "Several models (instead of Model)",
        note="Size the container disk or the network volume for all of them.",
    ),
    "MODELS_CONFIG": FormInput(
        "Per-model settings file", note="Put the file on the network volume, e.g. /runpod-volume/models.yaml."
    ),
    "MAX_LOADED_MODELS": FormInput("Models loaded at once"),
    "MODEL_IDLE_TTL_S": FormInput("Unload an idle model after (s)"),
    "MODELS_DOWNLOAD": FormInput("When to download the models"),
    "MODEL_SLEEP": FormInput("Park swapped-out models in host memory"),
    "SLEEP_HOST_MEMORY_GB": FormInput("Host memory for parked models (GiB)"),
}

# Settings the form leaves out on purpose; every setting is in FORM or here.
OFF_FORM = frozenset(
    {
        # Set by the platform or the listing itself.
        "PORT",
        "PORT_HEALTH",
        "HEALTH_CHECK_PATH",
        "HOST",
        "HF_HOME",
        "CACHE_VOLUMES",
        "DEVICE",
        "VLLM_PORT",
        "ENGINE_URL",
        # One GPU node per worker; CPU-engine only.
        "PIPELINE_PARALLEL_SIZE",
        "DATA_PARALLEL_SIZE",
        "DISTRIBUTED_EXECUTOR_BACKEND",
        "VLLM_CPU_KVCACHE_SPACE",
        # Supervision, connection and drain timings whose defaults suit RunPod.
        "ENGINE_HEALTH_TIMEOUT_S",
        "ON_ENGINE_FAILURE",
        "WORKERS",
        "STREAM_IDLE_TIMEOUT_S",
        "SSE_KEEPALIVE_S",
        "DRAIN_TIMEOUT_S",
        "HEADER_READ_TIMEOUT_S",
        "BODY_READ_TIMEOUT_S",
        "CONVERSATIONS_DB_TIMEOUT_S",
        # For trusted private networks, not a cloud endpoint.
        "ALLOW_PRIVATE_MEDIA_URLS",
    }
)


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict[str, Any]


# One model of each kind. The templates deploy the vision preset.
TEXT = Preset(
    "Text: Qwen2.5-7B-Instruct",
    {"MODEL_NAME": "Qwen/Qwen2.5-7B-Instruct", "MAX_MODEL_LEN": 8192, "IMAGE_LIMIT": 0, "VIDEO_LIMIT": 0},
)
VISION = Preset(
    "Vision: Qwen2-VL-2B-Instruct",
    {"MODEL_NAME": "Qwen/Qwen2-VL-2B-Instruct", "MAX_MODEL_LEN": 8192, "IMAGE_LIMIT": 4, "VIDEO_LIMIT": 1},
)
EMBEDDING = Preset(
    "Embeddings: Qwen3-Embedding-0.6B",
    {
        "MODEL_NAME": "Qwen/Qwen3-Embedding-0.6B",
        "MAX_MODEL_LEN": 8192,
        "IMAGE_LIMIT": 0,
        "VIDEO_LIMIT": 0,
        "RUNNER": "pooling",
        "CONVERT": "embed",
    },
)
PRESETS = (TEXT, VISION, EMBEDDING)
TEMPLATE_PRESET = VISION

HUB_TITLE = "vLLM Inference API"
HUB_DESCRIPTION = (
    "Any vLLM-supported Hugging Face model (text, vision-language or embeddings) behind an "
    "OpenAI-compatible API, on a load-balancing endpoint or a pod: streaming, image and video checks, "
    "/generate with stored conversations, /health with download progress, Prometheus metrics."
)
POD_README = (
    "OpenAI-compatible API for any vLLM-supported Hugging Face model (text or vision-language). "
    "Open https://{POD_ID}-8000.proxy.runpod.net/health to watch the model load; then use "
    "/v1/chat/completions. Set HF_TOKEN and API_KEY as RunPod secrets ({{ RUNPOD_SECRET_name }}), "
    "never in this template. The model cache lives on the volume at /runpod-volume/huggingface-cache, "
    "so restarts skip the download. The pod proxy ends requests that send no byte for about 100 s: "
    "use stream=true for long generations."
)
SERVERLESS_README = (
    "Worker for a RunPod load-balancing Serverless endpoint. RunPod polls GET /ping on PORT_HEALTH: "
    "204 while the model downloads and loads, 200 when ready. Requests go to "
    "https://ENDPOINT_ID.api.runpod.ai/v1/chat/completions with your RunPod API key as the bearer token "
    "(leave API_KEY unset: that header carries the RunPod key). Attach a network volume: it mounts at "
    "/runpod-volume and the model cache goes to /runpod-volume/huggingface-cache. RunPod limits: 30 MB "
    "per request, 5.5 min per request, no queue. /generate conversations stay on the worker that "
    "started them unless CONVERSATIONS_DB_URL is set: send the X-Runpod-Worker-Id header of a "
    "conversation's first reply back with its next turns (client_example.py does)."
)


class ListingError(ValueError):
    """The listing cannot be rendered from these settings; the message says what to change here."""


# --- Inputs from settings ---------------------------------------------------------------------


def _value_type(annotation: Any) -> Any:
    """`int | None` -> int; a Literal stays a Literal; `int | Literal["auto"]` is typed in as a string."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kinds[0] if len(kinds) == 1 else str
    return annotation


def _json_number(value: float) -> float:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _bounds(metadata: list[Any], number: type) -> dict[str, int | float]:
    bounds: dict[str, int | float] = {}
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["min"] = _json_number(item.ge)
        elif isinstance(item, annotated_types.Gt) and number is int:
            bounds["min"] = item.gt + 1  # an exclusive bound on a float has no form equivalent
        elif isinstance(item, annotated_types.Le):
            bounds["max"] = _json_number(item.le)
    return bounds


def hub_input(settings: type[Settings], name: str, form: FormInput) -> dict[str, Any]:
    """The Hub form input of one setting."""
    field = settings.model_fields[name]
    kind = _value_type(field.annotation)
    description = f"{field.description} {form.note}".strip()
    entry: dict[str, Any] = {"name": form.label, "description": description}
    default = field.default
    if name == "MODEL_NAME":
        entry["type"] = "huggingface"
    elif kind is bool:
        entry.update(type="boolean", trueValue="true", falseValue="false")
    elif kind in (int, float):
        entry.update(type="number", **_bounds(field.metadata, kind))
        default = None if default is None else _json_number(default)
    elif get_origin(kind) is Literal:
        entry.update(type="string", options=[{"label": str(value), "value": str(value)} for value in get_args(kind)])
    elif kind in (str, SecretStr):
        entry["type"] = "string"
    else:
        raise ListingError(f"{name}: no Hub input type for {kind!r}; take it off the form (OFF_FORM)")
    if default is not None and default != "":
        entry["default"] = default
    if form.required:
        entry["required"] = True
    entry["advanced"] = form.advanced
    return {"key": name, "input": entry}


def check_coverage(settings: type[Settings]) -> None:
    """Every setting is on the form or deliberately off it, and nothing else is."""
    names = set(settings.model_fields)
    unplaced = sorted(names - set(FORM) - OFF_FORM)
    unknown = sorted((set(FORM) | OFF_FORM) - names)
    if unplaced:
        raise ListingError(
            f"{', '.join(unplaced)}: put each in FORM (users set it from the RunPod Hub form) or in OFF_FORM, "
            "in tools/runpod_listing.py, then run python tools/settings_docs.py"
        )
    if unknown:
        raise ListingError(
            f"{', '.join(unknown)}: no such setting in app/config.py; remove it from tools/runpod_listing.py"
        )


# --- The four files ----------------------------------------------------------------------------


def render_hub(settings: type[Settings] = Settings) -> dict[str, Any]:
    check_coverage(settings)
    env = [{"key": key, "value": value} for key, value in HUB_STATIC_ENV.items()]
    env += [hub_input(settings, name, form) for name, form in FORM.items()]
    return {
        "title": HUB_TITLE,
        "description": HUB_DESCRIPTION,
        "type": "serverless",
        "category": "language",
        "config": {
            "runsOn": "GPU",
            "endpointType": "LB",
            "containerDiskInGb": HUB_CONTAINER_DISK_GB,
            "gpuCount": 1,
            "gpuIds": GPU_POOLS,
            "allowedCudaVersions": CUDA_VERSIONS,
            "presets": [
                {"name": preset.name, "defaults": {**preset.values, **SERVERLESS_LIMITS}} for preset in PRESETS
            ],
            "env": env,
        },
    }


def render_tests(settings: type[Settings] = Settings) -> dict[str, Any]:
    model = settings.model_fields["MODEL_NAME"].default
    return {
        "tests": [{"name": "chat_completion", "input": HUB_TEST_BODY, "timeout": HUB_TEST_TIMEOUT_MS}],
        "config": {
            "gpuTypeId": TEST_GPU,
            "gpuCount": 1,
            "env": [{"key": "MODEL_NAME", "value": model}, {"key": "MAX_MODEL_LEN", "value": "2048"}],
            "allowedCudaVersions": CUDA_VERSIONS,
        },
    }


def env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(_json_number(value)) if isinstance(value, (int, float)) else str(value)


def template_env(settings: type[Settings], static: dict[str, Any]) -> dict[str, str]:
    """The template preset, and the form's other basic inputs with their defaults (never a secret)."""
    check_coverage(settings)
    env: dict[str, str] = {}
    for name, form in FORM.items():
        field = settings.model_fields[name]
        if form.advanced or _value_type(field.annotation) is SecretStr:
            continue
        value = TEMPLATE_PRESET.values.get(name, field.default)
        if value is not None and value != "":
            env[name] = env_text(value)
    env.update({name: env_text(value) for name, value in static.items()})
    return env


def render_pod_template(settings: type[Settings] = Settings) -> dict[str, Any]:
    return {
        "name": "vllm-inference-api",
        "imageName": IMAGE_NAME,
        "category": "NVIDIA",
        "isServerless": False,
        "containerDiskInGb": 30,
        "volumeInGb": 100,
        "volumeMountPath": "/runpod-volume",
        "ports": [f"{POD_STATIC_ENV['PORT']}/http"],
        "env": template_env(settings, POD_STATIC_ENV),
        "readme": POD_README,
    }


def render_serverless_template(settings: type[Settings] = Settings) -> dict[str, Any]:
    return {
        "name": "vllm-inference-api-serverless-lb",
        "imageName": IMAGE_NAME,
        "category": "NVIDIA",
        "isServerless": True,
        "containerDiskInGb": 30,
        "volumeInGb": 0,
        "ports": [f"{SERVERLESS_STATIC_ENV['PORT']}/http"],
        "env": template_env(settings, {**SERVERLESS_STATIC_ENV, **SERVERLESS_LIMITS}),
        "readme": SERVERLESS_README,
    }


def as_text(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def rendered_files(settings: type[Settings] = Settings) -> dict[Path, str]:
    """Every RunPod file, as tools/settings_docs.py writes it."""
    return {
        HUB_JSON: as_text(render_hub(settings)),
        TESTS_JSON: as_text(render_tests(settings)),
        POD_TEMPLATE: as_text(render_pod_template(settings)),
        SERVERLESS_TEMPLATE: as_text(render_serverless_template(settings)),
    }
