"""The engine pool's rules: shared loads, failures, the budget, LRU eviction, leases, idle TTL.

Engines are stand-ins (`FakeHandle`, `FakeLauncher`): the pool only decides when to start and stop
them, so pure asyncio with gates the test opens proves the rules without starting any process.
"""

from __future__ import annotations

import asyncio

import pytest

from app.lifecycle.engine_pool import EnginePool, LoadFailed, ModelState, UnknownModel


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    """Stands in for a running engine process: records its stop, which a test can hold open."""

    def __init__(self, name: str, launcher: FakeLauncher) -> None:
        self.name = name
        self.launcher = launcher
        self.stopped = False

    async def stop(self) -> None:
        await self.launcher.stop_gate.wait()
        self.stopped = True
        self.launcher.running.discard(self)


class FakeLauncher:
    """Stands in for starting an engine: a load waits for its model's gate; a model in `failing` fails."""

    def __init__(self) -> None:
        self.launches: list[str] = []
        self.running: set[FakeHandle] = set()
        self.most_running = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.failing: dict[str, str] = {}
        self.stop_gate = asyncio.Event()
        self.stop_gate.set()

    def hold(self, name: str) -> asyncio.Event:
        self.gates[name] = asyncio.Event()
        return self.gates[name]

    async def __call__(self, name: str) -> FakeHandle:
        self.launches.append(name)
        if name in self.gates:
            await self.gates[name].wait()
        if name in self.failing:
            raise LoadFailed(self.failing[name])
        handle = FakeHandle(name, self)
        self.running.add(handle)
        self.most_running = max(self.most_running, len(self.running))
        return handle

    def running_names(self) -> set[str]:
        return {handle.name for handle in self.running}


async def settle() -> None:
    """Let every task that can run, run (no real time passes: all waits here are on events)."""
    for _ in range(50):
        await asyncio.sleep(0)


def make_pool(launcher: FakeLauncher, clock: Clock | None = None, **options: float) -> EnginePool[FakeHandle]:
    options.setdefault("max_loaded", 1)
    return EnginePool(("a", "b", "c"), launcher, clock=clock or Clock(), **options)  # type: ignore[arg-type]


def states(pool: EnginePool[FakeHandle]) -> dict[str, str]:
    return {name: view.state.value for name, view in pool.views().items()}


async def test_a_model_loads_on_first_use_and_stays_loaded() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    assert states(pool) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
    gate = launcher.hold("a")

    first = asyncio.create_task(pool.acquire("a"))
    await settle()
    assert states(pool)["a"] == "loading"
    gate.set()
    handle = await first
    pool.release("a")
    again = await pool.acquire("a")

    assert again is handle and launcher.launches == ["a"]
    assert pool.views()["a"].state is ModelState.LOADED and pool.views()["a"].leases == 1


async def test_concurrent_callers_share_one_load() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    gate = launcher.hold("a")

    callers = [asyncio.create_task(pool.acquire("a")) for _ in range(5)]
    await settle()
    gate.set()
    handles = await asyncio.gather(*callers)

    assert launcher.launches == ["a"]
    assert len({id(handle) for handle in handles}) == 1
    assert pool.views()["a"].leases == 5


async def test_a_failed_load_answers_every_waiter_and_leaves_other_models_serving() -> None:
    launcher = FakeLauncher()
    clock = Clock()
    pool = make_pool(launcher, clock, max_loaded=2)
    await pool.acquire("b")
    launcher.failing["a"] = "The engine ran out of memory."
    gate = launcher.hold("a")

    waiters = [asyncio.create_task(pool.acquire("a")) for _ in range(3)]
    await settle()
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)

    assert [str(result) for result in results] == ["The engine ran out of memory."] * 3
    assert all(isinstance(result, LoadFailed) for result in results)
    view = pool.views()["a"]
    assert (view.state, view.error, view.leases) == (ModelState.FAILED, "The engine ran out of memory.", 0)
    assert states(pool)["b"] == "loaded" and launcher.running_names() == {"b"}

    # Right after, a new caller gets the same sentence without another attempt; later it retries.
    with pytest.raises(LoadFailed, match="ran out of memory"):
        await pool.acquire("a")
    assert launcher.launches.count("a") == 1
    del launcher.failing["a"]
    clock.now += 31
    await pool.acquire("a")
    assert launcher.launches.count("a") == 2 and states(pool)["a"] == "loaded"


