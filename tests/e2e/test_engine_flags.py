"""A wrong engine setting costs seconds, not a download: vLLM's own parser judges it first.

Started through `scripts/start.sh` as a user would, with a Hub model id. The
Hugging Face Hub cannot be reached from the test machines, so the local Hub
double (`tests/fakehub.py`) stands in for it and counts every request: a
misspelled flag, an unknown tool-call parser and a malformed
SPECULATIVE_CONFIG end the start with one sentence naming the setting, and the
Hub has not been asked anything, nor has an engine been started.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakehub import FakeHub, hub_environment
from tests.stack import Stack, kill_tree, model_dir, port, start_stack

MODEL = "org/tiny-llama"
# Generous: the check imports vLLM's parser (seconds) on a busy machine. The test waits for the event.
FAILURE_DEADLINE_S = 240.0

WRONG_SETTINGS = {
    "misspelled flag": (
        {"VLLM_EXTRA_ARGS": "--tool-call-parsr hermes"},
        ["VLLM_EXTRA_ARGS", "--tool-call-parsr", "did you mean `--tool-call-parser`?"],
    ),
    "unknown tool-call parser": (
        {"TOOL_CALL_PARSER": "hermess"},
        ["TOOL_CALL_PARSER='hermess'", "did you mean `hermes`?"],
    ),
    "malformed speculative config": (
        {"SPECULATIVE_CONFIG": '{"method": "ngram", num_speculative_tokens: 3}'},
        ["SPECULATIVE_CONFIG", "not valid JSON", "line 1 column 21"],
    ),
}


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub({MODEL: model_dir("tiny-llama")}) as fake:
        yield fake


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        kill_tree(stack.process.pid)  # children first: a wrapper orphaned by a killed supervisor would drain on
        stack.process.wait(10)


def wait_for_failed_phase(stack: Stack, before: frozenset[str] = frozenset({"preflight"})) -> dict[str, object]:
    deadline = time.monotonic() + FAILURE_DEADLINE_S
    while time.monotonic() < deadline:
        assert stack.process.poll() is None, f"exited with {stack.process.returncode}:\n{stack.raw_log()[-3000:]}"
        try:
            body = httpx.get(f"{stack.base_url}/health", timeout=2).json()
            if body["phase"] == "failed":
                return body
            assert body["phase"] in before, body
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no failed phase after {FAILURE_DEADLINE_S}s:\n{stack.raw_log()[-3000:]}")


def start_from_hub(hub: FakeHub, tmp_path: Path, env: dict[str, str]) -> Stack:
    hub.reset_counters()
    return start_stack(
        MODEL, port=port(25), vllm_port=port(26), log_path=tmp_path / "stack.log", wait=False,
        extra_env={**hub_environment(hub), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
                   "HF_TOKEN": "", **env},
    )


def no_engine_runs(stack: Stack) -> bool:
    return not any("vllm.entrypoints" in " ".join(child.cmdline()) for child in stack.descendants())


@pytest.mark.parametrize(("env", "words"), WRONG_SETTINGS.values(), ids=WRONG_SETTINGS.keys())
def test_a_wrong_engine_setting_fails_before_any_hub_request(
    hub: FakeHub, stacks: list[Stack], tmp_path: Path, env: dict[str, str], words: list[str]
) -> None:
    stack = start_from_hub(hub, tmp_path, env)
    stacks.append(stack)

    health = wait_for_failed_phase(stack)

    sentence = str(health["error"])
    for word in words:
        assert word in sentence, sentence
    assert hub.total_requests == 0, hub.requests
    assert no_engine_runs(stack)
    reply = httpx.post(f"{stack.base_url}/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 503 and sentence in reply.json()["error"]["message"]
    failures = [line for line in stack.logs() if line["message"] == "startup failed"]
    assert [line["error"] for line in failures] == [sentence]
    assert stack.stop(signal.SIGTERM, timeout_s=60) == 0


def test_a_value_only_the_engine_parser_refuses_costs_no_download(
    hub: FakeHub, stacks: list[Stack], tmp_path: Path
) -> None:
    stack = start_from_hub(hub, tmp_path, {"VLLM_EXTRA_ARGS": "--max-num-seqs lots"})
    stacks.append(stack)

    health = wait_for_failed_phase(stack)

    sentence = str(health["error"])
    assert "VLLM_EXTRA_ARGS: --max-num-seqs 'lots'" in sentence and "invalid int value" in sentence, sentence
    # Only the config.json the fit check reads while the engine's parser runs: no weights.
    assert set(hub.bytes_served) <= {"config.json"}, hub.bytes_served
    assert no_engine_runs(stack)
    assert stack.stop(signal.SIGTERM, timeout_s=60) == 0


def test_a_wrong_setting_stops_a_local_model_that_started_loading(stacks: list[Stack], tmp_path: Path) -> None:
    """The engine itself would ignore a word that belongs to no flag; the full check does not."""
    stack = start_stack(
        model_dir("tiny-llama"), port=port(27), vllm_port=port(28), log_path=tmp_path / "local.log", wait=False,
        extra_env={"VLLM_EXTRA_ARGS": "--disable-log-stats yes", "SERVED_MODEL_NAME": "tiny-chat"},
    )
    stacks.append(stack)

    health = wait_for_failed_phase(stack, before=frozenset({"preflight", "loading"}))

    sentence = str(health["error"])
    assert "VLLM_EXTRA_ARGS: the word 'yes' belongs to no flag" in sentence, sentence
    assert any(line["message"] == "starting engine" for line in stack.logs())  # it did start loading
    assert no_engine_runs(stack)
    assert stack.stop(signal.SIGTERM, timeout_s=60) == 0


def test_with_models_each_model_is_checked_before_any_hub_request(
    hub: FakeHub, stacks: list[Stack], tmp_path: Path
) -> None:
    """MODELS: the full check judges every model's own command line before the downloads."""
    config = tmp_path / "models.json"
    config.write_text('{"other": {"VLLM_EXTRA_ARGS": "--max-num-seqs lots"}}')
    stack = start_from_hub(hub, tmp_path, {"MODELS": f"chat={MODEL},other={MODEL}", "MODELS_CONFIG": str(config)})
    stacks.append(stack)

    health = wait_for_failed_phase(stack)

    sentence = str(health["error"])
    assert sentence.startswith("Model 'other': VLLM_EXTRA_ARGS: --max-num-seqs 'lots'"), sentence
    assert "invalid int value" in sentence and "'chat'" not in sentence, sentence
    assert hub.total_requests == 0, hub.requests
    assert no_engine_runs(stack)
    checked = [line.get("model") for line in stack.logs() if line["message"] == "engine flags checked"]
    assert checked == ["chat", "other"], checked
    assert stack.stop(signal.SIGTERM, timeout_s=60) == 0
