"""Environment → vLLM flags, and one clear line for every invalid setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import ConfigError, load_settings
from app.lifecycle.engine_args import ENGINE_MEDIA_DOMAIN, build_engine_args, build_engine_launch, engine_env

TEXT = frozenset({"text"})
VISION = frozenset({"text", "image", "video"})


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_defaults_serve_the_model_on_the_internal_port() -> None:
    settings = load_settings({"MODEL_NAME": "org/model"})
    args = build_engine_args(settings, "/cache/snap", TEXT)
    assert flag(args, "--model") == "/cache/snap"
    assert flag(args, "--served-model-name") == "org/model"
    assert flag(args, "--host") == "127.0.0.1"
    assert flag(args, "--port") == "8001"
    assert "--enable-chunked-prefill" in args
    assert "--limit-mm-per-prompt" not in args  # text-only model
    assert "--enforce-eager" not in args and "--trust-remote-code" not in args


def test_every_documented_variable_maps_to_its_flag() -> None:
    settings = load_settings({
        "MODEL_NAME": "org/vl", "SERVED_MODEL_NAME": "vision", "VLLM_PORT": "9100",
        "MAX_MODEL_LEN": "4096", "GPU_MEMORY_UTIL": "0.8", "MAX_NUM_SEQS": "64",
        "TENSOR_PARALLEL_SIZE": "2", "PIPELINE_PARALLEL_SIZE": "2", "DATA_PARALLEL_SIZE": "3",
        "DISTRIBUTED_EXECUTOR_BACKEND": "ray", "MAX_BATCHED_TOKENS": "2048", "ENABLE_CHUNKED_PREFILL": "false",
        "IMAGE_LIMIT": "3", "VIDEO_LIMIT": "2", "DTYPE": "bfloat16", "QUANTIZATION": "awq",
        "TRUST_REMOTE_CODE": "true", "ENFORCE_EAGER": "1", "VLLM_EXTRA_ARGS": "--seed 7 --disable-log-stats",
    })
    args = build_engine_args(settings, "/m", VISION)
    assert flag(args, "--served-model-name") == "vision"
    assert flag(args, "--port") == "9100"
    assert flag(args, "--max-model-len") == "4096"
    assert flag(args, "--gpu-memory-utilization") == "0.8"
    assert flag(args, "--max-num-seqs") == "64"
    assert flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--pipeline-parallel-size") == "2"
    assert flag(args, "--data-parallel-size") == "3"
    assert flag(args, "--distributed-executor-backend") == "ray"
    assert flag(args, "--max-num-batched-tokens") == "2048"
    assert "--no-enable-chunked-prefill" in args and "--enable-chunked-prefill" not in args
    assert json.loads(flag(args, "--limit-mm-per-prompt")) == {"image": 3, "video": 2}
    assert flag(args, "--dtype") == "bfloat16"
    assert flag(args, "--quantization") == "awq"
    assert "--trust-remote-code" in args and "--enforce-eager" in args
    assert args[-3:] == ["--seed", "7", "--disable-log-stats"]


def test_media_limits_only_for_modalities_the_model_has() -> None:
    settings = load_settings({"IMAGE_LIMIT": "2", "VIDEO_LIMIT": "1"})
    args = build_engine_args(settings, "/m", frozenset({"text", "image"}))
    assert json.loads(flag(args, "--limit-mm-per-prompt")) == {"image": 2}


def test_engine_fetches_no_media_urls_itself() -> None:
    args = build_engine_args(load_settings({}), "/m", VISION)
    assert flag(args, "--allowed-media-domains") == ENGINE_MEDIA_DOMAIN
    assert ENGINE_MEDIA_DOMAIN.endswith(".invalid")  # a reserved name that never resolves


def test_lora_modules_enable_lora() -> None:
    settings = load_settings({"LORA_MODULES": "sql=org/sql-lora", "MAX_LORAS": "2", "MAX_LORA_RANK": "32"})
    args = build_engine_args(settings, "/m", TEXT, {"sql": "/cache/sql"})
    assert "--enable-lora" in args
    assert flag(args, "--lora-modules") == "sql=/cache/sql"
    assert flag(args, "--max-loras") == "2" and flag(args, "--max-lora-rank") == "32"


def test_cpu_engine_environment() -> None:
    settings = load_settings({"VLLM_CPU_KVCACHE_SPACE": "3"})
    env = engine_env(settings, "cpu", base={})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_LOOPBACK_IP"] == "127.0.0.1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine_env(settings, "cuda", base={})


WRAPPER_SECRETS = {
    "API_KEY": "sk-wrapper-key",
    "CONVERSATIONS_DB_URL": "postgresql://app:db-password@db:5432/chat",
    "HF_TOKEN": "hf_secret_token",
    "HUGGING_FACE_HUB_TOKEN": "hf_secret_token",
    "VLLM_API_KEY": "stray-engine-key",
    "PGPASSWORD": "db-password",
}
# What operators set for the engine and its libraries; none of it is a setting of the image.
ENGINE_VARIABLES = {
    "CUDA_VISIBLE_DEVICES": "0,1",
    "NCCL_SOCKET_IFNAME": "eth0",
    "NCCL_DEBUG": "INFO",
    "VLLM_LOGGING_LEVEL": "DEBUG",
    "VLLM_ATTENTION_BACKEND": "FLASHINFER",
    "OMP_NUM_THREADS": "8",
    "TORCH_CUDA_ARCH_LIST": "8.0",
    "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
    "PATH": "/usr/bin",
    "HOME": "/root",
    "HF_HOME": "/cache/hf",
    "HF_HUB_OFFLINE": "1",
    "AWS_ACCESS_KEY_ID": "for-a-model-loader",
}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_engine_gets_the_containers_environment_without_the_wrappers_settings_and_secrets(device: str) -> None:
    wrapper_settings = {
        "PORT": "8000", "HOST": "0.0.0.0", "VLLM_PORT": "8001", "MODEL_NAME": "org/model", "LOG_LEVEL": "DEBUG",
        "MAX_CONCURRENT_REQUESTS": "8", "ON_ENGINE_FAILURE": "restart", "VLLM_EXTRA_ARGS": "--seed 1",
        "conversations_db_url": "postgresql://lower:case@db/chat",  # settings are read in any case
    }
    base = {**ENGINE_VARIABLES, **WRAPPER_SECRETS, **wrapper_settings}
    env = engine_env(load_settings(base), device, base=base)

    assert {name: env.get(name) for name in ENGINE_VARIABLES} == ENGINE_VARIABLES
    for name in [*WRAPPER_SECRETS, *wrapper_settings]:
        assert name not in env, name
    values = "\n".join(env.values())
    for secret in [*WRAPPER_SECRETS.values(), "lower:case"]:
        assert secret not in values


def test_forced_cpu_device_runs_the_engine_module() -> None:
    launch = build_engine_launch(load_settings({"DEVICE": "cpu"}), "/m", TEXT, base_env={})
    assert launch.device == "cpu"
    assert launch.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"MAX_MODEL_LEN": "lots"}, "MAX_MODEL_LEN"),
        ({"MAX_MODEL_LEN": "-5"}, "MAX_MODEL_LEN"),
        ({"GPU_MEMORY_UTIL": "1.5"}, "GPU_MEMORY_UTIL"),
        ({"GPU_MEMORY_UTIL": "ninety"}, "GPU_MEMORY_UTIL"),
        ({"MAX_NUM_SEQS": "0"}, "MAX_NUM_SEQS"),
        ({"TENSOR_PARALLEL_SIZE": "two"}, "TENSOR_PARALLEL_SIZE"),
        ({"DTYPE": "fp7"}, "DTYPE"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"DISTRIBUTED_EXECUTOR_BACKEND": "slurm"}, "DISTRIBUTED_EXECUTOR_BACKEND"),
        ({"IMAGE_LIMIT": "-1"}, "IMAGE_LIMIT"),
        ({"ENFORCE_EAGER": "maybe"}, "ENFORCE_EAGER"),
        ({"PORT": "70000"}, "PORT"),
        ({"LORA_MODULES": "no-equals-sign"}, "LORA_MODULES"),
        ({"MAX_MODEL_LEN": "8"}, "MAX_MODEL_LEN"),
        ({"RUNNER": "embedding"}, "RUNNER"),
        ({"CONVERT": "rerank"}, "CONVERT"),
        ({"MM_ENCODER_TP_MODE": "tensor"}, "MM_ENCODER_TP_MODE"),
        ({"MM_PROCESSOR_CACHE_GB": "-1"}, "MM_PROCESSOR_CACHE_GB"),
        ({"AUDIO_LIMIT": "-1"}, "AUDIO_LIMIT"),
        ({"ENABLE_AUTO_TOOL_CHOICE": "sometimes"}, "ENABLE_AUTO_TOOL_CHOICE"),
    ],
)
def test_invalid_setting_fails_with_one_line_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ)
    message = str(raised.value)
    assert variable in message
    assert "\n" not in message and "Traceback" not in message


def test_unbalanced_quote_in_extra_args_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="VLLM_EXTRA_ARGS"):
        build_engine_args(load_settings({"VLLM_EXTRA_ARGS": "--chat-template 'unclosed"}), "/m", TEXT)


def test_secret_values_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"HF_TOKEN": "hf_secret_value", "MAX_MODEL_LEN": "x"})
    assert "hf_secret_value" not in str(raised.value)


def test_served_model_name_defaults_to_model_name() -> None:
    assert load_settings({"MODEL_NAME": "org/x"}).served_model_name == "org/x"
    assert load_settings({"MODEL_NAME": "org/x", "SERVED_MODEL_NAME": "x"}).served_model_name == "x"


def test_a_local_directory_is_served_under_its_folder_name(tmp_path: Path) -> None:
    model = tmp_path / "models" / "my-model"
    model.mkdir(parents=True)
    for given in (str(model), f"{model}/"):
        settings = load_settings({"MODEL_NAME": given})
        assert settings.served_model_names == ("my-model",)
        assert flag(build_engine_args(settings, model, TEXT), "--served-model-name") == "my-model"


def test_a_path_is_named_by_its_folder_even_before_it_is_mounted() -> None:
    assert load_settings({"MODEL_NAME": "/models/not-mounted-here"}).served_model_name == "not-mounted-here"


def test_a_remote_engine_keeps_model_name_as_given() -> None:
    """docker-compose's split engine is stock vLLM started with --served-model-name $MODEL_NAME."""
    settings = load_settings({"MODEL_NAME": "/models/x", "ENGINE_URL": "http://engine:8001"})
    assert settings.served_model_names == ("/models/x",)


