"""Backpressure: bounded concurrency, FIFO waiting, 429 and 503 with Retry-After."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import APIError
from app.proxy.admission import Admission


async def test_waiters_are_served_in_arrival_order() -> None:
    admission = Admission(limit=1, max_queue=0, queue_timeout_s=5)
    await admission.acquire()
    order: list[int] = []

    async def request(index: int) -> None:
        await admission.acquire()
        order.append(index)
        await asyncio.sleep(0.01)
        admission.release()

    tasks = []
    for index in range(5):
        tasks.append(asyncio.ensure_future(request(index)))
        await asyncio.sleep(0)  # arrival order
    assert admission.queued == 5
    admission.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert admission.in_flight == 0 and admission.queued == 0


async def test_full_queue_is_rejected_at_once_with_429() -> None:
    admission = Admission(limit=1, max_queue=1, queue_timeout_s=5)
    await admission.acquire()
    waiting = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    with pytest.raises(APIError) as raised:
        await admission.acquire()
    assert raised.value.status == 429 and raised.value.headers["Retry-After"]
    admission.release()
    await waiting
    admission.release()
    assert admission.in_flight == 0


async def test_queue_timeout_is_a_503_with_retry_after() -> None:
    admission = Admission(limit=1, max_queue=0, queue_timeout_s=0.05)
    await admission.acquire()
    with pytest.raises(APIError) as raised:
        await admission.acquire()
    assert raised.value.status == 503 and raised.value.headers["Retry-After"]
    assert admission.queued == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    admission = Admission(limit=1, max_queue=0, queue_timeout_s=5)
    await admission.acquire()
    waiter = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    admission.release()  # hands the slot to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert admission.in_flight == 0
    assert await admission.acquire() == 0.0
