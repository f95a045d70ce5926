"""Environment → vLLM flags, and one clear line for every invalid setting."""

from __future__ import annotations

import json

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
