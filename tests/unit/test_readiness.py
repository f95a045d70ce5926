"""A health check that began before the engine vanished does not report it healthy afterwards.

The engine's /health is played by a small aiohttp server on 127.0.0.1 that
answers when the test lets it: the real engine cannot be held in the middle
of an answer while a relayed request sees it crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from app.readiness import Readiness

WAIT_S = 30.0


class GatedHealth:
    """/health answers 200, but only once `gate` is open."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.received = 0

    async def handle(self, _: web.Request) -> web.Response:
        self.received += 1
        await self.gate.wait()
        return web.Response(status=200)

    async def wait_for_requests(self, count: int) -> None:
        while self.received < count:
            await asyncio.sleep(0.01)


@pytest.fixture
async def engine() -> AsyncIterator[tuple[GatedHealth, str]]:
    health = GatedHealth()
    app = web.Application()
    app.router.add_get("/health", health.handle)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield health, f"http://127.0.0.1:{port}"
    health.gate.set()
    await runner.cleanup()


async def test_a_check_overtaken_by_an_engine_failure_reports_unhealthy(engine: tuple[GatedHealth, str]) -> None:
    health, url = engine
    async with aiohttp.ClientSession() as session:
        readiness = Readiness(None, url, is_draining=lambda: False)
        readiness.bind(session)
        check = asyncio.ensure_future(readiness.engine_healthy())
        await asyncio.wait_for(health.wait_for_requests(1), WAIT_S)

        readiness.mark_engine_failed()  # a relayed request saw the engine vanish meanwhile
        health.gate.set()

        assert await asyncio.wait_for(check, WAIT_S) is False
        # The next look checks again, and the engine that answers is healthy.
        assert await asyncio.wait_for(readiness.engine_healthy(), WAIT_S) is True
        assert health.received == 2
