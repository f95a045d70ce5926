"""An engine that stops answering its health check is as dead as one that exited.

A deadlocked or stopped engine keeps its process and its port: the supervisor,
which otherwise only waits for the engine's exit, would keep it forever while
every request times out. While the engine serves, the supervisor asks its
`/health` again and again; once no answer has succeeded for
ENGINE_HEALTH_TIMEOUT_S, `wait_until_silent` returns and the supervisor treats
the engine as crashed.

A slow answer is still an answer: each check may take all the time left before
the limit, so an engine whose event loop is busy for a while (a huge prompt to
tokenize, images to decode, a starved CPU) is not killed for it.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

# Longest pause between two checks; shorter limits check more often.
CHECK_INTERVAL_S = 5.0
CHECKS_PER_LIMIT = 5
# The shortest time one check may take, however close the limit is.
MIN_CHECK_TIMEOUT_S = 1.0


async def wait_until_silent(session: aiohttp.ClientSession, health_url: str, limit_s: float) -> float:
    """Return the seconds without a successful check once they reach `limit_s`; never returns when `limit_s` is 0."""
    if limit_s <= 0:
        await asyncio.Event().wait()
    interval = min(CHECK_INTERVAL_S, limit_s / CHECKS_PER_LIMIT)
    last_ok = time.monotonic()
    while True:
        remaining = last_ok + limit_s - time.monotonic()
        answered = await _answers(session, health_url, max(remaining, MIN_CHECK_TIMEOUT_S))
        now = time.monotonic()
        if answered:
            last_ok = now
        elif now - last_ok >= limit_s:
            return now - last_ok
        await asyncio.sleep(min(interval, max(0.0, last_ok + limit_s - now)))


async def _answers(session: aiohttp.ClientSession, url: str, timeout_s: float) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            return response.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
