"""MODELS on the real CPU engine: a model that fails to load, and a model unloaded when idle.

`broken` is the tiny Llama with a MAX_MODEL_LEN above what its config allows (set in MODELS_CONFIG),
so its engine refuses to start: the requests waiting for it get the failure sentence, and
`tiny-chat` keeps serving. MODEL_IDLE_TTL_S then unloads `tiny-chat` (its engine process exits)
and the next request loads it again.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_multi_model import chat, engines_running, states, wait_for
from tests.stack import Stack, kill_tree, model_dir, port, start_stack

CHAT = "tiny-chat"
BROKEN = "broken"
IDLE_TTL_S = 10


@pytest.fixture(scope="module")
def ttl_stack(logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("multi-ttl") / "models.json"
    config.write_text(f'{{"{BROKEN}": {{"MAX_MODEL_LEN": 1000000}}}}')
    llama = model_dir("tiny-llama")
    stack = start_stack(
        "unused-with-MODELS", port=port(48), vllm_port=port(49), log_path=logs_dir / "multi-ttl.log",
        extra_env={
            "MODELS": f"{CHAT}={llama},{BROKEN}={llama}",
            "MODELS_CONFIG": str(config),
            "MAX_LOADED_MODELS": "1",
            "MODEL_IDLE_TTL_S": str(IDLE_TTL_S),
            "MAX_MODEL_LEN": "2048",
        },
    )
    yield stack
    stack.stop(timeout_s=90)
    kill_tree(stack.process.pid)


def test_a_failed_load_answers_its_waiters_and_the_other_model_serves_then_idles_out(ttl_stack: Stack) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(chat, ttl_stack, BROKEN) for _ in range(2)]
        failed = [future.result() for future in waiting]

    for response in failed:
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "model_load_failed"
        assert error["message"].startswith(f"Model '{BROKEN}' failed to load: MAX_MODEL_LEN=1000000 is above")
    assert states(ttl_stack)[BROKEN] == "failed"

    served = chat(ttl_stack, CHAT)
    assert served.status_code == 200, served.text
    assert served.json()["model"] == CHAT

    # Idle for MODEL_IDLE_TTL_S: unloaded, its engine process gone; the next request loads it again.
    wait_for(lambda: states(ttl_stack)[CHAT] == "unloaded", timeout_s=IDLE_TTL_S + 120)
    wait_for(lambda: engines_running(ttl_stack) == 0, timeout_s=60)
    again = chat(ttl_stack, CHAT)
    assert again.status_code == 200, again.text
    loads = [line for line in ttl_stack.logs() if line.get("message") == "model engine ready"]
    assert [line["model"] for line in loads] == [CHAT, CHAT]
