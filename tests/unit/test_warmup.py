"""The warm-up requests: what is sent to which model, and that nothing about them can fail a start.

The engine is a small aiohttp server that answers each route with a status
the test chooses and records the bodies; that the real CPU engine's first
request after `ready` is as fast as the later ones is shown by
tests/e2e/test_coldstart.py.
"""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from app.lifecycle.warmup import IMAGE_SIDE, warm_up


class Engine:
    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.path, await request.json()))
        return web.json_response({}, status=self.statuses.get(request.path, 404))


async def serve(engine: Engine) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/{tail:.*}", engine.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    engine.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    return runner


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def run(session: aiohttp.ClientSession, statuses: dict[str, int], images: bool) -> tuple[Engine, Any]:
    engine = Engine(statuses)
    runner = await serve(engine)
    try:
        result = await warm_up(session, engine.url, "served-name", images)
    finally:
        await runner.cleanup()
    return engine, result


async def test_a_chat_model_gets_one_chat_completion(session: aiohttp.ClientSession) -> None:
    engine, result = await run(session, {"/v1/chat/completions": 200}, images=False)

    assert [path for path, _ in engine.received] == ["/v1/chat/completions"]
    body = engine.received[0][1]
    assert body["model"] == "served-name" and body["max_tokens"] <= 8
    assert result.sent == ["chat"] and result.failed == []


async def test_a_vision_model_also_gets_a_small_image(session: aiohttp.ClientSession) -> None:
    engine, result = await run(session, {"/v1/chat/completions": 200}, images=True)

    assert result.sent == ["chat", "image"]
    parts = engine.received[1][1]["messages"][0]["content"]
    url = next(part["image_url"]["url"] for part in parts if part["type"] == "image_url")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.size == (IMAGE_SIDE, IMAGE_SIDE)


async def test_a_model_without_a_chat_template_gets_a_completion_and_no_image(session: aiohttp.ClientSession) -> None:
    engine, result = await run(session, {"/v1/chat/completions": 400, "/v1/completions": 200}, images=True)

    assert [path for path, _ in engine.received] == ["/v1/chat/completions", "/v1/completions"]
    assert result.sent == ["completion"] and result.failed == ["chat: HTTP 400"]


async def test_a_pooling_model_gets_an_embedding(session: aiohttp.ClientSession) -> None:
    _, result = await run(session, {"/v1/embeddings": 200}, images=False)

    assert result.sent == ["embedding"]


async def test_an_engine_that_refuses_everything_does_not_fail_the_warm_up(session: aiohttp.ClientSession) -> None:
    _, result = await run(session, {"/v1/chat/completions": 500}, images=True)

    assert result.sent == [] and len(result.failed) == 3


async def test_an_engine_that_is_gone_does_not_fail_the_warm_up(session: aiohttp.ClientSession) -> None:
    result = await warm_up(session, "http://127.0.0.1:9", "served-name", images=False, timeout_s=5)

    assert result.sent == [] and all("Error" in reason for reason in result.failed)
