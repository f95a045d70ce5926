"""Backpressure: a bounded number of requests in flight, a fair queue for the rest.

RunPod's load balancer and most ingress controllers have no queue of their
own, so the wrapper decides what waits and what is turned away: at most
`MAX_CONCURRENT_REQUESTS` requests reach the engine, later ones wait in
arrival order for up to `QUEUE_TIMEOUT_S` (then 503), and when `MAX_QUEUE`
requests are already waiting a new one gets 429 at once. Both carry
`Retry-After`, so well-behaved clients back off instead of hammering.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from app.errors import APIError
from app.observability import metrics


class Admission:
    def __init__(self, limit: int, max_queue: int, queue_timeout_s: float) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Take a slot; returns the seconds spent waiting, or raises 429/503."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return 0.0
        if self.max_queue and len(self._waiters) >= self.max_queue:
            raise APIError(
                429,
                f"Server is at capacity: {self.limit} requests in flight and {len(self._waiters)} waiting "
                f"(MAX_QUEUE={self.max_queue}). Retry later.",
                code="queue_full",
                cause="rejected",
                headers={"Retry-After": "1"},
            )
        started = time.perf_counter()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        metrics.queue_entered()
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # a slot was handed over just as we gave up: pass it on
            if not isinstance(error, TimeoutError):
                raise
            raise APIError(
                503,
                f"Request waited {self.queue_timeout_s:g}s for a free slot (QUEUE_TIMEOUT_S) and timed out. Retry later.",
                code="queue_timeout",
                cause="rejected",
                headers={"Retry-After": str(max(1, round(self.queue_timeout_s / 2)))},
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            metrics.queue_left(time.perf_counter() - started)
        return time.perf_counter() - started

    def reject_waiting(self, error: Callable[[], APIError]) -> int:
        """Fail every waiting request with a new `error()` (the drain deadline); returns how many."""
        rejected = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())
                rejected += 1
        return rejected

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the oldest waiter
                return
        self.in_flight -= 1
