"""The engine's compile cache: on the volume, one folder per engine configuration.

The launches are the real ones `build_engine_launch` makes for the settings;
only the folder choice and the engine's environment are checked here. That
the real engine writes its compiled graphs into the folder is shown by
tests/e2e/test_coldstart.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import load_settings
from app.lifecycle.compile_cache import CACHE_ROOT_ENV, KEY_FILE, engine_version, with_compile_cache
from app.lifecycle.engine_args import build_engine_launch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot"
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return path


def cache_root(tmp_path: Path, model: Path, revision: str | None = COMMIT, base_env: dict[str, str] | None = None,
               **env: str) -> Path:
    settings = load_settings({
        "MODEL_NAME": "org/model", "DEVICE": "cpu", "HF_HOME": str(tmp_path / "home"),
        "CACHE_VOLUMES": str(tmp_path / "volume"), **env,
    })
    launch = build_engine_launch(settings, model, frozenset({"text"}), base_env=base_env or {})
    return Path(with_compile_cache(launch, settings, model, revision).env[CACHE_ROOT_ENV])


def test_the_cache_is_on_the_volume_with_the_model_cache(tmp_path: Path, model: Path) -> None:
    (tmp_path / "volume").mkdir()

    root = cache_root(tmp_path, model)

    assert root.is_relative_to(tmp_path / "volume" / "huggingface-cache" / "vllm-cache")
    assert root.is_dir()
    key = json.loads((root / KEY_FILE).read_text())
    assert key["model"] == "org/model" and key["revision"] == COMMIT and key["vllm"] == engine_version()


def test_without_a_volume_it_is_in_hf_home(tmp_path: Path, model: Path) -> None:
    assert cache_root(tmp_path, model).is_relative_to(tmp_path / "home" / "vllm-cache")


def test_two_flag_sets_use_two_folders(tmp_path: Path, model: Path) -> None:
    first = cache_root(tmp_path, model, MAX_MODEL_LEN="2048")
    second = cache_root(tmp_path, model, MAX_MODEL_LEN="4096")
    extra = cache_root(tmp_path, model, MAX_MODEL_LEN="2048", VLLM_EXTRA_ARGS="--kv-cache-dtype fp8")

    assert len({first, second, extra}) == 3
    assert "4096" in json.loads((second / KEY_FILE).read_text())["flags"]


def test_the_same_flags_on_another_port_or_name_share_a_folder(tmp_path: Path, model: Path) -> None:
    first = cache_root(tmp_path, model, VLLM_PORT="8001", SERVED_MODEL_NAME="a")
    second = cache_root(tmp_path, model, VLLM_PORT="9001", SERVED_MODEL_NAME="b")

    assert first == second


def test_another_revision_or_a_changed_local_model_gets_another_folder(tmp_path: Path, model: Path) -> None:
    pinned = cache_root(tmp_path, model)
    other_commit = cache_root(tmp_path, model, revision="f" * 40)
    local = cache_root(tmp_path, model, revision=None)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}')
    local_changed = cache_root(tmp_path, model, revision=None)

    assert len({pinned, other_commit, local, local_changed}) == 4


def test_an_operators_vllm_cache_root_is_kept(tmp_path: Path, model: Path) -> None:
    root = cache_root(tmp_path, model, base_env={CACHE_ROOT_ENV: "/data/vllm"})

    assert root == Path("/data/vllm")


def test_a_volume_that_cannot_be_written_leaves_the_engines_default(tmp_path: Path, model: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "huggingface-cache").mkdir(parents=True)
    (volume / "huggingface-cache" / "vllm-cache").write_text("a file where the folder should be")
    settings = load_settings({"MODEL_NAME": "org/model", "DEVICE": "cpu", "CACHE_VOLUMES": str(volume)})
    launch = build_engine_launch(settings, model, frozenset({"text"}), base_env={})

    assert CACHE_ROOT_ENV not in with_compile_cache(launch, settings, model, COMMIT).env
