"""The RunPod Hub listing on the real CPU engine: its test request and its embedding preset.

The Hub sends each request of `.runpod/tests.json` to a fresh deployment and
publishes the release only when it answers 200; the embedding preset must make
the engine serve `/v1/embeddings`. The listing's own models need the Hugging
Face Hub and a GPU, so both run on the offline tiny Llama: the test request
names no model, and vLLM's pooling runner turns a causal LM into an embedding
model with the preset's flags, as it does Qwen3-Embedding.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import Stack, kill_tree, model_dir, port, start_stack
from tools import runpod_listing as listing


@pytest.fixture(scope="module")
def embedding_stack(logs_dir: Path) -> Iterator[Stack]:
    preset = {name: listing.env_text(value) for name, value in listing.EMBEDDING.values.items()}
    # The preset's model and context, swapped for the offline tiny Llama's; its flags kept as they are.
    # float32: on vLLM 0.32's CPU engine the pooling runner kills its worker process in bfloat16
    # (the tiny Llama's dtype) at the first request; float32 serves it.
    env = {**preset, "MAX_MODEL_LEN": "2048", "DTYPE": "float32"}
    del env["MODEL_NAME"]
    stack = start_stack(
        model_dir("tiny-llama"), port=port(33), vllm_port=port(34), log_path=logs_dir / "embed.log", extra_env=env
    )
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


def test_every_hub_test_request_gets_200(text_stack: Stack) -> None:
    for case in json.loads(listing.TESTS_JSON.read_text())["tests"]:
        response = httpx.post(
            text_stack.base_url + listing.HUB_TEST_ROUTE, json=case["input"], timeout=case["timeout"] / 1000
        )
        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] > 0


def test_the_embedding_preset_serves_embeddings(embedding_stack: Stack) -> None:
    response = httpx.post(
        embedding_stack.base_url + "/v1/embeddings", json={"input": ["first text", "second text"]}, timeout=120
    )
    assert response.status_code == 200, response.text
    vectors = [item["embedding"] for item in response.json()["data"]]
    hidden_size = json.loads((model_dir("tiny-llama") / "config.json").read_text())["hidden_size"]
    assert [len(vector) for vector in vectors] == [hidden_size, hidden_size]
    assert vectors[0] != vectors[1]
