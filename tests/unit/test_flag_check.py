"""The engine's command line, judged against the pinned vLLM before any Hub request or download.

These tests import the installed vLLM's argument parser (a few seconds, once per
module): they fail when a vLLM upgrade renames or removes a flag that a named
setting passes, changes the values a setting may take, or leaves the recorded
facts of the spot check (app/lifecycle/engine_flags.json) stale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.config import Settings, load_settings
from app.lifecycle.engine_args import SETTING_OF_FLAG, engine_env
from app.lifecycle.flag_check import (
    FACTS_FILE,
    EngineFacts,
    check_argv,
    check_engine_flags,
    check_environment,
    engine_parser,
    installed_vllm_version,
    refusal,
    spot_refusal,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def parser() -> Iterator[argparse.ArgumentParser]:
    yield engine_parser()


@pytest.fixture(scope="module")
def facts(parser: argparse.ArgumentParser) -> EngineFacts:
    return EngineFacts.from_engine(parser)


Judge = Callable[..., "str | None"]


@pytest.fixture
def judged(parser: argparse.ArgumentParser, facts: EngineFacts) -> Judge:
    """The full check's verdict for settings given as keyword arguments."""

    def judge(**env: str) -> str | None:
        settings = load_settings({"MODEL_NAME": "org/model", **env})
        return refusal(check_argv(settings), settings, parser, facts)

    return judge


# --- every named setting is a flag the pinned vLLM accepts ---------------------------------


def test_every_flag_a_setting_passes_is_known_to_the_engine_parser(parser: argparse.ArgumentParser) -> None:
    unknown = [flag for flag in SETTING_OF_FLAG if flag not in parser._option_string_actions]
    assert not unknown, f"the pinned vLLM does not know {unknown}"
    settings_named = {name.strip() for names in SETTING_OF_FLAG.values() for name in names.replace(" or ", ", ").split(",")}
    assert settings_named <= set(Settings.model_fields), settings_named - set(Settings.model_fields)


def test_every_named_setting_with_a_valid_value_passes_the_engine_parser(judged: Judge) -> None:
    assert judged(
        MAX_MODEL_LEN="auto", GPU_MEMORY_UTIL="0.8", MAX_NUM_SEQS="8", MAX_BATCHED_TOKENS="512",
        ENABLE_CHUNKED_PREFILL="false", TENSOR_PARALLEL_SIZE="2", PIPELINE_PARALLEL_SIZE="2", DATA_PARALLEL_SIZE="2",
        DISTRIBUTED_EXECUTOR_BACKEND="mp", IMAGE_LIMIT="2", VIDEO_LIMIT="1", AUDIO_LIMIT="1", DTYPE="bfloat16",
        QUANTIZATION="fp8", TRUST_REMOTE_CODE="true", ENFORCE_EAGER="true", LORA_MODULES="sql=/adapters/sql",
        ENABLE_AUTO_TOOL_CHOICE="true", TOOL_CALL_PARSER="hermes", REASONING_PARSER="deepseek_r1",
        CHAT_TEMPLATE="{% for m in messages %}{{ m.content }}{% endfor %}",
        SPECULATIVE_CONFIG='{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}',
        KV_CACHE_DTYPE="fp8", GENERATION_CONFIG="vllm", LOAD_FORMAT="safetensors", RUNNER="pooling",
        CONVERT="embed", MM_ENCODER_TP_MODE="weights", MM_PROCESSOR_CACHE_GB="1.5",
        SERVED_MODEL_NAME="a,b", VLLM_EXTRA_ARGS="--seed 7 --max_logprobs 5 --no-enable-prefix-caching",
    ) is None


@pytest.mark.parametrize(
    ("setting", "flag"),
    [
        ("RUNNER", "--runner"), ("CONVERT", "--convert"), ("MM_ENCODER_TP_MODE", "--mm-encoder-tp-mode"),
        ("DTYPE", "--dtype"), ("DISTRIBUTED_EXECUTOR_BACKEND", "--distributed-executor-backend"),
    ],
)
def test_every_value_a_setting_allows_is_accepted_by_the_engine(
    parser: argparse.ArgumentParser, setting: str, flag: str
) -> None:
    annotation = Settings.model_fields[setting].annotation
    literals = [arg for arg in (annotation, *typing.get_args(annotation)) if typing.get_origin(arg) is typing.Literal]
    allowed = [value for literal in literals for value in typing.get_args(literal)]
    assert allowed
    for value in allowed:
        parsed = parser.parse_args(["--model", "m", flag, value])
        assert getattr(parsed, flag[2:].replace("-", "_")) == value


