"""The benchmark's fake upstream answers like vLLM's OpenAI server, so a gateway sees realistic traffic."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from bench.fake_upstream import UpstreamConfig, start_server
from tests.unit.test_bench_loadgen import free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(params=[False, True], ids=["whole-stream-writes", "per-chunk-writes"])
async def base_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    port = free_port()
    server = await start_server("127.0.0.1", port, UpstreamConfig(write_per_chunk=request.param))
    async with server:
        yield f"http://127.0.0.1:{port}"


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


async def test_chat_stream_is_shaped_like_vllm(base_url: str) -> None:
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    url = f"{base_url}/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=request) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.text())

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert len(tokens) == 64
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert tokens[0]["choices"][0]["delta"] == {"role": "assistant", "content": "x"}
    assert [c["choices"][0]["delta"]["content"] for c in tokens] == ["x"] * 64
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 63 + ["length"]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 64
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 64


async def test_completions_stream_honours_max_tokens_without_usage(base_url: str) -> None:
    request = {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 5}
    async with aiohttp.ClientSession() as session, session.post(f"{base_url}/v1/completions", json=request) as resp:
        events = sse_events(await resp.text())

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["x"] * 5
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)


async def test_non_streaming_answer_carries_the_whole_text_and_usage(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(f"{base_url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        body = await resp.json()

    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "x" * 64}
    assert body["usage"]["completion_tokens"] == 64


async def test_probes_and_errors(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/health") as resp:
            assert resp.status == 200
        async with session.get(f"{base_url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["m"]
        async with session.get(f"{base_url}/metrics") as resp:
            assert "vllm:num_requests_running" in await resp.text()
        async with session.post(f"{base_url}/v1/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert resp.headers["Content-Type"] == "application/json"
            assert "bad request body" in (await resp.json())["error"]["message"]
        async with session.get(f"{base_url}/nowhere") as resp:
            assert resp.status == 404
