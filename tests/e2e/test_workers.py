"""Several wrapper workers on one port: metrics and backpressure stay server-wide.

With `WORKERS=2` the supervisor starts two wrapper processes that share PORT
(SO_REUSEPORT). Whichever worker answers a scrape, `/metrics` counts every
request served by either, and the concurrency limit is split between them.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import TEXT_MODEL
from tests.stack import Stack


def sample_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_two_workers_count_every_request_in_one_scrape(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, WORKERS="2", MAX_CONCURRENT_REQUESTS="2",
                      MAX_QUEUE="1", QUEUE_TIMEOUT_S="30")
    servers = [p for p in gateway.descendants() if "app.serve" in " ".join(p.cmdline())]
    assert len(servers) == 2
    body = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:
        # One connection per request, so the kernel spreads them over both workers.
        statuses = []
        for _ in range(40):
            response = await client.post("/v1/chat/completions", json=body, headers={"Connection": "close"})
            statuses.append(response.status_code)
    assert statuses == [200] * 40
    for _ in range(5):  # every worker's scrape sees the same totals
        text = httpx.get(f"{gateway.base_url}/metrics", headers={"Connection": "close"}).text
        assert sample_sum(text, "vllm_api_requests_total", route="/v1/chat/completions", status="200") == 40


async def test_backpressure_limit_is_shared_between_workers(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, WORKERS="2", MAX_CONCURRENT_REQUESTS="2",
                      MAX_QUEUE="2", QUEUE_TIMEOUT_S="30")
    body = {"model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
            "min_tokens": 300, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120,
                                 limits=httpx.Limits(max_keepalive_connections=0)) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(12)))
    statuses = Counter(response.status_code for response in responses)
    # Two slots and two queue places server-wide: at most 4 of 12 are served, the rest get 429.
    assert statuses[200] <= 4 and statuses[200] >= 1, statuses
    assert statuses[200] + statuses[429] == 12, statuses