# --- a wrong setting: one sentence naming it, and the closest valid name ------------------


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"VLLM_EXTRA_ARGS": "--tool-call-parsr hermes"}, ["VLLM_EXTRA_ARGS", "--tool-call-parsr", "did you mean `--tool-call-parser`?"]),
        ({"VLLM_EXTRA_ARGS": "--max_modle_len 4096"}, ["VLLM_EXTRA_ARGS", "did you mean `--max-model-len`?"]),
        ({"VLLM_EXTRA_ARGS": "--task embed"}, ["--task", "RUNNER=pooling"]),
        ({"TOOL_CALL_PARSER": "hermess"}, ["TOOL_CALL_PARSER='hermess'", "did you mean `hermes`?"]),
        ({"TOOL_CALL_PARSER": "no-such-parser"}, ["TOOL_CALL_PARSER", "choose one of:", "hermes", "llama3_json"]),
        ({"VLLM_EXTRA_ARGS": "--tool-call-parser hermess"}, ["VLLM_EXTRA_ARGS", "did you mean `hermes`?"]),
        ({"REASONING_PARSER": "deepseek-r1"}, ["REASONING_PARSER", "did you mean `deepseek_r1`?"]),
        ({"SPECULATIVE_CONFIG": "{method: ngram}"}, ["SPECULATIVE_CONFIG", "not valid JSON", "line 1 column 2"]),
        ({"SPECULATIVE_CONFIG": "[3]"}, ["SPECULATIVE_CONFIG", "not a JSON object"]),
        ({"SPECULATIVE_CONFIG": '{"method": "ngram", "num_speculative_token": 3}'}, ["did you mean `num_speculative_tokens`?"]),
        ({"KV_CACHE_DTYPE": "fp9"}, ["KV_CACHE_DTYPE='fp9'", "did you mean `fp8`?"]),
        ({"QUANTIZATION": "awk"}, ["QUANTIZATION='awk'", "did you mean `awq`?"]),
        ({"LOAD_FORMAT": "safetensor"}, ["LOAD_FORMAT", "did you mean `safetensors`?"]),
        ({"CHAT_TEMPLATE": "/no/such/template.jinja"}, ["CHAT_TEMPLATE", "neither a file that exists nor a Jinja template"]),
        ({"ENABLE_AUTO_TOOL_CHOICE": "true"}, ["ENABLE_AUTO_TOOL_CHOICE", "requires", "TOOL_CALL_PARSER"]),
        ({"VLLM_EXTRA_ARGS": "--enforce-eager true"}, ["VLLM_EXTRA_ARGS", "'true'", "--no-enforce-eager"]),
        ({"VLLM_EXTRA_ARGS": "--enforce-eager=false"}, ["switch", "--no-enforce-eager"]),
        ({"VLLM_EXTRA_ARGS": "--max-num-seqs"}, ["VLLM_EXTRA_ARGS", "--max-num-seqs", "needs a value"]),
        ({"VLLM_EXTRA_ARGS": "--gpu-memory-utilization lots"}, ["VLLM_EXTRA_ARGS", "'lots'", "invalid float value"]),
        ({"VLLM_EXTRA_ARGS": "--port 9000"}, ["VLLM_EXTRA_ARGS", "--port", "VLLM_PORT"]),
        ({"VLLM_EXTRA_ARGS": "--max 3"}, ["VLLM_EXTRA_ARGS", "--max-model-len", "write the whole flag"]),
    ],
)
def test_a_refusal_is_one_sentence_naming_the_setting(judged: Judge, env: dict[str, str], words: list[str]) -> None:
    sentence = judged(**env)
    assert sentence is not None
    for word in words:
        assert word in sentence, sentence
    assert "\n" not in sentence and "Traceback" not in sentence and "usage:" not in sentence


def test_a_parser_name_from_a_plugin_is_left_to_the_engine(judged: Judge) -> None:
    extra = "--tool-parser-plugin /plugins/mine.py --reasoning-parser-plugin /plugins/think.py"
    assert judged(TOOL_CALL_PARSER="mine", REASONING_PARSER="think", VLLM_EXTRA_ARGS=extra) is None


def test_the_check_covers_the_flags_of_every_modality() -> None:
    """The command line is checked before the model (and so its modalities) is known."""
    argv = check_argv(load_settings({"MODEL_NAME": "org/model", "IMAGE_LIMIT": "3"}))
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1]) == {"image": 3, "video": 1, "audio": 1}


# --- the spot check: recorded facts, no vLLM import, before any Hub request ---------------------


