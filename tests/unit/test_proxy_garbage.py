"""A relayed request or a probe leaves nothing for the garbage collector.

Objects caught in a reference cycle outlive their request until the cyclic
collector finds them, and scanning for them cost the proxy a tenth of its CPU
under load. The wrapper's app runs here in-process under uvicorn, in front of
the benchmark's fake upstream, and the collector's finds are kept
(`gc.DEBUG_SAVEALL`) while streaming and non-streaming requests go through.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from bench.fake_upstream import UpstreamConfig, start_server
from tests.unit.test_bench_loadgen import free_port

SERVER_PACKAGES = {"app", "uvicorn", "aiohttp", "starlette", "fastapi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@pytest.fixture
async def wrapper_url() -> AsyncIterator[str]:
    upstream_port = free_port()
    upstream = await start_server("127.0.0.1", upstream_port, UpstreamConfig())
    port = free_port()
    settings = Settings(ENGINE_URL=f"http://127.0.0.1:{upstream_port}", SERVED_MODEL_NAME="m")
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    async with upstream:
        while not server.started:
            assert not serving.done(), "the wrapper did not start"
            await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await serving


def server_garbage() -> Counter[str]:
    """Types of the wrapper's objects the collector found unreachable."""
    kinds = (type(item) for item in gc.garbage)
    return Counter(
        f"{kind.__module__}.{kind.__qualname__}" for kind in kinds
        if kind.__module__.partition(".")[0] in SERVER_PACKAGES
    )


async def test_requests_leave_no_reference_cycles(wrapper_url: str) -> None:
    async with httpx.AsyncClient(base_url=wrapper_url, timeout=10) as client:

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
