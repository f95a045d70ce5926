"""A cross-encoder served with no setting but MODEL_NAME: scores, and a rerank order that follows them.

A tiny random BERT with one label (`BertForSequenceClassification`): vLLM
picks the pooling runner from the architecture. The scores are meaningless;
the test checks that each document gets one, and that rerank returns the
documents ordered by those same scores. The stack serves this module only.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import Stack, kill_tree, model_dir, port, start_stack

MODEL = "tiny-bert-reranker"
QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "The quick brown fox.", "Rome is in Italy.", "Hello there!"]


@pytest.fixture(scope="module")
def reranker_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(model_dir(MODEL), port=port(35), vllm_port=port(36), log_path=logs_dir / "reranker.log")
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


def scores(stack: Stack) -> list[float]:
    response = httpx.post(
        f"{stack.base_url}/v1/score", timeout=60, json={"model": MODEL, "text_1": QUERY, "text_2": DOCUMENTS},
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(DOCUMENTS)))
    return [item["score"] for item in data]


def test_a_cross_encoder_scores_every_document(reranker_stack: Stack) -> None:
    found = scores(reranker_stack)
    assert all(0.0 < score < 1.0 for score in found)  # one label: a sigmoid
    assert len(set(found)) == len(DOCUMENTS)


@pytest.mark.parametrize(
    "path",
    ["/v1/rerank", "/rerank", "/v2/rerank"],
)
def test_rerank_orders_the_documents_by_their_scores(reranker_stack: Stack, path: str) -> None:
    expected = scores(reranker_stack)
    response = httpx.post(
        f"{reranker_stack.base_url}{path}", timeout=60,
        json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS, "top_n": 3},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    ranked = sorted(range(len(DOCUMENTS)), key=lambda index: expected[index], reverse=True)
    assert [result["index"] for result in results] == ranked[:3]
    for result in results:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], rel=1e-4)
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
