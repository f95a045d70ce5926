"""`POST /generate` and stored conversations on the real CPU engine.

A real instruct model (SmolLM2-135M-Instruct, converted offline) answers, so
the replies mean something: a second turn that needs the first one, a JSON
reply that comes back parsed. The tests prove the timings and token counts
agree with the engine, MAX_TOKENS_CAP is applied and reported, conversations
survive a wrapper restart on SQLite and on a real PostgreSQL server (started
by the suite from Debian's `postgresql` package, on 127.0.0.1), concurrent
turns on one conversation are all kept, idle conversations expire, deletes
stick, bad input gets a 4xx in the OpenAI error shape, and the conversation
routes need the API key. Tests that need other wrapper settings start a
wrapper-only instance (ENGINE_URL) in front of the same engine.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.generate.store import SQLITE_FILE_NAME
from tests.postgres_server import PostgresServer, running_postgres
from tests.stack import SMOLLM2_ENV, Stack, engine_gauge, kill_tree, model_dir, port, start_stack

MODEL = "smol-chat"
MAX_MODEL_LEN = 1024
MAX_TOKENS_CAP = 64
TTL_S = 3
# The name goes in the first turn and must come back in the second. This
# wording is one SmolLM2-135M answers from the history; "What is my name?"
# after "My name is Alice." is beyond it (it answers with a name of its own).
INTRODUCTION = "Hi, I am Alice."
NAME_QUESTION = "Tell me my name."
JSON_SYSTEM = "You reply only with JSON objects."
JSON_PROMPT = 'JSON with "name" and "age" of Alice, age 30:'

WrapperFactory = Callable[..., Stack]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(scope="module")
def smol(logs_dir: Path, hf_home: Path) -> Iterator[Stack]:
    stack = start_stack(
        model_dir("smollm2-135m-instruct"), port=port(71), vllm_port=port(72), log_path=logs_dir / "generate.log",
        extra_env={
            "SERVED_MODEL_NAME": MODEL, "MAX_MODEL_LEN": str(MAX_MODEL_LEN), "MAX_TOKENS_CAP": str(MAX_TOKENS_CAP),
            "HF_HOME": str(hf_home), **SMOLLM2_ENV,
        },
    )
    yield stack
    stack.stop(signal.SIGTERM, timeout_s=60)
    kill_tree(stack.process.pid)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with running_postgres(port(70)) as server:
        yield server


def generate(base_url: str, timeout_s: float = 120, headers: dict[str, str] | None = None, **body: object) -> dict:
    response = httpx.post(f"{base_url}/generate", json=body, headers=headers, timeout=timeout_s)
    assert response.status_code == 200, response.text
    return response.json()


def generated_tokens(stack: Stack) -> float:
    return engine_gauge(stack.engine_url, "vllm:generation_tokens_total")


def assert_timings_plausible(reply: dict, wall_ms: float) -> None:
    assert 0 < reply["ttft_ms"] <= reply["total_ms"] <= wall_ms
    assert 0 < reply["generation_ms"] <= reply["total_ms"]
    assert reply["tokens_per_second"] > 0
    expected_rate = reply["tokens_generated"] / (reply["generation_ms"] / 1000)
    assert reply["tokens_per_second"] == pytest.approx(expected_rate, rel=0.01)


def assert_json_flag_consistent(reply: dict) -> None:
    """response_json holds the parsed reply exactly when the reply is a JSON object or array."""
    try:
        parsed = json.loads(reply["response"])
    except ValueError:
        parsed = None
    if isinstance(parsed, (dict, list)):
        assert reply["response_is_json"] is True and reply["response_json"] == parsed
    elif reply["response_is_json"] is False:
        assert reply["response_json"] is None
    else:  # only a ```json fenced reply is JSON without parsing as a whole
        assert reply["response"].lstrip().startswith("```") and reply["response_json"] is not None


def sse_events(response: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def conversation(base_url: str, conversation_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{base_url}/conversations/{conversation_id}", headers=headers, timeout=30)


# --- Replies and timings ----------------------------------------------------------------


def test_reply_timings_and_token_counts_agree_with_the_engine(smol: Stack) -> None:
    before = generated_tokens(smol)
    started = time.perf_counter()
    reply = generate(smol.base_url, prompt="What is the capital of France?", temperature=0, max_tokens=20)
    wall_ms = (time.perf_counter() - started) * 1000
    assert "Paris" in reply["response"]
    assert reply["tokens_generated"] == generated_tokens(smol) - before > 0
    assert reply["prompt_tokens"] > 0
    assert_timings_plausible(reply, wall_ms)
    assert reply["model_info"] == {"name": MODEL, "max_model_len": MAX_MODEL_LEN}
    assert reply["finish_reason"] in ("stop", "length")
    assert reply["conversation_id"]
    assert_json_flag_consistent(reply)


def test_streamed_reply_sends_text_pieces_then_the_timed_reply(smol: Stack) -> None:
    before = generated_tokens(smol)
    started = time.perf_counter()
    body = {"prompt": "Write a short poem about the sea.", "temperature": 0, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{smol.base_url}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    wall_ms = (time.perf_counter() - started) * 1000
    assert events[-1] == "[DONE]"
    *pieces, done = events[:-1]
    assert len(pieces) > 1 and all(set(piece) == {"text"} for piece in pieces)
    assert done["done"] is True
    assert done["response"] == "".join(piece["text"] for piece in pieces)
    assert done["tokens_generated"] == generated_tokens(smol) - before > 0
    assert_timings_plausible(done, wall_ms)
    # Several tokens came one by one: the first arrived well before the last.
    assert done["ttft_ms"] < done["total_ms"]
    assert_json_flag_consistent(done)


def test_json_reply_comes_back_parsed(smol: Stack) -> None:
    reply = generate(smol.base_url, system=JSON_SYSTEM, prompt=JSON_PROMPT, temperature=0, max_tokens=40)
    assert reply["response_is_json"] is True, reply["response"]
    assert reply["response_json"] == json.loads(reply["response"])
    assert reply["response_json"] == {"name": "Alice", "age": 30}


def test_max_tokens_above_the_cap_is_lowered_and_flagged(smol: Stack) -> None:
    capped = generate(smol.base_url, prompt="Write a long story about a dragon.", temperature=0, max_tokens=1000)
    assert capped["max_tokens"] == MAX_TOKENS_CAP and capped["max_tokens_clamped"] is True
    assert capped["finish_reason"] == "length" and capped["tokens_generated"] == MAX_TOKENS_CAP
    within = generate(smol.base_url, prompt="Write a long story about a dragon.", temperature=0, max_tokens=10)
    assert within["max_tokens"] == 10 and within["max_tokens_clamped"] is False
    assert within["tokens_generated"] == 10


# --- Conversations ---------------------------------------------------------------------


def test_second_turn_answers_from_the_first(smol: Stack) -> None:
    first = generate(smol.base_url, prompt=INTRODUCTION, temperature=0, max_tokens=32)
    second = generate(
        smol.base_url, prompt=NAME_QUESTION, conversation_id=first["conversation_id"], temperature=0, max_tokens=32
    )
    assert second["conversation_id"] == first["conversation_id"]
    assert "Alice" in second["response"], second["response"]
    # The same question without the conversation: the name is not in the model, only in the history.
    alone = generate(smol.base_url, prompt=NAME_QUESTION, temperature=0, max_tokens=32)
    assert "Alice" not in alone["response"], alone["response"]
    assert second["prompt_tokens"] > alone["prompt_tokens"] + first["tokens_generated"]

    stored = conversation(smol.base_url, first["conversation_id"]).json()
    assert [(turn["role"], turn["content"]) for turn in stored["turns"]] == [
        ("user", INTRODUCTION), ("assistant", first["response"]),
        ("user", NAME_QUESTION), ("assistant", second["response"]),
    ]
    assert stored["turn_count"] == 4


def test_long_conversation_drops_its_oldest_turns_to_fit_the_context(smol: Stack) -> None:
    max_tokens = 32
    passage = "The quick brown fox jumps over the lazy dog. " * 25  # about 250 tokens per user turn
    conversation_id = None
    replies = []
    for turn in range(5):
        body: dict[str, object] = {"prompt": f"Part {turn}: {passage}", "temperature": 0, "max_tokens": max_tokens}
        if conversation_id:
            body["conversation_id"] = conversation_id
        reply = generate(smol.base_url, **body)
        conversation_id = reply["conversation_id"]
        replies.append(reply)
    assert replies[0]["history_truncated"] is False
    # Five such exchanges do not fit in 1024 tokens: the later turns went out without the oldest ones.
    assert replies[-1]["history_truncated"] is True
    assert all(reply["prompt_tokens"] + max_tokens <= MAX_MODEL_LEN for reply in replies)
    # Leaving turns out of the prompt does not delete them.
    assert conversation(smol.base_url, conversation_id).json()["turn_count"] == 10


def store_env(backend: str, hf_home: Path, postgres: Callable[[], PostgresServer]) -> dict[str, str]:
    if backend == "sqlite":
        return {"HF_HOME": str(hf_home)}
    return {"HF_HOME": str(hf_home), "CONVERSATIONS_DB_URL": postgres().dsn}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_conversation_survives_a_wrapper_restart(
    backend: str, smol: Stack, wrapper: WrapperFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = store_env(backend, tmp_path, lambda: request.getfixturevalue("postgres"))
    first_wrapper = wrapper(smol.engine_url, SERVED_MODEL_NAME=MODEL, **env)
    first = generate(first_wrapper.base_url, prompt=INTRODUCTION, temperature=0, max_tokens=32)
    assert first_wrapper.stop(signal.SIGTERM) == 0
    assert (tmp_path / SQLITE_FILE_NAME).exists() == (backend == "sqlite")

    second_wrapper = wrapper(smol.engine_url, SERVED_MODEL_NAME=MODEL, **env)
    kept = conversation(second_wrapper.base_url, first["conversation_id"])
    assert kept.status_code == 200
    assert [turn["content"] for turn in kept.json()["turns"]] == [INTRODUCTION, first["response"]]
    second = generate(
        second_wrapper.base_url, prompt=NAME_QUESTION, conversation_id=first["conversation_id"],
        temperature=0, max_tokens=32,
    )
    assert "Alice" in second["response"], second["response"]
    assert conversation(second_wrapper.base_url, first["conversation_id"]).json()["turn_count"] == 4


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_turns_on_one_conversation_are_all_kept(
    backend: str, smol: Stack, wrapper: WrapperFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = store_env(backend, tmp_path, lambda: request.getfixturevalue("postgres"))
    instance = wrapper(smol.engine_url, SERVED_MODEL_NAME=MODEL, **env)
    opening = generate(instance.base_url, prompt="Let us count.", temperature=0, max_tokens=4)
    conversation_id = opening["conversation_id"]

    async def turns() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=instance.base_url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post("/generate", json={
                    "prompt": f"Turn {index}", "conversation_id": conversation_id, "temperature": 0, "max_tokens": 4,
                })
                for index in range(8)
            ))

    replies = asyncio.run(asyncio.wait_for(turns(), 300))
    assert [reply.status_code for reply in replies] == [200] * 8
    stored = conversation(instance.base_url, conversation_id).json()
    assert stored["turn_count"] == 18
    turns_stored = stored["turns"]
    assert [turn["role"] for turn in turns_stored] == ["user", "assistant"] * 9
    # Every exchange is whole: each prompt is directly followed by its own reply.
    exchanges = {turns_stored[i]["content"]: turns_stored[i + 1]["content"] for i in range(2, 18, 2)}
    assert exchanges == {f"Turn {i}": replies[i].json()["response"] for i in range(8)}


def test_idle_conversations_expire_after_the_ttl(smol: Stack, wrapper: WrapperFactory, tmp_path: Path) -> None:
    instance = wrapper(smol.engine_url, SERVED_MODEL_NAME=MODEL, HF_HOME=str(tmp_path), CONVERSATIONS_TTL_S=str(TTL_S))
    reply = generate(instance.base_url, prompt="Hello", temperature=0, max_tokens=4)
    conversation_id = reply["conversation_id"]
    assert conversation(instance.base_url, conversation_id).status_code == 200
    time.sleep(TTL_S + 0.5)
    expired = conversation(instance.base_url, conversation_id)
    assert expired.status_code == 404
    assert expired.json()["error"]["code"] == "conversation_not_found"
    assert f"CONVERSATIONS_TTL_S={TTL_S}" in expired.json()["error"]["message"]
    listed = httpx.get(f"{instance.base_url}/conversations", timeout=30).json()["data"]
    assert conversation_id not in [item["id"] for item in listed]
    continued = httpx.post(
        f"{instance.base_url}/generate", json={"prompt": "Hi again", "conversation_id": conversation_id}, timeout=30
    )
    assert continued.status_code == 404


def test_deleted_conversation_is_gone(smol: Stack) -> None:
    conversation_id = generate(smol.base_url, prompt="Hello", temperature=0, max_tokens=4)["conversation_id"]
    listed = httpx.get(f"{smol.base_url}/conversations", timeout=30).json()["data"]
    assert conversation_id in [item["id"] for item in listed]
    deleted = httpx.delete(f"{smol.base_url}/conversations/{conversation_id}", timeout=30)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
    assert conversation(smol.base_url, conversation_id).status_code == 404
    assert httpx.delete(f"{smol.base_url}/conversations/{conversation_id}", timeout=30).status_code == 404
    continued = httpx.post(
        f"{smol.base_url}/generate", json={"prompt": "Hi again", "conversation_id": conversation_id}, timeout=30
    )
    assert continued.status_code == 404 and continued.json()["error"]["param"] == "conversation_id"


# --- Bad input and authentication -------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "message_part"),
    [
        ({}, 400, None, "'prompt'"),
        ({"temperature": 0}, 400, None, "'prompt'"),
        ({"prompt": 5}, 400, "prompt", "valid string"),
        ({"prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
        ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature", "valid number"),
        ({"prompt": "Hi", "stream": "yes"}, 400, "stream", "valid boolean"),
        ({"prompt": "Hi", "max_token": 5}, 400, "max_token", "not permitted"),
        ({"prompt": "Hi", "conversation_id": "no-such-conversation"}, 404, "conversation_id", "no-such-conversation"),
    ],
)
def test_bad_input_gets_a_4xx_in_openai_error_shape(
    smol: Stack, body: dict, status: int, param: str | None, message_part: str
) -> None:
    response = httpx.post(f"{smol.base_url}/generate", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param
    assert message_part in error["message"]


def test_malformed_json_body_is_a_400(smol: Stack) -> None:
    response = httpx.post(
        f"{smol.base_url}/generate", content=b'{"prompt": "Hi",', headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_conversation_routes_need_the_api_key(smol: Stack, wrapper: WrapperFactory, tmp_path: Path) -> None:
    key = "e2e-conversation-key"
    instance = wrapper(smol.engine_url, SERVED_MODEL_NAME=MODEL, HF_HOME=str(tmp_path), API_KEY=key)
    authorized = {"Authorization": f"Bearer {key}"}
    wrong = {"Authorization": "Bearer not-the-key"}
    body = {"prompt": "Hello", "temperature": 0, "max_tokens": 4}
    for headers in (None, wrong):
        refused = httpx.post(f"{instance.base_url}/generate", json=body, headers=headers, timeout=30)
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert key not in refused.text
    conversation_id = generate(instance.base_url, headers=authorized, **body)["conversation_id"]

    routes = [
        ("GET", "/conversations"),
        ("GET", f"/conversations/{conversation_id}"),
        ("DELETE", f"/conversations/{conversation_id}"),
    ]
    for method, path in routes:
        for headers in (None, wrong):
            refused = httpx.request(method, f"{instance.base_url}{path}", headers=headers, timeout=30)
            assert refused.status_code == 401, (method, path)
            assert refused.json()["error"]["type"] == "authentication_error"
    for method, path in routes:
        assert httpx.request(method, f"{instance.base_url}{path}", headers=authorized, timeout=30).status_code == 200
