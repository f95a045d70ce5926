"""A deadline that moves on every request but rarely fires: one timer per connection, re-armed lazily.

Each request on a keep-alive connection used to move its deadlines by
cancelling a timer and starting another (a TimerHandle, a libuv timer, a heap
insert and a removal): the client connection's header and keep-alive
deadlines and the engine exchange's, together about 7% of a non-streamed
request's CPU in the profile. Here a deadline is a float: setting or clearing
it is an assignment. The one armed timer, when it fires, acts if the
deadline has passed, re-arms for a deadline that moved later, or lapses if
none is set. A deadline set earlier than the armed timer re-arms it at once,
so none fires late.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LazyTimer:
    __slots__ = ("_action", "_at", "_loop", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._at: float | None = None  # the deadline (loop time), None when none is set
        self._action: Callable[[], object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @property
    def pending(self) -> bool:
        return self._at is not None

    def set(self, at: float, action: Callable[[], object]) -> None:
        """Call `action` at loop time `at`, unless the deadline is set again or cleared before."""
        self._at, self._action = at, action
        if self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)

    def clear(self) -> None:
        self._at = self._action = None

    def cancel(self) -> None:
        """Clear, and stop the timer too (the connection is closed: nothing may hold it)."""
        self.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        at, action = self._at, self._action
        if at is None or action is None:
            return
        if self._loop.time() >= at:
            self.clear()
            action()
        else:
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)
