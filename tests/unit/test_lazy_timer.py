"""`LazyTimer`: a deadline that moves on every request fires once, when it has passed, never early or late.

The loop is real (asyncio's): what is checked is when the action ran, in loop
time, against the deadline last set, with generous margins for a busy machine
only on the side of "not before".
"""

from __future__ import annotations

import asyncio

from app.lazy_timer import LazyTimer


async def test_a_deadline_moved_later_fires_once_at_the_last_one() -> None:
    loop = asyncio.get_running_loop()
    timer = LazyTimer(loop)
    fired: list[float] = []
    start = loop.time()
    for step in range(5):  # as requests on one connection move it, each later than the one before
        timer.set(start + 0.05 + step * 0.02, lambda: fired.append(loop.time()))
        await asyncio.sleep(0.02)
    last = start + 0.05 + 4 * 0.02
    async with asyncio.timeout(30):
        while not fired:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(fired) == 1
    assert fired[0] >= last
    assert not timer.pending


async def test_a_cleared_deadline_never_fires_and_an_earlier_one_is_not_late() -> None:
    loop = asyncio.get_running_loop()
    timer = LazyTimer(loop)
    fired: list[str] = []
    timer.set(loop.time() + 0.05, lambda: fired.append("cleared"))
    timer.clear()
    await asyncio.sleep(0.1)
    assert fired == []

    timer.set(loop.time() + 3600, lambda: fired.append("late"))
    soon = loop.time() + 0.05
    timer.set(soon, lambda: fired.append("soon"))  # earlier than the armed timer: re-armed for it
    async with asyncio.timeout(30):
        while not fired:
            await asyncio.sleep(0.01)
    assert fired == ["soon"]


async def test_cancel_stops_the_timer() -> None:
    loop = asyncio.get_running_loop()
    timer = LazyTimer(loop)
    fired: list[int] = []
    timer.set(loop.time() + 0.02, lambda: fired.append(1))
    timer.cancel()
    await asyncio.sleep(0.1)
    assert fired == [] and not timer.pending