async def test_at_the_budget_the_least_recently_used_idle_model_is_stopped_first() -> None:
    launcher = FakeLauncher()
    clock = Clock()
    pool = make_pool(launcher, clock, max_loaded=2)
    for name in ("a", "b", "a"):  # b is now the least recently used
        await pool.acquire(name)
        clock.now += 1
        pool.release(name)

    await pool.acquire("c")

    assert states(pool) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
    assert launcher.running_names() == {"a", "c"}
    assert launcher.most_running == 2


async def test_a_model_with_requests_in_flight_is_never_evicted_the_load_waits() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    await pool.acquire("a")  # a request in flight on a

    for_b = asyncio.create_task(pool.acquire("b"))
    await settle()
    assert not for_b.done()
    assert states(pool) == {"a": "loaded", "b": "loading", "c": "unloaded"}
    assert launcher.running_names() == {"a"}

    pool.release("a")
    await for_b
    assert states(pool)["a"] == "unloaded" and launcher.running_names() == {"b"}


async def test_the_next_engine_starts_only_once_the_evicted_one_has_stopped() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    await pool.acquire("a")
    pool.release("a")
    launcher.stop_gate.clear()  # a's engine takes its time to stop

    for_b = asyncio.create_task(pool.acquire("b"))
    await settle()
    assert states(pool)["a"] == "unloading" and launcher.launches == ["a"]

    launcher.stop_gate.set()
    await for_b
    assert launcher.launches == ["a", "b"] and launcher.most_running == 1


async def test_a_caller_for_a_model_being_unloaded_waits_and_reloads_it() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    await pool.acquire("a")
    pool.release("a")
    launcher.stop_gate.clear()
    for_b = asyncio.create_task(pool.acquire("b"))
    await settle()

    for_a = asyncio.create_task(pool.acquire("a"))
    launcher.stop_gate.set()
    await for_b
    assert not for_a.done()  # b holds the only place, with a lease
    pool.release("b")
    await for_a
    assert launcher.launches == ["a", "b", "a"] and launcher.most_running == 1


async def test_a_caller_that_gives_up_returns_its_lease_and_the_load_goes_on() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    gate = launcher.hold("a")
    impatient = asyncio.create_task(pool.acquire("a"))
    patient = asyncio.create_task(pool.acquire("a"))
    await settle()

    impatient.cancel()
    await asyncio.gather(impatient, return_exceptions=True)
    assert pool.views()["a"].leases == 1
    gate.set()
    await patient
    assert pool.views()["a"].leases == 1 and launcher.launches == ["a"]


async def test_idle_models_are_unloaded_after_the_ttl_and_reload_on_the_next_request() -> None:
    launcher = FakeLauncher()
    clock = Clock()
    pool = make_pool(launcher, clock, max_loaded=2, idle_ttl_s=60)
    await pool.acquire("a")
    pool.release("a")
    await pool.acquire("b")  # still in use when its TTL would run out

    clock.now += 59
    assert pool.evict_idle() == []
    clock.now += 1
    assert pool.evict_idle() == ["a"]
    await settle()
    assert states(pool) == {"a": "unloaded", "b": "loaded", "c": "unloaded"}
    assert launcher.running_names() == {"b"}

    await pool.acquire("a")
    assert launcher.launches == ["a", "b", "a"]


async def test_no_ttl_means_models_stay_loaded() -> None:
    launcher = FakeLauncher()
    clock = Clock()
    pool = make_pool(launcher, clock)
    await pool.acquire("a")
    pool.release("a")
    clock.now += 10**6
    assert pool.evict_idle() == [] and states(pool)["a"] == "loaded"


