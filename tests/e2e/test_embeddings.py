"""An embedding model made by environment variables only: the tiny Llama with RUNNER=pooling, CONVERT=embed.

No SERVED_MODEL_NAME: the local directory is served under its folder name.
Through the wrapper: a batch of vectors of the model's hidden size from the
openai SDK, with the tokens counted in the request's log line; chat refused
with an OpenAI-shaped 404; client_example.py embeds; test_api.py checks
embeddings and skips chat. The random weights make the vectors meaningless:
this proves the plumbing. The stack serves this module only.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import client_example as ce
from tests.e2e.clients import openai_client, run_client_example, run_test_api
from tests.stack import Stack, kill_tree, model_dir, port, start_stack

MODEL = "tiny-llama"
TEXTS = ["The capital of France is Paris.", "A red square and a blue circle.", "Hello!"]


@pytest.fixture(scope="module")
def embedding_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        model_dir(MODEL), port=port(33), vllm_port=port(34), log_path=logs_dir / "embedding.log",
        extra_env={"RUNNER": "pooling", "CONVERT": "embed", "MAX_MODEL_LEN": "512"},
    )
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


def hidden_size() -> int:
    return json.loads((model_dir(MODEL) / "config.json").read_text())["hidden_size"]


def test_a_batch_has_one_vector_of_the_models_size_per_input(embedding_stack: Stack) -> None:
    reply = openai_client(embedding_stack).embeddings.with_raw_response.create(
        model=MODEL, input=TEXTS, extra_headers={"X-Request-ID": "embedding-batch"},
    )
    embeddings = reply.parse()
    assert [item.index for item in embeddings.data] == [0, 1, 2]
    vectors = [item.embedding for item in embeddings.data]
    assert all(len(vector) == hidden_size() for vector in vectors)
    assert len({tuple(vector) for vector in vectors}) == 3
    line = embedding_stack.request_line("embedding-batch")
    assert line["path"] == "/v1/embeddings" and line["status"] == 200
    assert line["prompt_tokens"] == embeddings.usage.prompt_tokens > 0


def test_the_warm_up_is_an_embedding_and_a_short_input_after_it_is_answered(embedding_stack: Stack) -> None:
    """The warm-up of a pooling model is an embedding of a sentence; a three-token first
    request would take the CPU engine down (see app/lifecycle/warmup.py)."""
    (warmup,) = [line for line in embedding_stack.logs() if line["message"] == "warm-up done"]
    assert warmup["sent"] == ["embedding"]
    reply = openai_client(embedding_stack).embeddings.create(model=MODEL, input="Hello")
    assert len(reply.data[0].embedding) == hidden_size()


def test_a_local_directory_is_served_under_its_folder_name(embedding_stack: Stack) -> None:
    assert [model.id for model in openai_client(embedding_stack).models.list().data] == [MODEL]


def test_an_embedding_model_refuses_chat_with_an_openai_error(embedding_stack: Stack) -> None:
    response = httpx.post(
        f"{embedding_stack.base_url}/v1/chat/completions", timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 404
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}


def test_client_example_embeds(embedding_stack: Stack) -> None:
    vectors = ce.InferenceClient(embedding_stack.base_url, max_retries=0).embed(TEXTS)
    assert len(vectors) == 3 and {len(vector) for vector in vectors} == {hidden_size()}
    printed = run_client_example(embedding_stack.base_url, "--embed", "first text", "second text")
    assert [row["text"] for row in printed] == ["first text", "second text"]
    assert [row["dimensions"] for row in printed] == [hidden_size()] * 2


def test_pooling_returns_the_pooled_vectors(embedding_stack: Stack) -> None:
    response = httpx.post(f"{embedding_stack.base_url}/pooling", json={"model": MODEL, "input": ["Hi"]}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def test_test_api_checks_embeddings_and_skips_chat(embedding_stack: Stack, tmp_path: Path) -> None:
    code, output, rows = run_test_api(embedding_stack.base_url, tmp_path)
    assert code == 0, output
    assert rows["embeddings"]["status"] == "pass" and rows["rerank"]["status"] == "pass", output
    for chat_check in ("text", "streaming", "tool calling", "structured output", "responses API", "messages API"):
        assert rows[chat_check]["status"] == "skip", output
