"""The fit check: a model that cannot fit is refused before its download, with the setting to change.

The configs are those of real model families (Llama 3 8B, DeepSeek-V2-Lite's
latent attention, Gemma-style sliding windows, a Mamba hybrid), cut to the
keys the check reads. There is no GPU here: NVML's answer is replaced by a
stand-in GPU of a given size. The Hub is the local double (tests/fakehub.py),
which can declare file sizes larger than the files it has, so a model of
terabytes is listed without existing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings, load_settings
from app.lifecycle import fit
from app.lifecycle.fit import Budget, GiB, check, footprint, weight_files
from app.lifecycle.model_source import prepare_model
from app.lifecycle.startup_errors import StartupError
from app.lifecycle.status import Phase
from app.observability.gpu import GpuMemory
from tests.fakehub import FakeHub, use_in_process

LLAMA_3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16", "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "max_position_embeddings": 131072,
}
KV_PER_TOKEN_LLAMA_3_8B = 2 * 8 * 128 * 2 * 32  # keys and values, 8 heads of 128, bf16, 32 layers: 128 KiB
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "model_type": "deepseek_v2", "torch_dtype": "bfloat16", "num_hidden_layers": 27, "num_attention_heads": 16,
    "kv_lora_rank": 512, "qk_rope_head_dim": 64, "hidden_size": 2048,
}
GEMMA_STYLE: dict[str, Any] = {
    "model_type": "gemma3_text", "dtype": "bfloat16", "num_hidden_layers": 6, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 1024,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
}
JAMBA_STYLE: dict[str, Any] = {
    "model_type": "jamba", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_size": 4096, "layers_block_type": ["mamba"] * 28 + ["attention"] * 4,
}


def cpu(**env: str) -> Settings:
    return load_settings({"MODEL_NAME": "org/model", "DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", **env})


def gpu(**env: str) -> Settings:
    return load_settings({"MODEL_NAME": "org/model", "DEVICE": "cuda", "GPU_MEMORY_UTIL": "0.9", **env})


def cpu_budget(total_gib: float, settings: Settings) -> Budget:
    return Budget("cpu", int(total_gib * GiB), settings.VLLM_CPU_KVCACHE_SPACE * GiB)


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> list[GpuMemory]:
    """The GPUs NVML reports: none until a test adds them."""
    readings: list[GpuMemory] = []
    monkeypatch.setattr(fit, "gpu_memory", lambda: readings)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return readings


# --- what the model needs ----------------------------------------------------------


def test_the_kv_cache_of_a_grouped_query_model_is_computed_from_its_config() -> None:
    model = footprint(LLAMA_3_8B, 16 * GiB, cpu())

    assert model.kv_bytes(1) == KV_PER_TOKEN_LLAMA_3_8B
    assert model.kv_bytes(32768) == 4 * GiB
    assert model.weight_bytes == 16 * GiB


def test_latent_attention_stores_one_compressed_vector_per_token_and_layer() -> None:
    assert footprint(DEEPSEEK_V2_LITE, 0, cpu()).kv_bytes(1) == (512 + 64) * 27 * 2


def test_sliding_window_layers_count_at_most_their_window() -> None:
    model = footprint(GEMMA_STYLE, 0, cpu())
    per_token_layer = 2 * 4 * 256 * 2

    assert model.kv_bytes(100_000) == per_token_layer * (100_000 * 1 + 1024 * 5)


def test_a_state_space_hybrid_is_not_estimated() -> None:
    assert footprint(JAMBA_STYLE, 0, cpu()).kv_bytes(100_000) is None


@pytest.mark.parametrize(
    ("config", "settings", "in_memory"),
    [
        ({"dtype": "float32"}, cpu(), 8 * GiB),  # served in 16 bits
        ({"dtype": "float32"}, cpu(DTYPE="float32"), 16 * GiB),
        ({"dtype": "bfloat16"}, gpu(QUANTIZATION="fp8"), 8 * GiB),  # quantized while loading
        ({"dtype": "bfloat16", "quantization_config": {"quant_method": "awq"}}, gpu(QUANTIZATION="awq"), 16 * GiB),
    ],
)
def test_weights_in_memory_follow_the_dtype_and_quantization(
    config: dict[str, Any], settings: Settings, in_memory: int
) -> None:
    assert footprint({**LLAMA_3_8B, **config}, 16 * GiB, settings).weight_bytes == in_memory


def test_only_the_weight_files_the_engine_loads_are_counted() -> None:
    listing = ["model.safetensors", "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth",
               "text_encoder/model.safetensors", "config.json"]
    assert weight_files(listing, None) == {"model.safetensors"}
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    assert weight_files(listing, index) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


# --- the decision, on the CPU build ------------------------------------------------------


def test_a_context_whose_kv_cache_exceeds_vllm_cpu_kvcache_space_is_refused_with_the_length_that_fits() -> None:
    settings = cpu(MAX_MODEL_LEN="32768")

    with pytest.raises(StartupError) as refused:
        check(footprint(LLAMA_3_8B, 16 * GiB, settings), cpu_budget(64, settings), settings)

    assert str(refused.value) == (
        "MAX_MODEL_LEN=32768 needs 4.0 GiB of KV cache for one sequence but VLLM_CPU_KVCACHE_SPACE=1 GiB holds "
        "8192 tokens: set MAX_MODEL_LEN to 8192 or less, or raise VLLM_CPU_KVCACHE_SPACE to 4."
    )


def test_a_context_that_fits_passes_and_the_models_own_length_is_left_to_the_engine() -> None:
    check(footprint(LLAMA_3_8B, 16 * GiB, cpu()), cpu_budget(64, cpu()), cpu(MAX_MODEL_LEN="8192"))
    check(footprint(LLAMA_3_8B, 16 * GiB, cpu()), cpu_budget(64, cpu()), cpu())  # 131072 unset: the retry's job


def test_weights_larger_than_the_machine_are_refused() -> None:
    settings = cpu()

    with pytest.raises(StartupError, match=r"needs about 30.0 GiB for its weights plus VLLM_CPU_KVCACHE_SPACE=1 GiB"
                                           r".* this machine has 16.0 GiB of memory: use a smaller or quantized "
                                           r"variant of the model \(QUANTIZATION\)"):
        check(footprint(LLAMA_3_8B, 30 * GiB, settings), cpu_budget(16, settings), settings)


# --- the decision, on GPUs ---------------------------------------------------------


def test_weights_larger_than_the_gpus_ask_for_more_gpus_or_a_quantized_variant(gpus: list[GpuMemory]) -> None:
    gpus.append(GpuMemory(0, 0, 24 * GiB))
    settings = gpu()
    memory = fit.budget(settings)
    assert memory is not None and memory.total_bytes == int(24 * GiB * 0.9)

    with pytest.raises(StartupError) as refused:
        check(footprint(LLAMA_3_8B, 30 * GiB, settings), memory, settings)

    assert str(refused.value) == (
        "MODEL_NAME 'org/model' needs about 30.0 GiB for its weights but the engine may use 21.6 GiB "
        "(GPU_MEMORY_UTIL=0.9 of 1 x 24.0 GiB GPU): use more GPUs (TENSOR_PARALLEL_SIZE=2 or more), "
        "or use a quantized variant of the model (QUANTIZATION)."
    )


def test_tensor_parallel_gpus_add_up(gpus: list[GpuMemory]) -> None:
    gpus.extend([GpuMemory(0, 0, 24 * GiB), GpuMemory(1, 0, 24 * GiB)])
    settings = gpu(TENSOR_PARALLEL_SIZE="2")
    memory = fit.budget(settings)
    assert memory is not None

    check(footprint(LLAMA_3_8B, 30 * GiB, settings), memory, settings)


def test_a_context_the_gpu_cannot_hold_names_max_model_len_and_gpu_memory_util(gpus: list[GpuMemory]) -> None:
    gpus.append(GpuMemory(0, 0, 24 * GiB))
    settings = gpu(MAX_MODEL_LEN="131072")
    memory = fit.budget(settings)
    assert memory is not None

    with pytest.raises(StartupError) as refused:
        check(footprint(LLAMA_3_8B, 15 * GiB, settings), memory, settings)

    sentence = str(refused.value)
    left = int(24 * GiB * 0.9) - 15 * GiB  # 6.6 GiB: at most this is left for the KV cache
    fitting = left // KV_PER_TOKEN_LLAMA_3_8B // 16 * 16  # whole blocks of 16 tokens
    assert sentence.startswith("MAX_MODEL_LEN=131072 needs 16.0 GiB of KV cache for one sequence but at most 6.6 GiB")
    assert f"set MAX_MODEL_LEN to {fitting} or less, raise GPU_MEMORY_UTIL (now 0.9)" in sentence


def test_without_nvml_the_gpu_check_is_skipped(gpus: list[GpuMemory]) -> None:
    assert fit.budget(gpu()) is None


# --- before the download, against the Hub double ----------------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    def repo(name: str, config: dict[str, Any]) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        (path / "model.safetensors").write_bytes(b"\0" * 65536)
        return path

    repos = {"org/huge": repo("huge", LLAMA_3_8B), "org/llama": repo("llama", LLAMA_3_8B)}
    with FakeHub(repos, declared_sizes={"org/huge": {"model.safetensors": 4096 * GiB}}) as fake:
        use_in_process(fake, monkeypatch)
        yield fake


def prepare(tmp_path: Path, phases: list[Phase], **env: str) -> None:
    settings = load_settings({"HF_HOME": str(tmp_path / "cache"), "DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", **env})
    prepare_model(settings, phases.append, lambda progress: None)


def test_a_model_too_large_for_the_machine_is_refused_before_its_weights_are_fetched(
    hub: FakeHub, tmp_path: Path
) -> None:
    phases: list[Phase] = []

    with pytest.raises(StartupError, match=r"MODEL_NAME 'org/huge' needs about 4096.0 GiB for its weights"):
        prepare(tmp_path, phases, MODEL_NAME="org/huge")

    assert phases == [Phase.PREFLIGHT]
    assert set(hub.bytes_served) == {"config.json"}


def test_a_context_too_long_for_the_kv_cache_is_refused_before_the_download(hub: FakeHub, tmp_path: Path) -> None:
    phases: list[Phase] = []

    with pytest.raises(StartupError, match=r"^MAX_MODEL_LEN=32768 needs 4.0 GiB .* set MAX_MODEL_LEN to 8192 or less"):
        prepare(tmp_path, phases, MODEL_NAME="org/llama", MAX_MODEL_LEN="32768")

    assert phases == [Phase.PREFLIGHT]
    assert set(hub.bytes_served) == {"config.json"}


def test_a_model_that_fits_is_downloaded(hub: FakeHub, tmp_path: Path) -> None:
    phases: list[Phase] = []

    prepare(tmp_path, phases, MODEL_NAME="org/llama", MAX_MODEL_LEN="8192")

    assert phases == [Phase.PREFLIGHT, Phase.DOWNLOADING]
    assert "model.safetensors" in hub.bytes_served


def test_fit_check_false_skips_it(hub: FakeHub, tmp_path: Path) -> None:
    prepare(tmp_path, [], MODEL_NAME="org/llama", MAX_MODEL_LEN="32768", FIT_CHECK="false")

    assert "model.safetensors" in hub.bytes_served


def test_hf_overrides_in_vllm_extra_args_are_what_the_check_reads(hub: FakeHub, tmp_path: Path) -> None:
    overrides = '--hf-overrides \'{"num_hidden_layers": 4}\''  # 16 KiB per token: 32768 tokens fit in 1 GiB

    prepare(tmp_path, [], MODEL_NAME="org/llama", MAX_MODEL_LEN="32768", VLLM_EXTRA_ARGS=overrides)

    assert "model.safetensors" in hub.bytes_served


def test_a_model_already_on_disk_is_checked_too(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(LLAMA_3_8B))
    (local / "model.safetensors").write_bytes(b"\0" * 1024)

    with pytest.raises(StartupError, match="MAX_MODEL_LEN=65536 needs 8.0 GiB"):
        prepare(tmp_path, [], MODEL_NAME=str(local), MAX_MODEL_LEN="65536")
