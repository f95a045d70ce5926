"""Which models have an engine running, and who may start or stop one.

In a multi-model deployment at most `max_loaded` engines run at once (the
memory budget: MAX_LOADED_MODELS). A caller `acquire`s a model before
sending it requests and `release`s it afterwards; between the two it holds a
lease, and a model with a lease is never stopped. This module decides, and
knows nothing of processes or HTTP: a `Launcher` starts an engine and returns
its handle, which can stop it. That keeps the rules unit-testable with fake
handles and pure asyncio:

- concurrent callers of a model that is not loaded share one load, and a
  failed load answers every one of them with its sentence; a new caller
  retries it once `retry_after_s` has passed;
- when the budget is spent, the least recently used model without leases is
  stopped first; when every running model has leases, the load waits for a
  release (callers bound that wait with their own timeout);
- `evict_idle` stops models unused for `idle_ttl_s` (0: never);
- an engine that can sleep (a `Sleeper`: vLLM's sleep mode on a GPU) is put
  to sleep when evicted instead of stopped, if its weights fit the host-memory
  budget (`host_budget_bytes`, the least recently used sleepers stopped to
  make room); a sleeping model no longer counts against `max_loaded`, and the
  next caller wakes it (a wake that fails stops it and starts a new engine).

A caller's lease is taken when it calls `acquire`, so a model someone is
waiting for is never chosen for eviction between its load and their request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar, runtime_checkable

log = logging.getLogger("app.lifecycle.pool")


class EngineHandle(Protocol):
    async def stop(self) -> None: ...


@runtime_checkable
class Sleeper(Protocol):
    """A handle whose engine can park its weights in host memory and get them back."""

    can_sleep: bool
    sleep_bytes: int  # host memory its weights take while asleep

    async def stop(self) -> None: ...
    async def sleep(self) -> None: ...
    async def wake_up(self) -> None: ...


H = TypeVar("H", bound=EngineHandle)


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    SLEEPING = "sleeping"
    FAILED = "failed"


class UnknownModel(LookupError):
    def __init__(self, name: str, names: tuple[str, ...]) -> None:
        super().__init__(f"The model '{name}' does not exist; this server serves: {', '.join(names)}.")
        self.name, self.names = name, names


class LoadFailed(Exception):
    """An engine did not start; the message is the sentence its callers get."""


Launcher = Callable[[str], Awaitable[H]]


@dataclass
class ModelView:
    """One model as /v1/models, /health and the status file show it."""

    state: ModelState
    leases: int
    last_used: float | None
    error: str | None


class _Slot(Generic[H]):
    def __init__(self, name: str) -> None:
        self.name = name
        self.state = ModelState.UNLOADED
        self.handle: H | None = None
        self.leases = 0
        self.last_used: float | None = None
        self.error: str | None = None
        self.failed_at: float | None = None
        self.load: asyncio.Task[None] | None = None
        # True from the moment its engine starts until it has stopped or slept: it counts against the budget.
        self.occupies = False
        self.parked_bytes = 0  # host memory its sleeping engine's weights hold (or will, once asleep)


class EnginePool(Generic[H]):
    def __init__(
        self,
        names: tuple[str, ...],
        launcher: Launcher[H],
        *,
        max_loaded: int,
        idle_ttl_s: float = 0.0,
        host_budget_bytes: float = 0.0,
        retry_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be 1 or more")
        self._slots: dict[str, _Slot[H]] = {name: _Slot(name) for name in names}
        self._launch = launcher
        self._max_loaded = max_loaded
        self._idle_ttl_s = idle_ttl_s
        self._host_budget_bytes = host_budget_bytes
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._on_change = on_change
        self._changed = asyncio.Event()
        self._stops: set[asyncio.Task[None]] = set()
        self._waiting_room: list[_Slot[H]] = []  # loads waiting for a place, first come first served

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._slots)

    def views(self) -> dict[str, ModelView]:
        return {
            name: ModelView(slot.state, slot.leases, slot.last_used, slot.error) for name, slot in self._slots.items()
        }

    def loaded(self) -> dict[str, H]:
        """The handle of every loaded model's engine, by name."""
        return {
            name: slot.handle for name, slot in self._slots.items()
            if slot.state is ModelState.LOADED and slot.handle is not None
        }

    # --- leases -------------------------------------------------------------
    async def acquire(self, name: str) -> H:
        """The model's engine handle, loading it first if needed; the caller then holds a lease.

        Raises UnknownModel, or LoadFailed with the load's sentence. Cancelling the
        caller (its client left, its queue timeout) gives the lease back; a load
        it started goes on for the others.
        """
        slot = self._slot(name)
        slot.leases += 1
        try:
            while slot.state is not ModelState.LOADED:
                if slot.state is ModelState.FAILED and self._failed_recently(slot):
                    raise LoadFailed(slot.error)
                if slot.load is None:
                    slot.load = asyncio.create_task(self._load(slot), name=f"load {name}")
                    slot.load.add_done_callback(_retrieve)
                await asyncio.shield(slot.load)
        except BaseException:
            self._give_back(slot)
            raise
        slot.last_used = self._clock()
        assert slot.handle is not None
        return slot.handle

    def release(self, name: str) -> None:
        slot = self._slot(name)
        if slot.leases < 1:
            raise RuntimeError(f"release of '{name}' without a lease")
        slot.last_used = self._clock()
        self._give_back(slot)

    def _give_back(self, slot: _Slot[H]) -> None:
        slot.leases -= 1
        if slot.leases == 0:
            self._notify()

    # --- loading and eviction ----------------------------------------------
    async def _load(self, slot: _Slot[H]) -> None:
        slot.state, slot.error = ModelState.LOADING, None
        self._notify()
        try:
            await self._make_room(slot)
            slot.occupies = True
            try:
                handle = await self._wake(slot) or await self._launch(slot.name)
            except LoadFailed as error:
                slot.occupies = False
                slot.state, slot.error, slot.failed_at = ModelState.FAILED, str(error), self._clock()
                log.warning("model failed to load", extra={"model": slot.name, "error": slot.error})
                raise
            slot.handle, slot.state, slot.last_used = handle, ModelState.LOADED, self._clock()
            log.info("model loaded", extra={"model": slot.name})
        except asyncio.CancelledError:
            slot.occupies, slot.state = False, ModelState.UNLOADED
            raise
        finally:
            slot.load = None
            self._notify()

    async def _make_room(self, slot: _Slot[H]) -> None:
        """Wait until this model may start an engine, stopping idle ones as needed.

        Loads get the room in the order they asked for it, so a model asked for
        later never overtakes one already waiting.
        """
        self._waiting_room.append(slot)
        try:
            while True:
                # Its own previous engine may still be stopping: it counts until it is gone.
                if self._waiting_room[0] is slot and not slot.occupies:
                    occupied = sum(1 for other in self._slots.values() if other.occupies)
                    if occupied < self._max_loaded:
                        return
                    stopping = sum(1 for other in self._slots.values() if other.state is ModelState.UNLOADING)
                    for _ in range(occupied - self._max_loaded + 1 - stopping):
                        victim = self._least_recently_used_idle()
                        if victim is None:
                            break
                        log.info("evicting the least recently used model", extra={"model": victim.name, "for": slot.name})
                        self._evict(victim)
                changed = self._changed
                await changed.wait()
        finally:
            self._waiting_room.remove(slot)
            self._notify()

    async def _wake(self, slot: _Slot[H]) -> H | None:
        """The model's sleeping engine, woken; None when it has none (or it would not wake, and was stopped)."""
        handle, slot.handle = slot.handle, None
        if handle is None:
            return None
        slot.parked_bytes = 0
        try:
            assert isinstance(handle, Sleeper)
            await handle.wake_up()
        except Exception as error:  # noqa: BLE001 (any failure: a new engine is started instead)
            log.warning("a sleeping model would not wake; starting a new engine", extra={"model": slot.name,
                                                                                        "error": str(error)})
            await handle.stop()
            return None
        log.info("model woken", extra={"model": slot.name})
        return handle

    def _least_recently_used_idle(self) -> _Slot[H] | None:
        idle = [slot for slot in self._slots.values() if slot.state is ModelState.LOADED and slot.leases == 0]
        return min(idle, key=lambda slot: slot.last_used or 0.0, default=None)

    def _evict(self, slot: _Slot[H]) -> None:
        """Make `slot`'s place on the device free: its engine sleeps if it can and fits the host budget, else stops."""
        handle = slot.handle
        if not (isinstance(handle, Sleeper) and handle.can_sleep and self._park(slot, handle.sleep_bytes)):
            self._unload(slot)
            return
        slot.state = ModelState.UNLOADING
        task = asyncio.create_task(self._sleep(slot, handle), name=f"sleep {slot.name}")
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    def _park(self, slot: _Slot[H], size: int) -> bool:
        """Reserve host memory for `slot`'s sleeping weights, stopping the least recently used sleepers as needed."""
        if size > self._host_budget_bytes:
            return False
        sleepers = sorted(
            (other for other in self._slots.values() if other.state is ModelState.SLEEPING),
            key=lambda other: other.last_used or 0.0,
        )
        parked = sum(other.parked_bytes for other in self._slots.values())
        while parked + size > self._host_budget_bytes and sleepers:
            oldest = sleepers.pop(0)
            log.info("stopping a sleeping model for host memory", extra={"model": oldest.name, "for": slot.name})
            parked -= oldest.parked_bytes
            self._unload(oldest)
        if parked + size > self._host_budget_bytes:
            return False  # the rest is still on its way to sleep
        slot.parked_bytes = size
        return True

    async def _sleep(self, slot: _Slot[H], handle: Sleeper) -> None:
        try:
            await handle.sleep()
        except Exception as error:  # noqa: BLE001 (any failure: the engine is stopped instead)
            log.warning("a model would not sleep; stopping it", extra={"model": slot.name, "error": str(error)})
            await self._stop(slot)
            return
        slot.occupies = False
        slot.state = ModelState.SLEEPING
        log.info("model asleep", extra={"model": slot.name, "host_bytes": slot.parked_bytes})
        self._notify()

    def _unload(self, slot: _Slot[H]) -> None:
        slot.state = ModelState.UNLOADING
        task = asyncio.create_task(self._stop(slot), name=f"unload {slot.name}")
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _stop(self, slot: _Slot[H]) -> None:
        handle, slot.handle = slot.handle, None
        try:
            if handle is not None:
                await handle.stop()
        finally:
            slot.occupies, slot.parked_bytes = False, 0
            if slot.state is ModelState.UNLOADING:
                slot.state = ModelState.UNLOADED
            log.info("model unloaded", extra={"model": slot.name})
            self._notify()

    async def unload(self, name: str) -> None:
        """Stop `name`'s engine now (an operator's request); RuntimeError when it has requests in flight or is loading."""
        slot = self._slot(name)
        if slot.leases > 0:
            raise RuntimeError(f"The model '{name}' has requests in flight; unload it once they have finished.")
        if slot.state is ModelState.LOADING:
            raise RuntimeError(f"The model '{name}' is loading; unload it once it has loaded.")
        if slot.state in (ModelState.LOADED, ModelState.SLEEPING):
            log.info("unloading a model on request", extra={"model": name})
            self._unload(slot)
        while slot.state is ModelState.UNLOADING:
            changed = self._changed
            await changed.wait()

    def lost(self, name: str, handle: H, sentence: str) -> None:
        """The engine `handle` of `name` died by itself: the model is failed; the next caller loads it again."""
        slot = self._slot(name)
        if slot.handle is not handle or slot.state not in (ModelState.LOADED, ModelState.SLEEPING):
            return  # already being stopped, or replaced
        log.error("model engine lost", extra={"model": name, "error": sentence})
        slot.handle, slot.occupies, slot.parked_bytes = None, False, 0
        slot.state, slot.error, slot.failed_at = ModelState.FAILED, sentence, None
        self._notify()

    def evict_idle(self) -> list[str]:
        """Stop every model unused for idle_ttl_s; the names stopped."""
        if self._idle_ttl_s <= 0:
            return []
        now = self._clock()
        expired = [
            slot for slot in self._slots.values()
            if slot.state in (ModelState.LOADED, ModelState.SLEEPING) and slot.leases == 0
            and now - (slot.last_used or now) >= self._idle_ttl_s
        ]
        for slot in expired:
            log.info("unloading an idle model", extra={"model": slot.name, "idle_ttl_s": self._idle_ttl_s})
            self._unload(slot)
        return [slot.name for slot in expired]

    async def run_idle_eviction(self) -> None:
        """Call evict_idle a few times per idle_ttl_s, until cancelled."""
        if self._idle_ttl_s <= 0:
            return
        while True:
            await asyncio.sleep(max(self._idle_ttl_s / 4, 0.25))
            self.evict_idle()

    async def close(self) -> None:
        """Stop loads and every engine (at shutdown, once the wrappers have drained)."""
        loads = [slot.load for slot in self._slots.values() if slot.load is not None]
        for load in loads:
            load.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for slot in self._slots.values():
            if slot.handle is not None and slot.state is not ModelState.UNLOADING:
                self._unload(slot)
        await asyncio.gather(*self._stops, return_exceptions=True)

    # --- helpers --------------------------------------------------------------
    def _slot(self, name: str) -> _Slot[H]:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownModel(name, self.names)
        return slot

    def _failed_recently(self, slot: _Slot[H]) -> bool:
        return slot.failed_at is not None and self._clock() - slot.failed_at < self._retry_after_s

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self._on_change is not None:
            self._on_change()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A load's failure is its callers' to report; when they all left, it is only logged above."""
    if not task.cancelled():
        task.exception()
