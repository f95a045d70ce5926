"""The engine's dying words become one sentence with the fix.

The first tests read real output of the CPU engine failing to start
(tests/fixtures/engine_failures, see its README). Causes that cannot be
produced on this machine (a GPU running out of memory, a full disk, Hub
refusals inside the engine) use short synthetic lines copied from the message
texts in the pinned vLLM, torch, transformers and huggingface_hub sources.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings, load_settings
from app.lifecycle.startup_errors import classify_engine_failure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "engine_failures"


def cpu_settings(**env: str) -> Settings:
    return load_settings({"DEVICE": "cpu", "MODEL_NAME": "org/model", "VLLM_CPU_KVCACHE_SPACE": "1", **env})


def gpu_settings(**env: str) -> Settings:
    return load_settings({"DEVICE": "cuda", "MODEL_NAME": "org/model", "GPU_MEMORY_UTIL": "0.9", **env})


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


# --- real engine output ---------------------------------------------------------


def test_an_unknown_flag_from_vllm_extra_args_is_named() -> None:
    sentence = classify_engine_failure(fixture_lines("bad_flag.log"), cpu_settings(VLLM_EXTRA_ARGS="--no-such-flag"))

    assert (
        sentence
        == "The engine does not know the flag --no-such-flag given in VLLM_EXTRA_ARGS: remove or correct it there."
    )


def test_an_unknown_flag_the_image_passes_points_at_the_image() -> None:
    sentence = classify_engine_failure(fixture_lines("bad_flag.log"), cpu_settings())

    assert sentence is not None
    assert "--no-such-flag" in sentence and "the image passes itself" in sentence


def test_a_context_above_the_models_limit_names_the_limit() -> None:
    sentence = classify_engine_failure(
        fixture_lines("max_model_len_too_large.log"), cpu_settings(MAX_MODEL_LEN="100000")
    )

    assert sentence == (
        "MAX_MODEL_LEN=100000 is above what the model allows (max_position_embeddings=2048 in its config.json): "
        "set MAX_MODEL_LEN to 2048 or less, or unset it to use the model's own."
    )


def test_a_kv_cache_too_small_for_the_context_suggests_both_fixes() -> None:
    lines = fixture_lines("kv_cache_too_small.log")

    sentence = classify_engine_failure(lines, cpu_settings())

    assert sentence == (
        "The KV cache is too small for a context of 4194304 tokens (2.0 GiB needed, 1.0 GiB available): "
        "set MAX_MODEL_LEN to 2097024 or less, or raise VLLM_CPU_KVCACHE_SPACE (now 1 GiB)."
    )


def test_a_kv_cache_too_small_on_a_gpu_points_at_gpu_memory_util() -> None:
    sentence = classify_engine_failure(fixture_lines("kv_cache_too_small.log"), gpu_settings())

    assert sentence is not None and sentence.endswith("or raise GPU_MEMORY_UTIL (now 0.9).")


def test_no_memory_left_for_the_kv_cache_is_a_memory_shortfall() -> None:
    lines = fixture_lines("kv_cache_zero.log")

    assert (
        classify_engine_failure(lines, cpu_settings())
        == "No memory was left for the KV cache: raise VLLM_CPU_KVCACHE_SPACE (now 1 GiB)."
    )


def test_a_kv_cache_larger_than_the_machine_asks_to_lower_it() -> None:
    lines = fixture_lines("kv_cache_exceeds_memory.log")

    sentence = classify_engine_failure(lines, cpu_settings(VLLM_CPU_KVCACHE_SPACE="64"))

    assert sentence == (
        "The KV cache asks for 64.0 GiB but only 14.43 of 18.59 GiB of memory are available: "
        "lower VLLM_CPU_KVCACHE_SPACE (now 64 GiB)."
    )


def test_the_cpu_engines_default_memory_share_not_fitting_is_explained() -> None:
    lines = fixture_lines("kvcache_space_unset.log")

    sentence = classify_engine_failure(lines, cpu_settings())

    assert sentence is not None
    assert sentence.startswith(
        "The engine wants 17.1 GiB (0.92 of the machine's memory) but only 14.76 of 18.59 GiB are available"
    )
    assert "VLLM_CPU_KVCACHE_SPACE" in sentence and "GPU_MEMORY_UTIL" in sentence


def test_an_unsupported_architecture_is_named() -> None:
    lines = fixture_lines("unsupported_architecture.log")

    sentence = classify_engine_failure(lines, cpu_settings())

    assert sentence is not None
    assert sentence.startswith(
        "This vLLM cannot serve the architecture NoSuchModelForCausalLM of MODEL_NAME 'org/model'"
    )


# --- synthetic lines modelled on the sources ------------------------------------------


def test_too_little_free_gpu_memory_asks_to_lower_gpu_memory_util() -> None:
    # vllm/v1/worker/utils.py
    lines = [
        (
            "ValueError: Free memory on device cuda:0 (10.5/23.68 GiB) on startup is less than desired GPU memory "
            "utilization (0.9, 21.31 GiB). Decrease GPU memory utilization or reduce GPU memory used by other "
            "processes."
        )
    ]

    assert classify_engine_failure(lines, gpu_settings()) == (
        "Only 10.5 of 23.68 GiB are free on cuda:0 but GPU_MEMORY_UTIL=0.9 asks for 21.31 GiB: "
        "lower GPU_MEMORY_UTIL, or stop the other processes using the GPU."
    )


def test_a_gpu_out_of_memory_suggests_a_smaller_footprint() -> None:
    # torch's CUDA caching allocator
    lines = [
        (
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
            "GPU 0 has a total capacity of 23.68 GiB of which 1.03 GiB is free."
        )
    ]

    sentence = classify_engine_failure(lines, gpu_settings())

    assert sentence is not None and "MAX_MODEL_LEN or MAX_NUM_SEQS" in sentence


def test_a_rejected_flag_value_names_the_variable_that_set_it() -> None:
    # argparse, as vLLM's parser reports a bad choice
    lines = [
        (
            "api_server.py: error: argument --dtype: invalid choice: 'fp7' "
            "(choose from 'auto', 'half', 'float16', 'bfloat16', 'float', 'float32')"
        )
    ]

    sentence = classify_engine_failure(lines, gpu_settings())

    assert sentence is not None
    assert sentence.startswith("The engine rejected --dtype (invalid choice: 'fp7'")
    assert sentence.endswith("correct DTYPE.")


def test_a_rejected_flag_value_from_vllm_extra_args_points_there() -> None:
    lines = ["api_server.py: error: argument --tensor-parallel-size/-tp: invalid int value: 'two'"]

    sentence = classify_engine_failure(lines, gpu_settings(VLLM_EXTRA_ARGS="--tensor-parallel-size two"))

    assert (
        sentence
        == "The engine rejected --tensor-parallel-size (invalid int value: 'two'): correct it in VLLM_EXTRA_ARGS."
    )


def test_a_full_disk_is_recognised() -> None:
    settings = gpu_settings(HF_HOME="/data/hf")

    sentence = classify_engine_failure(["OSError: [Errno 28] No space left on device"], settings)

    assert sentence is not None and sentence.startswith("The disk is full (No space left on device)")
    assert str(settings.cache_dir) in sentence


def test_a_model_needing_its_own_code_asks_for_trust_remote_code() -> None:
    # transformers/dynamic_module_utils.py
    lines = [
        "ValueError: The repository /models/x contains custom code which must be executed to correctly load the model."
    ]

    assert classify_engine_failure(lines, cpu_settings()) == (
        "MODEL_NAME 'org/model' ships its own modeling code: set TRUST_REMOTE_CODE=true if you trust that repository."
    )


def test_an_unknown_model_type_is_named() -> None:
    # transformers/models/auto/configuration_auto.py
    lines = [
        (
            "ValueError: The checkpoint you are trying to load has model type `mamba9` "
            "but Transformers does not recognize this architecture."
        )
    ]

    sentence = classify_engine_failure(lines, cpu_settings())

    assert sentence is not None and "model type 'mamba9'" in sentence


@pytest.mark.parametrize(
    ("line", "start"),
    [
        # huggingface_hub/utils/_http.py
        (
            "huggingface_hub.errors.GatedRepoError: 401 Client Error. Cannot access gated repo for url https://huggingface.co/org/model/resolve/main/config.json.",
            "The engine was refused a gated repository named in VLLM_EXTRA_ARGS: the engine gets no HF_TOKEN",
        ),
        # transformers/utils/hub.py
        (
            "OSError: org/model is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'",
            "The engine could not find a model: check MODEL_NAME",
        ),
    ],
)
def test_hub_refusals_inside_the_engine_are_recognised(line: str, start: str) -> None:
    sentence = classify_engine_failure([line], cpu_settings())

    assert sentence is not None and sentence.startswith(start)


def test_an_unrecognised_failure_is_left_to_the_caller() -> None:
    lines = [
        "Traceback (most recent call last):",
        '  File "/x.py", line 1, in <module>',
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]

    assert classify_engine_failure(lines, cpu_settings()) is None
