"""Several models in one deployment (MODELS), loaded when a request names them, on the real CPU engine.

Two offline models, MAX_LOADED_MODELS=1: every switch stops one engine and starts the other,
so alternating requests prove that each is answered by the model it names, that at most one
engine runs, and that an evicted model loads again when it is named again; concurrent streams for
both models all run to their end (one model's streams wait, with keep-alives, for the other's).
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.stack import SMOLLM2_ENV, Stack, kill_tree, model_dir, port, start_stack

CHAT = "tiny-chat"
SMOL = "smol"
ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
LOAD_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def multi_stack(logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # SmolLM2's settings differ from the global ones through MODELS_CONFIG (see SMOLLM2_ENV).
    config = tmp_path_factory.mktemp("multi") / "models.yaml"
    config.write_text("".join(f"{SMOL}:\n" + "".join(f"  {key}: {value}\n" for key, value in SMOLLM2_ENV.items())))
    stack = start_stack(
        "unused-with-MODELS", port=port(45), vllm_port=port(46), log_path=logs_dir / "multi.log",
        extra_env={
            "MODELS": f"{CHAT}={model_dir('tiny-llama')},{SMOL}={model_dir('smollm2-135m-instruct')}",
            "MODELS_CONFIG": str(config),
            "MAX_LOADED_MODELS": "1",
            "MAX_MODEL_LEN": "2048",
        },
    )
    yield stack
    stack.stop(timeout_s=90)
    kill_tree(stack.process.pid)


def chat(stack: Stack, model: str, question: str = "What is the capital of France?") -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 20, "temperature": 0},
        timeout=LOAD_TIMEOUT_S,
    )


def states(stack: Stack) -> dict[str, str]:
    listing = httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()
    return {entry["id"]: entry["state"] for entry in listing["data"]}


def engines_running(stack: Stack) -> int:
    """Engine API servers among the stack's processes (each model's engine is one)."""
    count = 0
    for process in stack.descendants():
        try:
            if ENGINE_MODULE in " ".join(process.cmdline()):
                count += 1
        except psutil.Error:  # the process ended while being read
            continue
    return count


def wait_for(check: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.5)


def test_models_are_listed_unloaded_and_an_unknown_one_gets_404_with_the_names(multi_stack: Stack) -> None:
    assert states(multi_stack) == {CHAT: "unloaded", SMOL: "unloaded"}
    assert engines_running(multi_stack) == 0

    response = chat(multi_stack, "gpt-4")

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == f"The model 'gpt-4' does not exist; this server serves: {CHAT}, {SMOL}."


def test_alternating_requests_are_answered_by_the_model_they_name(multi_stack: Stack) -> None:
    for model in (SMOL, CHAT, SMOL):
        response = chat(multi_stack, model)
        assert response.status_code == 200, response.text
        body = response.json()
        answer = body["choices"][0]["message"]["content"]
        # The engine reports the name it serves; only SmolLM2 (not the random-weight Llama) knows the answer.
        assert body["model"] == model
        assert ("Paris" in answer) == (model == SMOL), answer
        other = CHAT if model == SMOL else SMOL
        assert states(multi_stack) == {model: "loaded", other: "unloaded"}
        wait_for(lambda: engines_running(multi_stack) == 1)

    lines = [line for line in multi_stack.request_lines() if line.get("path") == "/v1/chat/completions"]
    answered = [line for line in lines if line["status"] == 200]
    assert [line["model"] for line in answered] == [SMOL, CHAT, SMOL]
    assert all(line["load_wait_ms"] > 0 for line in answered)  # each one waited for its model's engine to start


def test_generate_and_metrics_follow_the_loaded_model(multi_stack: Stack) -> None:
    # SmolLM2 is the one loaded after the alternating requests; /generate names it like /v1 does.
    response = httpx.post(
        f"{multi_stack.base_url}/generate",
        json={"model": SMOL, "prompt": "What is the capital of France?", "max_tokens": 20, "temperature": 0},
        timeout=LOAD_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model_info"]["name"] == SMOL and "Paris" in reply["response"], reply

    scrape = httpx.get(f"{multi_stack.base_url}/metrics", timeout=30).text
    assert f'vllm_api_engine_metrics_up{{model="{SMOL}"}} 1.0' in scrape
    assert f'vllm:num_requests_running{{engine="0",model_name="{SMOL}"}}' in scrape
    assert f'model_name="{CHAT}"' not in scrape  # its engine is not running


def stream_chat(stack: Stack, model: str, question: str) -> list[dict[str, object]]:
    """The events of one streamed chat completion; fails on an error event or a stream without [DONE]."""
    events: list[dict[str, object]] = []
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=LOAD_TIMEOUT_S) as response:
        assert response.status_code == 200
        done = False
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            events.append(event)
    assert done, "the stream ended without data: [DONE]"
    return events


def test_concurrent_streams_for_both_models_all_complete(multi_stack: Stack) -> None:
    jobs = [(model, f"Question {index} for {model}") for index in range(3) for model in (CHAT, SMOL)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: stream_chat(multi_stack, *job), jobs))

    for (model, _), events in zip(jobs, results):
        assert events and {event["model"] for event in events} == {model}
        finish = [choice["finish_reason"] for event in events for choice in event["choices"] if choice["finish_reason"]]
        assert finish in (["stop"], ["length"])  # every stream ran to its end
    wait_for(lambda: engines_running(multi_stack) == 1)
