"""The /v1 proxy run in-process under uvicorn, in front of an upstream started by the test.

These tests look inside the wrapper's process while requests go through:
what the garbage collector finds, and what the proxy's own HTTP client keeps
between requests. The upstream is a small aiohttp server here (or the
benchmark's fake engine), because the properties concern the proxy alone.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from aiohttp import web

from bench.fake_upstream import UpstreamConfig, start_server
from tests.inprocess import running_wrapper
from tests.unit.test_bench_loadgen import free_port

SERVER_PACKAGES = {"app", "uvicorn", "aiohttp", "starlette", "fastapi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@asynccontextmanager
async def serving_wrapper(engine_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The wrapper in-process with ENGINE_URL=`engine_url`, and a client for it."""
    async with running_wrapper(engine_url, SERVED_MODEL_NAME="m") as wrapper, wrapper.client(timeout=10) as client:
        yield client


def server_garbage() -> Counter[str]:
    """Types of the wrapper's objects the collector found unreachable."""
    kinds = (type(item) for item in gc.garbage)
    return Counter(
        f"{kind.__module__}.{kind.__qualname__}" for kind in kinds
        if kind.__module__.partition(".")[0] in SERVER_PACKAGES
    )


async def test_requests_leave_no_reference_cycles() -> None:
    """Objects in a reference cycle wait for the cyclic collector, whose scans cost the proxy a tenth of its CPU."""
    upstream_port = free_port()
    upstream = await start_server("127.0.0.1", upstream_port, UpstreamConfig())
    async with upstream, serving_wrapper(f"http://127.0.0.1:{upstream_port}") as client:

        async def exchange() -> None:
            reply = await client.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 16
            streamed = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
            for probe in ("/ping", "/health", "/metrics"):
                assert (await client.get(probe)).status_code == 200

        await exchange()  # connections, lazy imports and caches that live on
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(5):
                await exchange()
            gc.collect()
            garbage = server_garbage()
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert not garbage, f"requests left reference cycles: {garbage.most_common(10)}"


async def test_a_cookie_the_engine_sets_reaches_its_client_only() -> None:
    cookies_seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        response = web.json_response({"object": "chat.completion", "choices": []})
        response.set_cookie("session", f"client-{len(cookies_seen)}")
        return response

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    upstream = web.Application()
    upstream.router.add_get("/health", health)
    upstream.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(upstream)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    try:
        # By a host name: aiohttp's default cookie jar ignores cookies from IP addresses.
        async with serving_wrapper(f"http://localhost:{upstream_port}") as client:
            first = await client.post("/v1/chat/completions", json=CHAT)
            client.cookies.clear()  # the next request comes from another client
            second = await client.post("/v1/chat/completions", json=CHAT)
    finally:
        await runner.cleanup()
    assert first.status_code == second.status_code == 200
    assert first.cookies["session"] == "client-1" and second.cookies["session"] == "client-2"
    assert cookies_seen == [None, None]