def test_the_recorded_facts_match_the_installed_vllm(facts: EngineFacts) -> None:
    assert FACTS_FILE.read_text() == facts.to_json(), "stale: run python tools/engine_flag_facts.py"
    assert EngineFacts.load() == facts
    assert installed_vllm_version() == facts.version


def test_facts_of_another_vllm_version_are_not_used(tmp_path: Path) -> None:
    other = tmp_path / "engine_flags.json"
    other.write_text(json.dumps({**json.loads(FACTS_FILE.read_text()), "version": "0.0.1"}))
    assert EngineFacts.load(other) is None
    assert EngineFacts.load(tmp_path / "missing.json") is None


SPOT_CASES = {
    "misspelled flag": ({"VLLM_EXTRA_ARGS": "--tool-call-parsr hermes"}, "did you mean `--tool-call-parser`?"),
    "unknown tool-call parser": ({"TOOL_CALL_PARSER": "hermess"}, "did you mean `hermes`?"),
    "malformed speculative config": ({"SPECULATIVE_CONFIG": "{method: ngram}"}, "not valid JSON"),
    "bad choice": ({"KV_CACHE_DTYPE": "fp9"}, "did you mean `fp8`?"),
    "a flag the image sets": ({"VLLM_EXTRA_ARGS": "--port=9000"}, "set VLLM_PORT instead"),
}


@pytest.mark.parametrize(("env", "words"), SPOT_CASES.values(), ids=SPOT_CASES.keys())
def test_the_spot_check_says_what_the_full_check_says(judged: Judge, env: dict[str, str], words: str) -> None:
    facts = EngineFacts.load()
    assert facts is not None
    settings = load_settings({"MODEL_NAME": "org/model", **env})
    spotted = spot_refusal(check_argv(settings), settings, facts)
    assert spotted is not None and words in spotted
    assert spotted == judged(**env)


def test_the_spot_check_leaves_what_needs_the_parser_to_the_full_check(judged: Judge) -> None:
    env = {"VLLM_EXTRA_ARGS": "--max-num-seqs lots"}
    settings = load_settings({"MODEL_NAME": "org/model", **env})
    assert spot_refusal(check_argv(settings), settings, EngineFacts.load()) is None
    assert "invalid int value" in judged(**env)


def test_the_spot_check_never_imports_vllm() -> None:
    code = (
        "import sys\n"
        "from app.config import load_settings\n"
        "from app.lifecycle.flag_check import EngineFacts, check_argv, spot_refusal\n"
        "settings = load_settings({'MODEL_NAME': 'org/m', 'TOOL_CALL_PARSER': 'hermess'})\n"
        "print(spot_refusal(check_argv(settings), settings, EngineFacts.load()))\n"
        "print('vllm' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
    sentence, imported = result.stdout.strip().splitlines()
    assert "did you mean `hermes`?" in sentence and imported == "False"


# --- in a child process: the supervisor never imports vLLM --------------------------------


def test_the_supervisor_gets_the_sentence_from_a_child_process() -> None:
    env = {**os.environ, "MODEL_NAME": "org/model", "TOOL_CALL_PARSER": "hermess"}
    verdict = asyncio.run(check_engine_flags(env))
    assert verdict is not None and verdict.refusal is not None and "did you mean `hermes`?" in verdict.refusal


def test_a_check_that_cannot_run_is_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    env = {**os.environ, "MODEL_NAME": "org/model", "MAX_NUM_SEQS": "not-a-number"}  # the child cannot load settings
    assert asyncio.run(check_engine_flags(env)) is None
    assert any("could not run" in record.getMessage() for record in caplog.records)


def test_the_full_check_sees_the_settings_the_engine_does_not_get() -> None:
    """The engine's environment holds no wrapper setting; the check needs them to build the command line."""
    source = {"VLLM_EXTRA_ARGS": "--max-num-seqs lots", "MAX_MODEL_LEN": "512", "API_KEY": "k",
              "HF_TOKEN": "hf_x", "CONVERSATIONS_DB_URL": "postgresql://u:p@h/d", "PATH": "/bin"}
    engine = engine_env(load_settings(source), "cpu", base=source)
    assert "VLLM_EXTRA_ARGS" not in engine
    env = check_environment(engine, source)
    assert env["VLLM_EXTRA_ARGS"] == "--max-num-seqs lots" and env["MAX_MODEL_LEN"] == "512"
    assert not {"API_KEY", "HF_TOKEN", "CONVERSATIONS_DB_URL"} & env.keys(), "secrets make no flag"
    assert env["PATH"] == "/bin"