async def test_an_unknown_model_names_the_ones_served() -> None:
    pool = make_pool(FakeLauncher())
    with pytest.raises(UnknownModel, match="The model 'gpt-4' does not exist; this server serves: a, b, c."):
        await pool.acquire("gpt-4")


async def test_close_stops_every_engine_and_pending_load() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher, max_loaded=2)
    await pool.acquire("a")
    launcher.hold("b")
    waiting = asyncio.create_task(pool.acquire("b"))
    await settle()

    await pool.close()

    assert launcher.running_names() == set()
    assert states(pool) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()


async def test_release_without_a_lease_is_a_bug() -> None:
    pool = make_pool(FakeLauncher())
    with pytest.raises(RuntimeError):
        pool.release("a")


async def test_loads_waiting_for_a_place_get_it_in_the_order_they_asked() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher)
    await pool.acquire("a")
    for_b = asyncio.create_task(pool.acquire("b"))
    await settle()
    for_c = asyncio.create_task(pool.acquire("c"))
    await settle()

    pool.release("a")
    await for_b
    await settle()
    assert not for_c.done() and launcher.launches == ["a", "b"]
    pool.release("b")
    await for_c
    assert launcher.launches == ["a", "b", "c"] and launcher.most_running == 1


async def test_an_engine_that_dies_marks_its_model_failed_and_the_next_caller_reloads_it() -> None:
    launcher = FakeLauncher()
    changes: list[dict[str, str]] = []
    pool: EnginePool[FakeHandle] = EnginePool(
        ("a", "b"), launcher, max_loaded=1, clock=Clock(), on_change=lambda: changes.append(states(pool))  # type: ignore[arg-type]
    )
    handle = await pool.acquire("a")
    pool.release("a")
    launcher.running.discard(handle)

    pool.lost("a", handle, "Engine exited with code 1 while serving.")

    view = pool.views()["a"]
    assert (view.state, view.error) == (ModelState.FAILED, "Engine exited with code 1 while serving.")
    assert {"a": "loading", "b": "unloaded"} in changes and changes[-1]["a"] == "failed"
    again = await pool.acquire("a")
    assert again is not handle and launcher.launches == ["a", "a"] and launcher.most_running == 1


async def test_an_operator_unloads_only_a_model_without_requests_in_flight() -> None:
    launcher = FakeLauncher()
    pool = make_pool(launcher, max_loaded=2)
    await pool.acquire("a")
    with pytest.raises(RuntimeError, match="requests in flight"):
        await pool.unload("a")

    pool.release("a")
    await pool.unload("a")
    assert states(pool)["a"] == "unloaded" and launcher.running_names() == set()

    gate = launcher.hold("b")
    caller = asyncio.create_task(pool.acquire("b"))
    await settle()
    caller.cancel()  # the load goes on without anyone in flight
    await asyncio.gather(caller, return_exceptions=True)
    with pytest.raises(RuntimeError, match="is loading"):
        await pool.unload("b")
    gate.set()
    await settle()
    await pool.unload("b")
    assert states(pool)["b"] == "unloaded"


# --- sleep mode ------------------------------------------------------------------


class SleepyHandle(FakeHandle):
    """Stands in for an engine launched with vLLM's sleep mode (a GPU build): it sleeps and wakes on request."""

    can_sleep = True

    def __init__(self, name: str, launcher: FakeLauncher, sleep_bytes: int) -> None:
        super().__init__(name, launcher)
        self.sleep_bytes = sleep_bytes
        self.asleep = False
        self.sleeps = self.wakes = 0
        self.wake_error: Exception | None = None

    async def sleep(self) -> None:
        self.asleep, self.sleeps = True, self.sleeps + 1

    async def wake_up(self) -> None:
        if self.wake_error is not None:
            raise self.wake_error
        self.asleep, self.wakes = False, self.wakes + 1


