"""Every setting of the image, in one place.

The container is configured only through environment variables (RunPod
templates, compose `.env` files, Kubernetes manifests). This module is the
single source of truth for their names, types, defaults and descriptions:
`.env.example` and the README's settings table are checked against it by
`tests/unit/test_settings_docs.py`.

An invalid value fails at start with one line naming the variable
(`ConfigError`), never with a traceback from deep inside the engine.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.cpus import auto_workers

if TYPE_CHECKING:
    from app.catalog import ModelCatalog

RUNPOD_VOLUME = Path("/runpod-volume")
# Where RunPod mounts a network volume: Serverless workers, then pods.
DEFAULT_CACHE_VOLUMES = f"{RUNPOD_VOLUME},/workspace"
# A MODEL_NAME starting like this is a path even where the directory is not mounted (a split gateway).
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")
MiB = 1024 * 1024

POSTGRES_SCHEMES = ("postgresql://", "postgres://")

Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


class ConfigError(ValueError):
    """A setting is invalid; the message names the variable and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- Model -----------------------------------------------------------
    MODEL_NAME: str = Field(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        description="Hugging Face model id or a local model directory.",
    )
    MODEL_REVISION: str | None = Field(
        None, description="Branch, tag or commit of MODEL_NAME to serve (default: main)."
    )
    SERVED_MODEL_NAME: str | None = Field(
        None,
        description=(
            "Model name clients send in `model`; comma-separated names are all accepted and the first is reported "
            "(default: a local directory's folder name, a Hub snapshot's Hub id, else MODEL_NAME)."
        ),
    )
    MODELS: str = Field(
        "",
        description=(
            "Several models in one deployment, loaded when a request names them: comma-separated "
            "[served-name=]hub-id-or-directory (MODEL_NAME and SERVED_MODEL_NAME are then ignored)."
        ),
    )
    MODELS_CONFIG: str | None = Field(
        None, description="YAML or JSON file of per-model settings for MODELS: served-name: {SETTING: value}."
    )
    MAX_LOADED_MODELS: int = Field(1, ge=1, description="With MODELS, most engines running at once; the least recently used idle one is stopped first.")
    MODEL_IDLE_TTL_S: float = Field(0.0, ge=0, description="With MODELS, a model unused this long is unloaded (0: never).")
    MODELS_DOWNLOAD: Literal["eager", "lazy"] = Field(
        "eager", description="With MODELS: check and download every model at start (eager), or each at its first request (lazy)."
    )
    MODEL_SLEEP: Literal["auto", "off"] = Field(
        "auto", description="With MODELS, an evicted model's engine sleeps (vLLM sleep mode: weights parked in host "
        "memory, woken in seconds) instead of stopping: auto = on when DEVICE resolves to cuda, off = always stop."
    )
    SLEEP_HOST_MEMORY_GB: float = Field(
        16.0, ge=0, description="With MODELS and sleep mode, most host memory (GiB) the sleeping models' weights may "
        "hold; past it the least recently used sleeping model is stopped (0: none sleeps)."
    )
    HF_TOKEN: SecretStr | None = Field(
        None, description="Hugging Face token for gated or private models. Never logged."
    )
    HF_HOME: Path = Field(
        Path.home() / ".cache" / "huggingface",
        description="Model cache directory, used when none of CACHE_VOLUMES is mounted.",
    )
    CACHE_VOLUMES: str = Field(
        DEFAULT_CACHE_VOLUMES,
        description="Comma-separated volume mount points; the first that exists holds the model and compile caches "
        "(in its huggingface-cache folder) instead of HF_HOME.",
    )
    LORA_MODULES: str = Field(
        "", description="LoRA adapters to serve, as comma-separated name=hub-id-or-path pairs."
    )
    MAX_LORAS: int = Field(1, ge=1, description="Adapters that can be active in one batch.")
    MAX_LORA_RANK: int = Field(16, ge=1, description="Highest LoRA rank among the adapters.")

    # --- Engine ----------------------------------------------------------
    DEVICE: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Engine device: auto picks cuda when an NVIDIA GPU is visible, else cpu."
    )
    VLLM_PORT: int = Field(8001, ge=1, le=65535, description="Internal port of the engine (bound to 127.0.0.1).")
    MAX_MODEL_LEN: int | Literal["auto"] | None = Field(
        None, description="Context length in tokens, or auto: the longest the KV cache holds (default: the model's own)."
    )
    GPU_MEMORY_UTIL: float = Field(
        0.90, gt=0.0, le=1.0, description="Fraction of GPU memory the engine may use."
    )
    MAX_NUM_SEQS: int | None = Field(None, ge=1, description="Sequences batched together (default: the engine's).")
    MAX_BATCHED_TOKENS: int | None = Field(
        None, ge=16, description="Tokens per engine step (default: the engine's)."
    )
    ENABLE_CHUNKED_PREFILL: bool = Field(True, description="Split long prompts across engine steps.")
    TENSOR_PARALLEL_SIZE: int = Field(1, ge=1, description="GPUs per model replica (tensor parallel).")
    PIPELINE_PARALLEL_SIZE: int = Field(1, ge=1, description="Pipeline stages.")
    DATA_PARALLEL_SIZE: int = Field(1, ge=1, description="Model replicas in data parallel.")
    DISTRIBUTED_EXECUTOR_BACKEND: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        None, description="Executor for multi-GPU runs; ray spans several nodes."
    )
    IMAGE_LIMIT: int = Field(4, ge=0, description="Images allowed per request (0: no images).")
    VIDEO_LIMIT: int = Field(1, ge=0, description="Videos allowed per request (0: no video).")
    AUDIO_LIMIT: int = Field(1, ge=0, description="Audio clips allowed per request, for models that take audio (0: none).")
    DTYPE: Dtype = Field("auto", description="Weight and activation dtype.")
    QUANTIZATION: str | None = Field(None, description="Quantization method, e.g. awq, gptq, fp8.")
    TRUST_REMOTE_CODE: bool = Field(False, description="Allow model repositories to run their own code.")
    ENFORCE_EAGER: bool = Field(False, description="Skip graph capture and compilation: faster start, slower decode.")
    VLLM_EXTRA_ARGS: str = Field("", description="Extra engine flags, shell-quoted, passed through as they are.")
    VLLM_CPU_KVCACHE_SPACE: int = Field(
        4, ge=1, description="KV cache size in GiB on the CPU engine."
    )
    ENGINE_STARTUP_TIMEOUT_S: float = Field(
        1800.0, gt=0, description="Longest time the engine may take to load before startup fails."
    )
    FIT_CHECK: bool = Field(
        True,
        description="Before the download, refuse a model whose weights or one MAX_MODEL_LEN sequence cannot fit "
        "the engine's memory (estimated from config.json and file sizes).",
    )
    WARMUP: bool = Field(
        True,
        description="Before reporting ready, send the engine one generation (and one small image for a vision "
        "model), so the first user request pays no lazy initialisation.",
    )
    # A busy engine still answers /health within seconds (its API server's event loop is
    # only blocked by work such as tokenizing a huge prompt or decoding media); a minute of
    # silence means a hung engine, which is replaced well before clients give up on it.
    ENGINE_HEALTH_TIMEOUT_S: float = Field(
        60.0, ge=0, description="While serving, an engine whose /health fails this long is killed like a crash (0: never)."
    )
    ON_STARTUP_FAILURE: Literal["exit", "serve"] = Field(
        "serve", description="After a failed start: serve the error on every route, or exit non-zero."
    )
    ON_ENGINE_FAILURE: Literal["exit", "restart"] = Field(
        "exit", description="After the engine dies or stops answering while serving: exit non-zero, or relaunch it in place."
    )
    ENGINE_URL: str | None = Field(
        None, description="Front an engine that runs elsewhere (e.g. http://vllm:8001); no engine is started."
    )

    # --- Engine features: tools, reasoning, pooling, decoding ---------------
    # Passed to the engine as they are; the engine's own parser checks them at start (flag_check).
    ENABLE_AUTO_TOOL_CHOICE: bool = Field(
        False, description="Let the model decide to call tools (tool_choice auto); needs TOOL_CALL_PARSER."
    )
    TOOL_CALL_PARSER: str | None = Field(
        None, description="Parser of the model's tool calls, e.g. hermes, llama3_json, mistral; enables tool_choice required and named."
    )
    REASONING_PARSER: str | None = Field(
        None, description="Parser that splits reasoning from the answer, e.g. deepseek_r1, qwen3."
    )
    CHAT_TEMPLATE: str | None = Field(
        None, description="Chat template: a file path or the Jinja text itself (default: the model's own)."
    )
    SPECULATIVE_CONFIG: str | None = Field(
        None, description='Speculative decoding as JSON, e.g. {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}.'
    )
    KV_CACHE_DTYPE: str | None = Field(None, description="KV cache dtype, e.g. fp8 (default: the model's dtype).")
    GENERATION_CONFIG: str | None = Field(
        None, description="Sampling defaults: auto (the model's generation_config.json), vllm (the engine's), or a folder."
    )
    LOAD_FORMAT: str | None = Field(None, description="Weights format, e.g. safetensors, gguf, bitsandbytes (default: auto).")
    RUNNER: Literal["auto", "generate", "pooling", "draft"] = Field(
        "auto", description="Model runner: pooling serves embeddings, scores and rerank; auto decides by architecture."
    )
    CONVERT: Literal["auto", "none", "embed", "classify"] = Field(
        "auto", description="Adapt a generative model for pooling: embed (embeddings) or classify (scores)."
    )
    MM_ENCODER_TP_MODE: Literal["data", "weights"] = Field(
        "data", description="With TENSOR_PARALLEL_SIZE>1, run the vision encoder data-parallel (data) or sharded (weights)."
    )
    MM_PROCESSOR_CACHE_GB: float | None = Field(
        None, ge=0, description="Cache of processed images and video in GiB, per engine process (0: off; default: the engine's)."
    )

    # --- Wrapper ---------------------------------------------------------
    HOST: str = Field("0.0.0.0", description="Address the wrapper binds.")
    PORT: int = Field(8000, ge=1, le=65535, description="Public port of the wrapper.")
    PORT_HEALTH: int | None = Field(
        None, ge=1, le=65535, description="Extra port that serves /ping (RunPod load balancer); default PORT."
    )
    HEALTH_CHECK_PATH: str = Field(
        "/ping", description="Path the RunPod load balancer polls; it gets the /ping answers (204 loading, 200 ready)."
    )
    WORKERS: int = Field(
        default_factory=lambda: auto_workers(), ge=1, le=64, json_schema_extra={"default_text": "auto"},
        description="Wrapper processes sharing PORT; auto: a quarter of the cores the container may use "
        "(CPU affinity and quota), 1 to 8.",
    )
    API_KEY: SecretStr | None = Field(
        None, description="Comma-separated keys; when set, inference routes need `Authorization: Bearer KEY`."
    )
    PUBLIC_METRICS: bool = Field(False, description="Serve /metrics and /info without the API key.")
    CORS_ALLOW_ORIGINS: str = Field("", description="Comma-separated origins allowed by CORS (off when empty).")

    # --- Limits and timeouts ----------------------------------------------
    MAX_CONCURRENT_REQUESTS: int = Field(256, ge=1, description="Requests in flight to the engine at once.")
    MAX_QUEUE: int = Field(0, ge=0, description="Requests allowed to wait for a slot; beyond it 429 (0: no cap).")
    QUEUE_TIMEOUT_S: float = Field(30.0, gt=0, description="Longest wait for a slot before 503.")
    REQUEST_TIMEOUT_S: float = Field(600.0, gt=0, description="Longest time for a whole request before 504.")
    STREAM_IDLE_TIMEOUT_S: float = Field(120.0, gt=0, description="Longest silence between stream chunks.")
    SSE_KEEPALIVE_S: float = Field(15.0, gt=0, description="Interval of `: keep-alive` lines before the first token.")
    DRAIN_TIMEOUT_S: float = Field(30.0, ge=0, description="On SIGTERM, time given to in-flight requests to finish.")
    HEADER_READ_TIMEOUT_S: float = Field(
        10.0, gt=0, description="Longest time a client may take to send a request's headers; then the connection is closed."
    )
    BODY_READ_TIMEOUT_S: float = Field(
        60.0, gt=0, description="Longest time a client may take to send a request's body (30 MB at 4 Mbit/s); then 408."
    )
    MAX_TOKENS_CAP: int = Field(4096, ge=1, description="Upper bound on max_tokens for /generate.")

    # --- Media -----------------------------------------------------------
    MAX_REQUEST_BYTES: int = Field(30 * MiB, ge=1024, description="Largest request body (bytes); beyond it 413.")
    MAX_IMAGE_BYTES: int = Field(10 * MiB, ge=1, description="Largest image, base64 or fetched (bytes); beyond it 413.")
    MAX_VIDEO_BYTES: int = Field(25 * MiB, ge=1, description="Largest video, base64 or fetched (bytes); beyond it 413.")
    MAX_IMAGE_PIXELS: int = Field(40_000_000, ge=1, description="Largest decoded image (pixels); bigger is refused as a bomb.")
    MAX_IMAGE_SIDE: int = Field(
        2048, ge=0, description="Images with a longer side are downscaled before the engine (0: off)."
    )
    MAX_VIDEO_PIXELS: int = Field(
        1920 * 1080, ge=1, description="Largest video frame (pixels per frame, 1080p by default); bigger is refused."
    )
    MAX_VIDEO_FRAMES: int = Field(
        9000, ge=1, description="Most frames a video may have (the engine decodes up to all of them); more is refused."
    )
    MAX_VIDEO_SECONDS: float = Field(300.0, gt=0, description="Longest video (seconds); longer is refused.")
    ALLOWED_MEDIA_DOMAINS: str = Field("", description="Comma-separated hosts media URLs may use (empty: any public host).")
    ALLOW_PRIVATE_MEDIA_URLS: bool = Field(
        False, description="Allow media URLs on loopback, private and link-local addresses (cloud metadata addresses stay refused)."
    )
    MEDIA_FETCH_TIMEOUT_S: float = Field(10.0, gt=0, description="Longest time to fetch one media URL.")

    # --- Conversations (/generate) -----------------------------------------
    CONVERSATIONS_ENABLED: bool = Field(True, description="Store /generate conversations.")
    CONVERSATIONS_DB_URL: SecretStr | None = Field(
        None, description="postgresql://… for a shared store (default: SQLite file in the cache directory)."
    )
    CONVERSATIONS_TTL_S: float = Field(7 * 24 * 3600.0, gt=0, description="Conversations idle longer are deleted.")
    CONVERSATIONS_DB_TIMEOUT_S: float = Field(
        5.0, gt=0, description="Longest wait on the conversation database (connect, query, lock) before 503."
    )

    # --- Logs ------------------------------------------------------------
    LOG_FORMAT: Literal["json", "text"] = Field("json", description="Log line format.")
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Lowest level logged.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_sources):  # type: ignore[override]
        # load_settings() hands over the environment explicitly, so tests can pass their own.
        return (init_settings,)

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("WORKERS", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        return auto_workers() if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator(
        "MODEL_REVISION", "SERVED_MODEL_NAME", "QUANTIZATION", "ENGINE_URL",
        "MAX_NUM_SEQS", "MAX_BATCHED_TOKENS", "PORT_HEALTH",
        "DISTRIBUTED_EXECUTOR_BACKEND", "HF_TOKEN", "API_KEY", "CONVERSATIONS_DB_URL",
        "TOOL_CALL_PARSER", "REASONING_PARSER", "CHAT_TEMPLATE", "SPECULATIVE_CONFIG", "KV_CACHE_DTYPE",
        "GENERATION_CONFIG", "LOAD_FORMAT", "MM_PROCESSOR_CACHE_GB", "MODELS_CONFIG",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("CONVERSATIONS_DB_URL")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never repeats the value: it holds the database password.
        if value is None:
            return value
        url = value.get_secret_value().strip()
        if not url.startswith(POSTGRES_SCHEMES):
            raise PydanticCustomError(
                "postgres_url",
                "use postgresql://user:password@host:port/database, "
                "or leave it empty for the SQLite file in the cache directory",
            )
        try:
            _ = urlsplit(url).port
        except ValueError:
            raise PydanticCustomError(
                "postgres_url",
                "not a valid URL (check the host and port, and percent-encode special characters in the "
                "password): use postgresql://user:password@host:port/database",
            ) from None
        return SecretStr(url)

    @field_validator("CACHE_VOLUMES")
    @classmethod
    def _absolute_paths(cls, value: str) -> str:
        relative = [path for path in split_csv(value) if not path.startswith("/")]
        if relative:
            raise ValueError(f"{', '.join(relative)}: write absolute mount points such as /runpod-volume")
        return value

    @field_validator("HEALTH_CHECK_PATH")
    @classmethod
    def _health_check_path(cls, value: str) -> str:
        from app.routes import build_route_table

        if not value.startswith("/") or "?" in value or "#" in value or " " in value:
            raise ValueError("write a path such as /ping or /healthz, without scheme, host or query")
        taken = build_route_table().match(value)
        if value != "/ping" and taken.handler != "unknown":
            raise ValueError(f"{value} is already a route of this server ({taken.label}); pick a free path")
        return value

    @field_validator("MAX_MODEL_LEN", mode="before")
    @classmethod
    def _length_or_auto(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            if value.strip().lower() == "auto":
                return "auto"
            try:
                value = int(value)
            except ValueError:
                raise ValueError("must be a number of tokens (16 or more) or auto") from None
        if isinstance(value, int) and value < 16:
            raise ValueError("must be a number of tokens (16 or more) or auto")
        return value

    @model_validator(mode="after")
    def _check_model(self) -> Settings:
        if not self.MODEL_NAME.strip():
            raise ValueError("MODEL_NAME is empty")
        return self

    # --- Derived values ---------------------------------------------------
    @cached_property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name the engine accepts in `model`; the first is the one it reports.

        SERVED_MODEL_NAME when set, else the name a person would type for MODEL_NAME. An
        engine behind ENGINE_URL names the model on its own command line, which deployments
        build from MODEL_NAME as it is.
        """
        if self.SERVED_MODEL_NAME:
            return tuple(dict.fromkeys(split_csv(self.SERVED_MODEL_NAME)))
        return (self.MODEL_NAME,) if self.ENGINE_URL else model_aliases(self.MODEL_NAME)

    @cached_property
    def catalog(self) -> ModelCatalog | None:
        """The models of a multi-model deployment (MODELS); None when MODEL_NAME serves one model."""
        from app.catalog import ModelCatalog

        if not self.MODELS.strip():
            return None
        return ModelCatalog.build(self, self.MODELS, self.MODELS_CONFIG)

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def is_local_model(self) -> bool:
        return Path(self.MODEL_NAME).is_dir()

    @property
    def cache_volume(self) -> Path | None:
        """The first of CACHE_VOLUMES that is mounted (exists as a directory), if any."""
        return next((Path(p) for p in split_csv(self.CACHE_VOLUMES) if Path(p).is_dir()), None)

    @property
    def cache_dir(self) -> Path:
        volume = self.cache_volume
        return volume / "huggingface-cache" if volume is not None else self.HF_HOME

    @property
    def engine_url(self) -> str:
        return (self.ENGINE_URL or f"http://127.0.0.1:{self.VLLM_PORT}").rstrip("/")

    @property
    def api_keys(self) -> tuple[str, ...]:
        if self.API_KEY is None:
            return ()
        return tuple(k.strip() for k in self.API_KEY.get_secret_value().split(",") if k.strip())

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret value, for the log redaction filter."""
        values = [*self.api_keys]
        for secret in (self.HF_TOKEN, self.CONVERSATIONS_DB_URL):
            if secret is not None:
                values.append(secret.get_secret_value())
        return tuple(value for value in values if value)

    @cached_property
    def lora_modules(self) -> dict[str, str]:
        return parse_pairs("LORA_MODULES", self.LORA_MODULES)

    @property
    def allowed_media_domains(self) -> tuple[str, ...]:
        return split_csv(self.ALLOWED_MEDIA_DOMAINS.lower())

    @property
    def cors_allow_origins(self) -> tuple[str, ...]:
        return split_csv(self.CORS_ALLOW_ORIGINS)

    def redacted(self) -> dict[str, object]:
        """The effective configuration with every secret replaced by a marker."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "**********"
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def model_aliases(model_name: str) -> tuple[str, ...]:
    """The name a person would type for MODEL_NAME: a Hub id as it is, a local directory by its folder name.

    A snapshot in a Hugging Face cache (`.../models--org--name/snapshots/<commit>`) is named by its Hub id.
    """
    if not (model_name.startswith(LOCAL_PATH_PREFIXES) or Path(model_name).is_dir()):
        return (model_name,)
    path = Path(os.path.abspath(Path(model_name).expanduser()))  # no symlink resolution: the name the user mounted
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return (path.parent.parent.name.removeprefix("models--").replace("--", "/"),)
    return (path.name or model_name,)


def split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_pairs(variable: str, value: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in split_csv(value):
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ConfigError(f"{variable}: '{item}' is not name=hub-id-or-path")
        pairs[name.strip()] = target.strip()
    return pairs


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read settings from the environment, or fail with one line per bad variable."""
    env = dict(os.environ if environ is None else environ)
    known = {name.upper() for name in Settings.model_fields}
    values = {key: value for key, value in env.items() if key.upper() in known}
    try:
        settings = Settings(**{key.upper(): value for key, value in values.items()})
        _ = settings.lora_modules
        _ = settings.catalog
        return settings
    except ValidationError as exc:
        raise ConfigError(_describe(exc, values)) from None


def _describe(exc: ValidationError, values: dict[str, str]) -> str:
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]).upper() if error["loc"] else "configuration"
        secret = name in SECRET_SETTINGS
        shown = "" if secret or name not in values else f"={values[name]!r}"
        lines.append(f"Invalid setting {name}{shown}: {error['msg']}")
    return "; ".join(lines)


# Settings whose values are secrets: never shown in errors, /info or logs, never passed on.
SECRET_SETTINGS = frozenset(name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation))