def test_a_hub_cache_snapshot_is_served_under_its_hub_id(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert load_settings({"MODEL_NAME": str(snapshot)}).served_model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_served_names_and_aliases_all_reach_the_engine_first_one_reported(tmp_path: Path) -> None:
    model = tmp_path / "smollm2-135m-instruct"
    model.mkdir()
    settings = load_settings({
        "MODEL_NAME": str(model), "SERVED_MODEL_NAME": "HuggingFaceTB/SmolLM2-135M-Instruct, smollm2-135m-instruct",
    })
    assert settings.served_model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert settings.served_model_names == ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    args = build_engine_args(settings, model, TEXT)
    start = args.index("--served-model-name") + 1
    assert args[start:start + 3] == [*settings.served_model_names, "--host"]


def test_served_model_name_replaces_the_default_name(tmp_path: Path) -> None:
    """What /v1/models lists is what was set: no alias the user did not ask for."""
    model = tmp_path / "tiny-llama"
    model.mkdir()
    assert load_settings({"MODEL_NAME": str(model), "SERVED_MODEL_NAME": "tiny-chat"}).served_model_names == ("tiny-chat",)


def test_named_engine_settings_map_to_their_flags() -> None:
    settings = load_settings({
        "TOOL_CALL_PARSER": "hermes", "ENABLE_AUTO_TOOL_CHOICE": "true", "REASONING_PARSER": "deepseek_r1",
        "CHAT_TEMPLATE": "{{ messages }}", "SPECULATIVE_CONFIG": '{"method": "ngram"}', "KV_CACHE_DTYPE": "fp8",
        "GENERATION_CONFIG": "vllm", "LOAD_FORMAT": "safetensors", "RUNNER": "pooling", "CONVERT": "embed",
        "MM_PROCESSOR_CACHE_GB": "2", "MAX_MODEL_LEN": "auto",
    })
    args = build_engine_args(settings, "/m", TEXT)
    assert flag(args, "--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" in args
    assert flag(args, "--reasoning-parser") == "deepseek_r1"
    assert flag(args, "--chat-template") == "{{ messages }}"
    assert flag(args, "--speculative-config") == '{"method": "ngram"}'
    assert flag(args, "--kv-cache-dtype") == "fp8"
    assert flag(args, "--generation-config") == "vllm"
    assert flag(args, "--load-format") == "safetensors"
    assert flag(args, "--runner") == "pooling" and flag(args, "--convert") == "embed"
    assert flag(args, "--mm-processor-cache-gb") == "2.0"
    assert flag(args, "--max-model-len") == "auto"


def test_unset_engine_settings_leave_the_engine_defaults() -> None:
    args = build_engine_args(load_settings({"TOOL_CALL_PARSER": "", "SPECULATIVE_CONFIG": " "}), "/m", TEXT)
    for absent in ("--tool-call-parser", "--enable-auto-tool-choice", "--reasoning-parser", "--chat-template",
                   "--speculative-config", "--kv-cache-dtype", "--load-format", "--mm-processor-cache-gb"):
        assert absent not in args
    assert flag(args, "--runner") == "auto" and flag(args, "--convert") == "auto"


def test_audio_models_get_an_audio_limit() -> None:
    settings = load_settings({"AUDIO_LIMIT": "2"})
    args = build_engine_args(settings, "/m", frozenset({"text", "audio"}))
    assert json.loads(flag(args, "--limit-mm-per-prompt")) == {"audio": 2}
    assert "--mm-encoder-tp-mode" not in args  # no vision encoder


def test_vision_encoders_run_data_parallel_by_default() -> None:
    assert flag(build_engine_args(load_settings({}), "/m", VISION), "--mm-encoder-tp-mode") == "data"
    weights = load_settings({"MM_ENCODER_TP_MODE": "weights"})
    assert flag(build_engine_args(weights, "/m", VISION), "--mm-encoder-tp-mode") == "weights"
    assert "--mm-encoder-tp-mode" not in build_engine_args(load_settings({}), "/m", TEXT)


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto "])
def test_max_model_len_auto_lets_the_engine_fit_the_context(value: str) -> None:
    assert load_settings({"MAX_MODEL_LEN": value}).MAX_MODEL_LEN == "auto"
