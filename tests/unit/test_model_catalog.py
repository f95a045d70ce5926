"""MODELS and MODELS_CONFIG become one complete Settings per model, or one sentence per mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.catalog import ModelCatalog
from app.config import ConfigError, Settings, load_settings
from app.lifecycle.engine_args import build_engine_args

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = ROOT / ".models" / "tiny-llama"


def base(**env: str) -> Settings:
    return load_settings({"HF_HOME": "/tmp/hf", **env})


def refusal(models: str, config: str | None = None, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        ModelCatalog.build(base(**env), models, config)
    return str(caught.value)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_each_model_gets_its_served_name_source_and_own_port() -> None:
    catalog = ModelCatalog.build(base(VLLM_PORT="9100"), f"chat=org/chat-model, {TINY_LLAMA}, Qwen/Qwen2-VL-2B")

    assert catalog.names == ("chat", "tiny-llama", "Qwen/Qwen2-VL-2B")
    assert [model.port for model in catalog] == [9100, 9101, 9102]
    chat = catalog.get("chat")
    assert chat is not None and chat.source == "org/chat-model"
    assert chat.settings.MODEL_NAME == "org/chat-model"
    assert chat.settings.served_model_names == ("chat",)
    assert chat.settings.engine_url == "http://127.0.0.1:9100"
    assert catalog.get("unknown") is None


def test_global_settings_apply_to_every_model_unless_overridden(tmp_path: Path) -> None:
    config = write(tmp_path, "models.yaml", "small:\n  max_model_len: 512\n  ENFORCE_EAGER: true\n  IMAGE_LIMIT: 0\n")
    catalog = ModelCatalog.build(base(MAX_MODEL_LEN="2048", IMAGE_LIMIT="2"), "small=org/a,big=org/b", config)

    small, big = catalog.get("small"), catalog.get("big")
    assert small is not None and big is not None
    assert (small.settings.MAX_MODEL_LEN, small.settings.ENFORCE_EAGER, small.settings.IMAGE_LIMIT) == (512, True, 0)
    assert (big.settings.MAX_MODEL_LEN, big.settings.ENFORCE_EAGER, big.settings.IMAGE_LIMIT) == (2048, False, 2)
    # The engine's command line is built from the model's own settings.
    argv = build_engine_args(small.settings, small.source, frozenset())
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert argv[argv.index("--port") + 1] == str(small.port)


def test_json_config_is_read_like_yaml(tmp_path: Path) -> None:
    config = write(tmp_path, "models.json", json.dumps({"a": {"GPU_MEMORY_UTIL": 0.4, "LORA_MODULES": "sql=org/sql-lora"}}))
    catalog = ModelCatalog.build(base(), "a=org/a,b=org/b", config)

    a = catalog.get("a")
    assert a is not None and a.settings.GPU_MEMORY_UTIL == 0.4 and a.settings.lora_modules == {"sql": "org/sql-lora"}


def test_model_name_and_served_model_name_give_way_to_models() -> None:
    catalog = ModelCatalog.build(base(MODEL_NAME="org/other", SERVED_MODEL_NAME="x,y"), "a=org/a")

    assert catalog.names == ("a",)
    assert catalog.get("a").settings.served_model_names == ("a",)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ("a=org/a,a=org/b", "the served name 'a' is given twice"),
        ("org/a,org/a", "the served name 'org/a' is given twice"),
        ("=org/a", "'=org/a' is not served-name=hub-id-or-directory"),
        ("a=", "'a=' is not served-name=hub-id-or-directory"),
        (" , ", "MODELS lists no model"),
    ],
)
def test_bad_models_lists_are_refused_with_the_entry(models: str, expected: str) -> None:
    assert expected in refusal(models)


def test_settings_of_one_model_are_refused_globally() -> None:
    message = refusal("a=org/a", MODEL_REVISION="v2", LORA_MODULES="x=org/x", ENGINE_URL="http://engine:8001")

    assert "MODEL_REVISION describes one model; with MODELS set it per model in MODELS_CONFIG." in message
    assert "LORA_MODULES describes one model" in message
    assert "ENGINE_URL fronts one remote engine" in message


def test_internal_ports_must_not_reach_the_public_ones() -> None:
    assert "include PORT=8002; move VLLM_PORT or PORT" in refusal("a=o/a,b=o/b,c=o/c", PORT="8002", VLLM_PORT="8001")
    assert "go past 65535" in refusal("a=o/a,b=o/b", VLLM_PORT="65535")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("c:\n  MAX_MODEL_LEN: 10\n", "MODELS_CONFIG names the model 'c', which MODELS does not list (it lists a, b)."),
        ("a:\n  MAX_MODEL_LENGTH: 512\n", "model 'a': MAX_MODEL_LENGTH is not a per-model setting; did you mean MAX_MODEL_LEN?"),
        ("a:\n  PORT: 9000\n", "model 'a': PORT applies to the whole deployment, not to one model"),
        ("a:\n  MAX_MODEL_LEN: 8\n", "model 'a': invalid MAX_MODEL_LEN=8: must be a number of tokens"),
        ("b:\n  GPU_MEMORY_UTIL: 1.5\n", "model 'b': invalid GPU_MEMORY_UTIL=1.5:"),
        ("b:\n  RUNNER: embed\n", "model 'b': invalid RUNNER='embed':"),
        ("a:\n  LORA_MODULES: just-a-path\n", "model 'a': LORA_MODULES: 'just-a-path' is not name=hub-id-or-path"),
        ("a:\n  VLLM_EXTRA_ARGS: [--x]\n", "model 'a': VLLM_EXTRA_ARGS takes one value"),
        ("a: 512\n", "model 'a': give its settings as a mapping"),
        ("- a\n- b\n", "must map served names to their settings"),
        ("a:\n  MAX_MODEL_LEN: [1\n", "is not valid YAML (line"),
    ],
)
def test_bad_config_files_are_refused_naming_the_model(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refusal("a=org/a,b=org/b", write(tmp_path, "models.yaml", text))


def test_every_mistake_is_reported_at_once(tmp_path: Path) -> None:
    config = write(tmp_path, "models.yaml", "a:\n  MAX_MODEL_LEN: 8\nb:\n  DTYPE: float7\n")
    message = refusal("a=org/a,b=org/b", config)

    assert "model 'a': invalid MAX_MODEL_LEN" in message and "model 'b': invalid DTYPE='float7'" in message


def test_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    assert "MODELS_CONFIG: cannot read" in refusal("a=org/a", str(tmp_path / "missing.yaml"))
    broken = write(tmp_path, "models.json", '{"a": {"DTYPE": }')
    assert f"MODELS_CONFIG: {broken} is not valid JSON (line 1:" in refusal("a=org/a", broken)


def test_an_empty_config_file_changes_nothing(tmp_path: Path) -> None:
    catalog = ModelCatalog.build(base(), "a=org/a", write(tmp_path, "models.yaml", ""))
    assert catalog.get("a").settings.MAX_MODEL_LEN is None  # type: ignore[union-attr]


def test_model_name_alone_is_the_single_model_path() -> None:
    assert base(MODEL_NAME="org/model").catalog is None


def test_models_are_checked_when_the_settings_are_loaded(tmp_path: Path) -> None:
    settings = base(MODELS="a=org/a,b=org/b", MAX_LOADED_MODELS="2", MODEL_IDLE_TTL_S="300")
    assert settings.catalog is not None and settings.catalog.names == ("a", "b")
    assert (settings.MAX_LOADED_MODELS, settings.MODEL_IDLE_TTL_S) == (2, 300)

    with pytest.raises(ConfigError, match="MODELS_CONFIG names the model 'c'"):
        base(MODELS="a=org/a", MODELS_CONFIG=write(tmp_path, "m.yaml", "c: {DTYPE: half}\n"))
    with pytest.raises(ConfigError, match="Invalid setting MAX_LOADED_MODELS='0'"):
        base(MODELS="a=org/a", MAX_LOADED_MODELS="0")
