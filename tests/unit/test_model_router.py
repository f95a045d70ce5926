"""A wrapper process's leases on models (MODELS): one per model while it has requests in flight.

The supervisor's control socket is played by `FakeControl`, a small aiohttp server on a unix socket
that records every call and can hold an acquire open: what is checked here is the wrapper's side of the
channel (how many calls, when, and the errors its callers get), not loading engines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from app.errors import APIError
from app.proxy.models import ModelRouter


class FakeControl:
    """Stands in for the supervisor's control socket (app/lifecycle/model_engines.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing: dict[str, str] = {}

    async def acquire(self, request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        self.calls.append(("acquire", model))
        await self.gate.wait()
        if model in self.failing:
            return web.json_response({"error": self.failing[model]}, status=503)
        return web.json_response({"url": f"http://engine-of-{model}"})

    async def release(self, request: web.Request) -> web.Response:
        self.calls.append(("release", (await request.json())["model"]))
        return web.json_response({})


@pytest_asyncio.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[FakeControl, ModelRouter]]:
    fake = FakeControl()
    app = web.Application()
    app.router.add_post("/acquire", fake.acquire)
    app.router.add_post("/release", fake.release)
    runner = web.AppRunner(app)
    await runner.setup()
    socket = str(tmp_path / "control.sock")
    await web.UnixSite(runner, socket).start()
    router = ModelRouter(("a", "b"), socket, wait_timeout_s=30)
    router.states = lambda: {"a": {"state": "loaded"}}
    await router.start()
    yield fake, router
    await router.close()
    await runner.cleanup()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_concurrent_requests_share_one_lease_given_back_after_the_last(
    control: tuple[FakeControl, ModelRouter],
) -> None:
    fake, router = control
    fake.gate.clear()

    async def request(hold: asyncio.Event | None = None) -> str:
        async with router.lease("a") as url:
            if hold is not None:
                await hold.wait()
            return url

    hold = asyncio.Event()
    long = asyncio.create_task(request(hold))
    short = [asyncio.create_task(request()) for _ in range(3)]
    await settle()
    fake.gate.set()
    assert await asyncio.gather(*short) == ["http://engine-of-a"] * 3
    await settle()
    assert fake.calls == [("acquire", "a")]  # the long request still holds the lease

    hold.set()
    assert await long == "http://engine-of-a"
    await settle()
    assert fake.calls == [("acquire", "a"), ("release", "a")]

    async with router.lease("a"):
        pass
    await settle()
    assert fake.calls == [("acquire", "a"), ("release", "a"), ("acquire", "a"), ("release", "a")]


async def test_a_caller_that_leaves_during_the_load_still_gives_the_lease_back(
    control: tuple[FakeControl, ModelRouter],
) -> None:
    fake, router = control
    fake.gate.clear()

    async def request() -> None:
        async with router.lease("b"):
            pass

    leaving = asyncio.create_task(request())
    await settle()
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    fake.gate.set()
    await settle()
    assert fake.calls == [("acquire", "b"), ("release", "b")]


async def test_a_failed_load_is_a_503_with_its_sentence_and_the_next_request_asks_again(
    control: tuple[FakeControl, ModelRouter],
) -> None:
    fake, router = control
    fake.failing["b"] = "Model 'b' failed to load: out of memory."

    for _ in range(2):
        with pytest.raises(APIError) as caught:
            async with router.lease("b"):
                pass
        assert (caught.value.status, caught.value.code) == (503, "model_load_failed")
        assert caught.value.message == "Model 'b' failed to load: out of memory."
    assert fake.calls == [("acquire", "b"), ("acquire", "b")]


def test_unknown_and_missing_models_are_refused_with_the_names_served() -> None:
    router = ModelRouter(("a", "b"), "/unused.sock", wait_timeout_s=30)

    with pytest.raises(APIError) as unknown:
        router.check("c")
    assert (unknown.value.status, unknown.value.code, unknown.value.param) == (404, "model_not_found", "model")
    assert unknown.value.message == "The model 'c' does not exist; this server serves: a, b."
    with pytest.raises(APIError) as missing:
        router.check(None)
    assert (missing.value.status, missing.value.code) == (400, "model_required")
    assert router.check("b") == "b"


async def test_v1_models_lists_every_model_with_its_state(control: tuple[FakeControl, ModelRouter]) -> None:
    _, router = control
    listing = json.loads(router.listing())
    assert [(entry["id"], entry["state"], entry["object"]) for entry in listing["data"]] == [
        ("a", "loaded", "model"), ("b", "unloaded", "model")
    ]
