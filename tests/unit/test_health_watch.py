"""The health watchdog's rules: silence for the limit is death, a slow answer is not, 0 turns it off.

The engine's /health is played by a small aiohttp server on 127.0.0.1: the real
engine cannot be made to answer slowly, or with 503, on cue. The real engine
stopped with SIGSTOP is tested end to end in tests/e2e/test_resilience.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from app.lifecycle.health_watch import wait_until_silent

# Generous bound for a watchdog that should fire: the limit plus a loaded machine.
FIRES_WITHIN_S = 60.0


@dataclass
class EngineHealth:
    """What the stand-in /health does: its status, a delay, or no answer at all."""

    status: int = 200
    delay_s: float = 0.0
    hang: bool = False
    received: int = 0
    answered: int = 0
    url: str = ""
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, _: web.Request) -> web.Response:
        self.received += 1
        if self.hang:
            await self.released.wait()
        await asyncio.sleep(self.delay_s)
        self.answered += 1
        return web.Response(status=self.status)

    async def wait_for_answers(self, count: int) -> None:
        while self.answered < count:
            await asyncio.sleep(0.05)


@pytest.fixture
async def engine() -> AsyncIterator[EngineHealth]:
    health = EngineHealth()
    app = web.Application()
    app.router.add_get("/health", health.handle)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    health.url = f"http://127.0.0.1:{port}/health"
    yield health
    health.released.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.mark.parametrize("failure", ["hangs", "answers 503"])
async def test_an_engine_silent_for_the_limit_is_reported(
    engine: EngineHealth, session: aiohttp.ClientSession, failure: str
) -> None:
    engine.hang, engine.status = failure == "hangs", 503 if failure == "answers 503" else 200
    silent_s = await asyncio.wait_for(wait_until_silent(session, engine.url, 1.0), FIRES_WITHIN_S)
    assert silent_s >= 1.0


async def test_an_engine_that_stops_answering_later_is_reported(
    engine: EngineHealth, session: aiohttp.ClientSession
) -> None:
    watch = asyncio.ensure_future(wait_until_silent(session, engine.url, 1.0))
    await engine.wait_for_answers(3)
    engine.hang = True
    assert await asyncio.wait_for(watch, FIRES_WITHIN_S) >= 1.0


async def test_slow_answers_within_the_limit_keep_the_engine(
    engine: EngineHealth, session: aiohttp.ClientSession
) -> None:
    # Each answer takes half the limit: a check with a short fixed timeout would call that silence.
    engine.delay_s = 1.5
    watch = asyncio.ensure_future(wait_until_silent(session, engine.url, 3.0))
    await asyncio.wait_for(engine.wait_for_answers(4), FIRES_WITHIN_S)
    assert not watch.done()
    watch.cancel()


async def test_zero_turns_the_watchdog_off(engine: EngineHealth, session: aiohttp.ClientSession) -> None:
    watch = asyncio.ensure_future(wait_until_silent(session, engine.url, 0))
    await asyncio.sleep(1.0)
    assert not watch.done() and engine.received == 0
    watch.cancel()
