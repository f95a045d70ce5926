"""`POST /generate` and `/conversations` over HTTP, in front of a stand-in engine.

The wrapper runs in-process exactly as `app/serve.py` builds it (front door,
`/generate`, the one engine client), in wrapper-only mode, in front of
`tests.fake_engine.FakeEngine`: a stand-in for the engine's HTTP server that
streams deterministic replies word by word with a usage block, counts tokens
on `/tokenize` (one per word plus 4 per message) and records every request,
so tests can check what the engine was sent. The end-to-end tests run the
same routes against the real CPU engine.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.fake_engine import SERVED_NAME, FakeEngine
from tests.inprocess import Wrapper, running_wrapper

Client = httpx.AsyncClient
MakeWrapper = Callable[..., Awaitable[Wrapper]]
MakeClient = Callable[..., Awaitable[Client]]


@pytest_asyncio.fixture
async def make_wrapper(engine: FakeEngine) -> AsyncIterator[MakeWrapper]:
    """Start a wrapper with the given settings (environment names) in front of the fake engine."""
    async with AsyncExitStack() as stack:

        async def make(model_max_len: int | None = 4096, **env: str) -> Wrapper:
            engine.max_model_len = model_max_len
            return await stack.enter_async_context(running_wrapper(engine.url, **env))

        yield make


@pytest_asyncio.fixture
async def make_client(make_wrapper: MakeWrapper) -> AsyncIterator[MakeClient]:
    """Like make_wrapper, and returns an HTTP client for it."""
    async with AsyncExitStack() as stack:

        async def make(model_max_len: int | None = 4096, **env: str) -> Client:
            wrapper = await make_wrapper(model_max_len, **env)
            return await stack.enter_async_context(wrapper.client())

        yield make


def sse_events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.asyncio
async def test_reply_with_timings_and_model_info(make_wrapper: MakeWrapper, engine: FakeEngine) -> None:
    wrapper = await make_wrapper(model_max_len=2048)
    client = wrapper.client()
    response = await client.post("/generate", json={"prompt": "What is the capital of France?", "max_tokens": 64})
    assert response.status_code == 200, response.text
    reply = response.json()

    assert reply["response"] == "Echo: What is the capital of France?"
    assert reply["finish_reason"] == "stop"
    assert reply["model_info"] == {"name": SERVED_NAME, "max_model_len": 2048}
    assert reply["tokens_generated"] == engine.usage_sent[-1]["completion_tokens"]
    assert reply["prompt_tokens"] == engine.usage_sent[-1]["prompt_tokens"]
    assert 0 < reply["ttft_ms"] <= reply["total_ms"]
    assert 0 < reply["generation_ms"] <= reply["total_ms"]
    expected_rate = reply["tokens_generated"] / (reply["generation_ms"] / 1000)
    assert reply["tokens_per_second"] == pytest.approx(expected_rate, rel=0.01)
    assert reply["response_is_json"] is False and reply["response_json"] is None
    assert reply["max_tokens_clamped"] is False and reply["history_truncated"] is False
    assert re.fullmatch(r"[0-9a-f]{32}", reply["conversation_id"])

    [sent] = engine.chat_requests
    assert sent["model"] == SERVED_NAME
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "user", "content": "What is the capital of France?"}]

    [line] = [line for line in await wrapper.wait_for_lines(1) if line["path"] == "/generate"]
    assert line["model"] == SERVED_NAME and line["stream"] is False and line["status"] == 200
    assert line["completion_tokens"] == reply["tokens_generated"]
    assert 0 < line["ttft_ms"] <= line["duration_ms"]


@pytest.mark.asyncio
async def test_streamed_reply_sends_text_then_timings_then_done(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    response = await client.post("/generate", json={"message": "stream this please", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)

    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-2]]
    done = json.loads(events[-2])
    assert "".join(texts) == "Echo: stream this please" == done["response"]
    assert done["done"] is True
    assert done["tokens_generated"] == engine.usage_sent[-1]["completion_tokens"] == len(texts)
    assert 0 < done["ttft_ms"] <= done["total_ms"]
    assert done["conversation_id"]


@pytest.mark.asyncio
async def test_keepalive_comments_while_waiting_for_the_first_token(
    make_client: MakeClient, engine: FakeEngine
) -> None:
    client = await make_client(SSE_KEEPALIVE_S="0.05")
    engine.first_token_delay_s = 0.3
    response = await client.post("/generate", json={"prompt": "slow", "stream": True})
    assert ": keep-alive" in response.text
    assert json.loads(sse_events(response.text)[-2])["response"] == "Echo: slow"


@pytest.mark.asyncio
async def test_json_reply_is_parsed(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    engine.reply = '```json\n{"city": "Paris", "facts": [1, 2]}\n```'
    reply = (await client.post("/generate", json={"prompt": "Answer in JSON"})).json()
    assert reply["response_is_json"] is True
    assert reply["response_json"] == {"city": "Paris", "facts": [1, 2]}
    assert reply["response"] == engine.reply


@pytest.mark.asyncio
async def test_max_tokens_above_the_cap_is_clamped_and_reported(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client(MAX_TOKENS_CAP="3")
    engine.reply = "one two three four five six"

    clamped = (await client.post("/generate", json={"prompt": "count", "max_tokens": 100})).json()
    assert engine.chat_requests[-1]["max_tokens"] == 3
    assert clamped["max_tokens"] == 3 and clamped["max_tokens_clamped"] is True
    assert clamped["response"] == "one two three " and clamped["finish_reason"] == "length"

    within = (await client.post("/generate", json={"prompt": "count", "max_tokens": 2})).json()
    assert engine.chat_requests[-1]["max_tokens"] == 2
    assert within["max_tokens"] == 2 and within["max_tokens_clamped"] is False


@pytest.mark.asyncio
async def test_default_max_tokens_fits_the_cap_and_the_context(make_client: MakeClient, engine: FakeEngine) -> None:
    small_context = await make_client(model_max_len=100)
    reply = (await small_context.post("/generate", json={"prompt": "hi"})).json()
    assert engine.chat_requests[-1]["max_tokens"] == reply["max_tokens"] == 100 // 2
    assert reply["max_tokens_clamped"] is False

    low_cap = await make_client(model_max_len=None, MAX_TOKENS_CAP="16")
    reply = (await low_cap.post("/generate", json={"prompt": "hi"})).json()
    assert engine.chat_requests[-1]["max_tokens"] == reply["max_tokens"] == 16
    assert reply["max_tokens_clamped"] is False


@pytest.mark.asyncio
async def test_second_turn_sends_the_first_as_history(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    first = (await client.post("/generate", json={"prompt": "My name is Ada.", "system": "Be brief."})).json()
    conversation_id = first["conversation_id"]
    follow_up = {"prompt": "What is my name?", "conversation_id": conversation_id}
    second = (await client.post("/generate", json=follow_up)).json()

    assert second["conversation_id"] == conversation_id
    assert engine.chat_requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Echo: My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]

    stored = (await client.get(f"/conversations/{conversation_id}")).json()
    assert stored["system"] == "Be brief."
    assert [(t["role"], t["content"]) for t in stored["turns"]] == [
        ("user", "My name is Ada."),
        ("assistant", "Echo: My name is Ada."),
        ("user", "What is my name?"),
        ("assistant", "Echo: What is my name?"),
    ]
    listed = (await client.get("/conversations")).json()
    assert [(c["id"], c["turn_count"]) for c in listed["data"]] == [(conversation_id, 4)]


@pytest.mark.asyncio
async def test_long_history_drops_the_oldest_turns_and_says_so(make_client: MakeClient, engine: FakeEngine) -> None:
    max_model_len, max_tokens = 120, 20
    client = await make_client(model_max_len=max_model_len)
    words = " ".join(["word"] * 8)
    first = await client.post("/generate", json={"prompt": f"turn 0 {words}", "max_tokens": max_tokens})
    conversation_id = first.json()["conversation_id"]
    for i in range(1, 6):
        reply = (await client.post("/generate", json={
            "prompt": f"turn {i} {words}", "conversation_id": conversation_id, "max_tokens": max_tokens,
        })).json()
    assert reply["history_truncated"] is True

    sent = engine.chat_requests[-1]["messages"]
    stored = (await client.get(f"/conversations/{conversation_id}")).json()["turns"]
    history = [{"role": t["role"], "content": t["content"]} for t in stored[:-2]]
    kept = sent[:-1]
    assert kept == history[len(history) - len(kept):], "the newest turns are kept, in order"
    assert 0 < len(kept) < len(history)
    assert sent[-1] == {"role": "user", "content": f"turn 5 {words}"}
    budget = max_model_len - max_tokens
    assert engine.count_tokens(sent) <= budget
    assert engine.count_tokens(history[len(history) - len(kept) - 2:] + sent[-1:]) > budget
    assert len(stored) == 12, "truncation only shortens what is sent, never what is stored"


@pytest.mark.asyncio
async def test_prompt_too_long_for_the_context_is_refused(make_client: MakeClient) -> None:
    client = await make_client(model_max_len=40)
    conversation_id = (await client.post("/generate", json={"prompt": "hi", "max_tokens": 8})).json()["conversation_id"]
    response = await client.post("/generate", json={
        "prompt": " ".join(["long"] * 50), "conversation_id": conversation_id, "max_tokens": 8,
    })
    assert assert_openai_error(response, 400, "prompt")["code"] == "context_length_exceeded"
    response = await client.post("/generate", json={"prompt": "hi", "max_tokens": 40})
    assert assert_openai_error(response, 400, "max_tokens")["code"] == "context_length_exceeded"


@pytest.mark.asyncio
async def test_parallel_turns_on_one_conversation_are_all_kept(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    conversation_id = (await client.post("/generate", json={"prompt": "start"})).json()["conversation_id"]
    replies = await asyncio.gather(*(
        client.post("/generate", json={"prompt": f"parallel {i}", "conversation_id": conversation_id})
        for i in range(20)
    ))
    assert [r.status_code for r in replies] == [200] * 20

    turns = (await client.get(f"/conversations/{conversation_id}")).json()["turns"]
    assert len(turns) == 42
    users = [t["content"] for t in turns[0::2]]
    assert sorted(users) == sorted(["start", *(f"parallel {i}" for i in range(20))])
    for user, assistant in zip(turns[0::2], turns[1::2], strict=True):
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == f"Echo: {user['content']}"


@pytest.mark.asyncio
async def test_delete_conversation(make_client: MakeClient) -> None:
    client = await make_client()
    conversation_id = (await client.post("/generate", json={"prompt": "forget me"})).json()["conversation_id"]
    deleted = await client.delete(f"/conversations/{conversation_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert_openai_error(await client.get(f"/conversations/{conversation_id}"), 404)
    assert_openai_error(await client.delete(f"/conversations/{conversation_id}"), 404)
    response = await client.post("/generate", json={"prompt": "again", "conversation_id": conversation_id})
    assert assert_openai_error(response, 404, "conversation_id")["code"] == "conversation_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, None),
        ({"prompt": "a", "message": "b"}, None),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({"prompt": "hi", "max_token": 5}, "max_token"),
        ({"prompt": "hi", "conversation_id": 7}, "conversation_id"),
    ],
)
@pytest.mark.asyncio
async def test_bad_input_gets_an_openai_style_400(
    make_client: MakeClient, engine: FakeEngine, body: dict[str, Any], param: str | None
) -> None:
    client = await make_client()
    error = assert_openai_error(await client.post("/generate", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert engine.chat_requests == []


@pytest.mark.asyncio
async def test_body_that_is_not_json_gets_an_openai_style_400(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert assert_openai_error(response, 400)["code"] == "invalid_json"


@pytest.mark.asyncio
async def test_unknown_conversation_is_404(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    response = await client.post("/generate", json={"prompt": "hi", "conversation_id": "0" * 32})
    error = assert_openai_error(response, 404, "conversation_id")
    assert error["type"] == "not_found_error"
    # The message names both ways out when a RunPod worker other than the conversation's answered.
    assert "X-Runpod-Worker-Id" in error["message"] and "CONVERSATIONS_DB_URL" in error["message"]
    assert engine.chat_requests == []


@pytest.mark.asyncio
async def test_with_storage_off_conversations_are_refused(make_client: MakeClient) -> None:
    client = await make_client(CONVERSATIONS_ENABLED="false")
    reply = (await client.post("/generate", json={"prompt": "hi"})).json()
    assert reply["response"] == "Echo: hi" and reply["conversation_id"] is None

    response = await client.post("/generate", json={"prompt": "hi", "conversation_id": "abc"})
    assert "CONVERSATIONS_ENABLED" in assert_openai_error(response, 400, "conversation_id")["message"]
    for listing in (await client.get("/conversations"), await client.get("/conversations/abc")):
        assert assert_openai_error(listing, 404)["code"] == "conversations_disabled"


@pytest.mark.asyncio
async def test_engine_refusal_is_passed_on(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/generate", json={"prompt": "REFUSE this"})
    assert "This prompt is refused." in assert_openai_error(response, 400)["message"]
    assert (await client.get("/conversations")).json()["data"] == [], "a failed turn is not stored"


@pytest.mark.asyncio
async def test_engine_failure_mid_stream_ends_with_an_error_event(make_wrapper: MakeWrapper, engine: FakeEngine) -> None:
    wrapper = await make_wrapper()
    client = wrapper.client()
    engine.fail_mid_stream = True
    response = await client.post("/generate", json={"prompt": "crash soon", "stream": True})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "engine crashed" in error["message"] and error["type"] == "engine_error"
    assert not any('"done"' in e for e in events)
    [line] = [line for line in await wrapper.wait_for_lines(1) if line["path"] == "/generate"]
    assert line["error"] == "engine_error"


@pytest.mark.asyncio
async def test_client_leaving_mid_stream_aborts_the_engine_request(make_wrapper: MakeWrapper, engine: FakeEngine) -> None:
    wrapper = await make_wrapper()
    engine.reply = " ".join(f"w{i}" for i in range(200))
    engine.piece_delay_s = 0.02
    async with (
        wrapper.client() as client,
        client.stream("POST", "/generate", json={"prompt": "long", "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # first text event; leave
    await wait_until(lambda: engine.aborted == 1)
    async with wrapper.client() as client:
        assert (await client.get("/conversations")).json()["data"] == [], "an unfinished turn is not stored"
    lines = await wrapper.wait_for_lines(2)
    assert [line["status"] for line in lines if line["path"] == "/generate"] == [499]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_unreachable_engine_is_503(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    await engine.stop()
    response = await client.post("/generate", json={"prompt": "anyone there?"})
    assert assert_openai_error(response, 503)["code"] == "engine_unavailable"
    assert "Retry-After" in response.headers


@pytest.mark.asyncio
async def test_conversations_belong_to_the_key_that_made_them(make_wrapper: MakeWrapper) -> None:
    wrapper = await make_wrapper(API_KEY="key-a,key-b")
    async with wrapper.client(headers={"Authorization": "Bearer key-a"}) as alice, \
            wrapper.client(headers={"Authorization": "Bearer key-b"}) as bob:
        conversation_id = (await alice.post("/generate", json={"prompt": "secret"})).json()["conversation_id"]
        assert (await alice.get(f"/conversations/{conversation_id}")).status_code == 200
        assert [c["id"] for c in (await alice.get("/conversations")).json()["data"]] == [conversation_id]

        assert (await bob.get("/conversations")).json()["data"] == []
        for response in (
            await bob.get(f"/conversations/{conversation_id}"),
            await bob.delete(f"/conversations/{conversation_id}"),
            await bob.post("/generate", json={"prompt": "continue", "conversation_id": conversation_id}),
        ):
            error = assert_openai_error(response, 404)
            assert "another API key" in error["message"]
        assert len((await alice.get(f"/conversations/{conversation_id}")).json()["turns"]) == 2, "untouched"


@pytest.mark.asyncio
async def test_database_down_at_start_leaves_v1_serving(make_wrapper: MakeWrapper, engine: FakeEngine) -> None:
    """A conversation database that cannot be reached: the wrapper starts, /v1 serves, /generate says why."""
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()  # nothing listens there
    wrapper = await make_wrapper(
        CONVERSATIONS_DB_URL=f"postgresql://user:secret@127.0.0.1:{port}/db", CONVERSATIONS_DB_TIMEOUT_S="1"
    )
    async with wrapper.client() as client:
        chat = await client.post("/v1/chat/completions", json={
            "model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200

        new = await client.post("/generate", json={"prompt": "hello"})
        assert new.status_code == 200 and new.json()["response"] == "Echo: hello"
        assert new.json()["conversation_id"] is None, "the reply is not lost, but there is nothing to continue"

        for response in (
            await client.post("/generate", json={"prompt": "again", "conversation_id": "abc"}),
            await client.get("/conversations"),
        ):
            error = assert_openai_error(response, 503)
            assert error["code"] == "conversation_store_unavailable" and "PostgreSQL" in error["message"]
            assert "secret" not in response.text
        assert (await client.get("/health")).status_code == 200


@pytest.mark.asyncio
async def test_a_model_named_in_the_request_must_be_the_served_one(make_wrapper: MakeWrapper, engine: FakeEngine) -> None:
    wrapper = await make_wrapper()
    client = wrapper.client()
    named = await client.post("/generate", json={"model": SERVED_NAME, "prompt": "hello"})
    other = await client.post("/generate", json={"model": "gpt-4", "prompt": "hello"})

    assert named.status_code == 200, named.text
    error = assert_openai_error(other, 404, param="model")
    assert error["code"] == "model_not_found" and SERVED_NAME in error["message"]
    assert len(engine.chat_requests) == 1
