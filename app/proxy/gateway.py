"""Engine slots and the drain: one owner for both.

Every request that makes the engine work (`/v1` inference routes, `/generate`)
holds a slot from `Gateway.enter()` to `Gateway.leave()` for its whole life: from before its body
is read until its last byte is sent. So the slots bound everything costly a
request does (its body in memory, JSON parsing, media fetches and decoding,
the engine's work), and the drain knows exactly what is still running.

The drain (`begin_drain` from the signal handler, then `drain`): new requests
get 503 `draining` at once; admitted and queued requests get `DRAIN_TIMEOUT_S`
to finish; at the deadline the waiting ones get 503 and the open engine
exchanges are ended by the `abort` the caller passes (an error event for
streams), and they get a short grace to send it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app.config import Settings
from app.errors import APIError, unavailable
from app.observability import metrics
from app.observability.record import RequestRecord
from app.proxy.admission import Admission

log = logging.getLogger("app.serve")
DRAIN_POLL_S = 0.05
ABORT_GRACE_S = 2.0


def per_worker(total: int, workers: int) -> int:
    """A share of a server-wide limit: the kernel spreads connections evenly over
    the workers (SO_REUSEPORT), so each enforces its part; 0 stays "no limit"."""
    return 0 if total == 0 else max(1, -(-total // workers))


def draining_error() -> APIError:
    return unavailable("Server is shutting down; retry on another replica.", code="draining")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self._admission = Admission(
            per_worker(settings.MAX_CONCURRENT_REQUESTS, settings.WORKERS),
            per_worker(settings.MAX_QUEUE, settings.WORKERS),
            settings.QUEUE_TIMEOUT_S,
        )
        self._drain_timeout_s = settings.DRAIN_TIMEOUT_S
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def busy(self) -> int:
        """Requests holding or waiting for a slot."""
        return self._admission.in_flight + self._admission.queued

    async def enter(self, record: RequestRecord) -> None:
        """Take an engine slot, after waiting in line for it; 503 while draining, 429/503 when full.

        Whoever entered must `leave()` (in a `finally`).
        """
        if self._draining:
            raise draining_error()
        record.queue_wait_s = await self._admission.acquire()
        metrics.request_started()

    def leave(self) -> None:
        metrics.request_finished()
        self._admission.release()

    def begin_drain(self) -> None:
        """Refuse new requests from now on; safe to call from a signal handler."""
        self._draining = True

    async def drain(self, abort: Callable[[], int]) -> None:
        """Wait for admitted and queued requests, up to DRAIN_TIMEOUT_S; then end them with `abort`."""
        self.begin_drain()
        log.info("draining", extra={"in_flight": self.busy, "drain_timeout_s": self._drain_timeout_s})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout_s
        while self.busy and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if not self.busy:
            return
        refused = self._admission.reject_waiting(draining_error)
        aborted = abort()
        log.warning("drain deadline reached", extra={"unfinished_requests": aborted, "refused_waiting": refused})
        deadline = loop.time() + ABORT_GRACE_S
        while self._admission.in_flight and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
