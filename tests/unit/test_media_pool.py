"""Media work is bounded: a decode pool sized from the cores, capped fetches per request and per host.

A flood of media requests must not take every thread or every fetch
connection. These tests drive many requests at once and watch what runs
concurrently: decodes (by wrapping the image check), fetches (the local
media server counts the requests it is answering).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import app.media.checks
from app.config import load_settings
from app.media import MediaFetcher, MediaPolicy, prepare_media
from app.media.images import CheckedImage, check_image
from app.media.pool import FETCH_CONNECTIONS_PER_HOST, FETCHES_PER_REQUEST, MEDIA_WORKERS
from tests.media_server import MediaServer, StaticResolver, sample_image

PNG = sample_image("PNG", (40, 30))
SLOW_HOST, OTHER_HOST = "slow.example.test", "other.example.test"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def policy(images: int) -> MediaPolicy:
    base = MediaPolicy.from_settings(
        load_settings({"IMAGE_LIMIT": str(images), "MEDIA_FETCH_TIMEOUT_S": "60"}), frozenset({"text", "image"})
    )
    trusted = frozenset({(SLOW_HOST, LOOPBACK), (OTHER_HOST, LOOPBACK)})
    return dataclasses.replace(base, urls=dataclasses.replace(base.urls, trusted_addresses=trusted))


def chat(*urls: str) -> dict[str, Any]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"messages": [{"role": "user", "content": parts}]}


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MediaServer]:
    async with MediaServer() as media_server:
        yield media_server


@pytest_asyncio.fixture
async def fetcher() -> AsyncIterator[MediaFetcher]:
    dns = StaticResolver({SLOW_HOST: [["127.0.0.1"]], OTHER_HOST: [["127.0.0.1"]]})
    async with MediaFetcher(policy(1).urls, resolver=dns) as media_fetcher:
        yield media_fetcher


def test_the_pool_is_sized_from_the_cores() -> None:
    assert 1 <= MEDIA_WORKERS <= 8


async def test_decoding_runs_on_the_bounded_pool(monkeypatch: pytest.MonkeyPatch, fetcher: MediaFetcher) -> None:
    running, most, threads = 0, 0, set()
    lock = threading.Lock()

    def watched_check(data: bytes, **limits: Any) -> CheckedImage:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        try:
            time.sleep(0.02)  # long enough for the other requests' work to pile up
            return check_image(data, **limits)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(app.media.checks, "check_image", watched_check)
    url = f"data:image/png;base64,{base64.b64encode(PNG).decode()}"
    requests = [prepare_media("/v1/chat/completions", chat(url, url), policy(2), fetcher) for _ in range(8)]
    counts = await asyncio.gather(*requests)

    assert [c.image for c in counts] == [2] * 8
    assert 1 <= most <= MEDIA_WORKERS
    assert all(name.startswith("media") for name in threads), threads


async def test_one_request_fetches_at_most_four_urls_at_a_time(server: MediaServer, fetcher: MediaFetcher) -> None:
    open_gate = asyncio.Event()
    open_gate.set()
    for index in range(6):
        server.add_gated(f"/{index}.png", PNG, "image/png", open_gate, delay_s=0.1)
    body = chat(*(server.url(f"/{index}.png", SLOW_HOST) for index in range(6)))
    counts = await prepare_media("/v1/chat/completions", body, policy(6), fetcher)
    assert counts.image == 6 and len(server.requests) == 6
    assert server.max_in_flight <= FETCHES_PER_REQUEST


async def test_a_slow_host_holds_a_few_connections_and_other_hosts_are_served(
    server: MediaServer, fetcher: MediaFetcher
) -> None:
    gate = asyncio.Event()
    for index in range(8):
        server.add_gated(f"/slow/{index}.png", PNG, "image/png", gate)
    server.add_file("/fast.png", PNG, "image/png")
    stuck = [
        asyncio.create_task(
            prepare_media(
                "/v1/chat/completions",
                chat(*(server.url(f"/slow/{index}.png", SLOW_HOST) for index in range(start, start + 4))),
                policy(4),
                fetcher,
            )
        )
        for start in (0, 4)
    ]
    # Eight fetches wait on the slow host; it gets only its share of connections.
    while server.in_flight < FETCH_CONNECTIONS_PER_HOST:
        await asyncio.sleep(0.01)
    # Another client's image on another host is fetched while the slow host holds its connections.
    counts = await asyncio.wait_for(
        prepare_media("/v1/chat/completions", chat(server.url("/fast.png", OTHER_HOST)), policy(1), fetcher), 30
    )
    assert counts.image == 1
    # The other four fetches of the slow host still wait for a connection in the wrapper.
    assert server.in_flight == FETCH_CONNECTIONS_PER_HOST
    assert len([r for r in server.requests if r.path.startswith("/slow/")]) == FETCH_CONNECTIONS_PER_HOST
    gate.set()
    assert [c.image for c in await asyncio.gather(*stuck)] == [4, 4]