class SleepyLauncher(FakeLauncher):
    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.handles: dict[str, list[SleepyHandle]] = {}

    async def __call__(self, name: str) -> SleepyHandle:
        self.launches.append(name)
        handle = SleepyHandle(name, self, self.sizes[name])
        self.running.add(handle)
        self.handles.setdefault(name, []).append(handle)
        return handle


async def use(pool: EnginePool[FakeHandle], name: str, clock: Clock) -> None:
    clock.now += 1
    await pool.acquire(name)
    pool.release(name)
    await settle()


async def test_an_evicted_engine_that_can_sleep_sleeps_and_the_next_request_wakes_it() -> None:
    launcher, clock = SleepyLauncher({"a": 10, "b": 10, "c": 10}), Clock()
    pool = make_pool(launcher, clock, host_budget_bytes=100)

    await use(pool, "a", clock)
    await use(pool, "b", clock)  # a leaves the device: asleep, its process kept
    [a] = launcher.handles["a"]
    assert states(pool) == {"a": "sleeping", "b": "loaded", "c": "unloaded"}
    assert a.asleep and not a.stopped

    await use(pool, "a", clock)  # woken, not started again; b goes to sleep in its turn

    assert launcher.launches == ["a", "b"]
    assert (a.sleeps, a.wakes, a.asleep) == (1, 1, False)
    assert states(pool) == {"a": "loaded", "b": "sleeping", "c": "unloaded"}


async def test_sleepers_stay_within_the_host_memory_budget() -> None:
    launcher, clock = SleepyLauncher({"a": 60, "b": 30, "c": 200}), Clock()
    pool = make_pool(launcher, clock, host_budget_bytes=80)

    await use(pool, "a", clock)
    await use(pool, "b", clock)  # a (60) sleeps
    await use(pool, "c", clock)  # b (30) would make 90 > 80: a, the least recently used sleeper, is stopped
    [a], [b] = launcher.handles["a"], launcher.handles["b"]
    assert a.stopped and b.asleep and not b.stopped
    assert states(pool) == {"a": "unloaded", "b": "sleeping", "c": "loaded"}

    await use(pool, "b", clock)  # c (200) is larger than the whole budget: stopped, not slept

    [c] = launcher.handles["c"]
    assert c.stopped and c.sleeps == 0
    assert states(pool) == {"a": "unloaded", "b": "loaded", "c": "unloaded"}


async def test_without_a_host_budget_or_on_an_idle_ttl_models_are_stopped() -> None:
    launcher, clock = SleepyLauncher({"a": 10, "b": 10, "c": 10}), Clock()
    pool = make_pool(launcher, clock, host_budget_bytes=0)
    await use(pool, "a", clock)
    await use(pool, "b", clock)
    assert launcher.handles["a"][0].stopped and launcher.handles["a"][0].sleeps == 0

    launcher = SleepyLauncher({"a": 10, "b": 10, "c": 10})
    budgeted = make_pool(launcher, clock, host_budget_bytes=100, idle_ttl_s=60)
    await use(budgeted, "a", clock)
    await use(budgeted, "b", clock)  # a sleeps
    clock.now += 61
    assert sorted(budgeted.evict_idle()) == ["a", "b"]  # the sleeper and the idle loaded one alike
    await settle()
    assert states(budgeted) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
    assert not launcher.running


async def test_an_engine_that_will_not_wake_is_stopped_and_started_again() -> None:
    launcher, clock = SleepyLauncher({"a": 10, "b": 10, "c": 10}), Clock()
    pool = make_pool(launcher, clock, host_budget_bytes=100)
    await use(pool, "a", clock)
    await use(pool, "b", clock)
    [first] = launcher.handles["a"]
    first.wake_error = RuntimeError("POST /wake_up answered 500")

    await use(pool, "a", clock)

    assert first.stopped and launcher.launches == ["a", "b", "a"]
    assert states(pool)["a"] == "loaded" and pool.loaded()["a"] is launcher.handles["a"][1]
