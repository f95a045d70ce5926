"""Overload, disconnects, engine death and shutdown each end in a bounded, well-formed answer.

All traffic stays on 127.0.0.1 and every loop is bounded in count and time.
Where a test needs requests to wait (in the wrapper's queue, or for the first
token), it fills every sequence slot of the engine with one direct request
(`n` = the engine's MAX_NUM_SEQS) instead of relying on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import psutil
import pytest

from tests.e2e.conftest import TEXT_MODEL
from tests.e2e.traffic import CHAT_PATH, chat_body, metric_samples, sse_data
from tests.stack import (
    Stack,
    assert_engine_stopped_early,
    engine_chats_ended,
    engine_completed,
    engine_core_held,
    engine_process,
    engine_processes,
    kill_tree,
    model_dir,
    port,
    start_stack,
    wait_until,
)

# The longest generation MAX_MODEL_LEN=2048 allows after the prompt: seconds of work on the tiny model.
LONG_TOKENS = 2000
# MAX_NUM_SEQS of `text_stack` (tests/e2e/conftest.py).
TEXT_ENGINE_MAX_NUM_SEQS = 64
WAIT_S = 60.0


JSON = {"Content-Type": "application/json"}


async def held_body(max_tokens: int, complete: asyncio.Event) -> AsyncIterator[bytes]:
    """A chat request's body sent in two parts, the second once `complete` is set.

    The wrapper admits a request (takes its engine slot) before reading its body,
    so the request holds a slot for as long as the test wants, whatever the engine's speed.
    """
    raw = json.dumps(chat_body(max_tokens, stream=False)).encode()
    yield raw[:10]
    await complete.wait()
    yield raw[10:]


async def wait_for_metric(client: httpx.AsyncClient, name: str, value: float) -> None:
    """Poll the wrapper's /metrics until `name` equals `value` (at most WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while metric_samples((await client.get("/metrics")).text)[name] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


class EngineSaturation:
    """One direct engine request with a sequence for every engine slot: later requests wait for a slot.

    The engine schedules first come, first served, so once the first chunk of this
    request arrived, anything sent later waits until the request ends or is released.
    (The engine's own /metrics answers only every few seconds while it is this busy,
    so nothing here polls it.)
    """

    def __init__(self, engine_url: str, slots: int) -> None:
        self._client = httpx.AsyncClient(base_url=engine_url, timeout=120)
        self._body = chat_body(LONG_TOKENS, stream=True) | {"n": slots}
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None

    async def start(self) -> None:
        request = self._client.build_request("POST", CHAT_PATH, json=self._body)
        self._response = await self._client.send(request, stream=True)
        assert self._response.status_code == 200
        # Keep the iterator: dropping a half-read one closes the connection, which aborts the request.
        self._chunks = self._response.aiter_raw()
        await anext(self._chunks)

    async def release(self) -> None:
        """Disconnect, which makes the engine abort every sequence and free the slots."""
        if self._response is not None:
            await self._response.aclose()
        if not self._client.is_closed:
            await self._client.aclose()


@asynccontextmanager
async def saturated_engine(engine_url: str, slots: int = TEXT_ENGINE_MAX_NUM_SEQS) -> AsyncIterator[EngineSaturation]:
    saturation = EngineSaturation(engine_url, slots)
    try:
        await saturation.start()
        yield saturation
    finally:
        await saturation.release()


# --- Backpressure ------------------------------------------------------------------


async def test_queued_requests_are_served_in_arrival_order(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(
        text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, MAX_CONCURRENT_REQUESTS="1", QUEUE_TIMEOUT_S="120",
        BODY_READ_TIMEOUT_S="120",
    )
    finished: list[int] = []
    body_complete = asyncio.Event()

    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as client:

        async def request(index: int) -> None:
            if index == 0:
                response = await client.post(CHAT_PATH, content=held_body(8, body_complete), headers=JSON)
            else:
                response = await client.post(CHAT_PATH, json=chat_body(8, stream=False))
            assert response.status_code == 200, response.text
            finished.append(index)

        # Request 0 holds the wrapper's only slot until its body is complete;
        # the next five, sent one by one, wait in the wrapper's queue.
        tasks = [asyncio.ensure_future(request(0))]
        await wait_for_metric(client, "vllm_api_requests_in_flight", 1)
        for index in range(1, 6):
            tasks.append(asyncio.ensure_future(request(index)))
            await wait_for_metric(client, "vllm_api_queue_depth", index)  # distinct arrival times
        body_complete.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        assert finished == list(range(6))
        assert metric_samples((await client.get("/metrics")).text)["vllm_api_queue_wait_seconds_count"] == 5


async def test_queue_timeout_is_503_and_full_queue_is_429(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(
        text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL,
        MAX_CONCURRENT_REQUESTS="1", MAX_QUEUE="2", QUEUE_TIMEOUT_S="3",
    )
    body_complete = asyncio.Event()
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:

        def request() -> asyncio.Future[httpx.Response]:
            return asyncio.ensure_future(client.post(CHAT_PATH, json=chat_body(4, stream=False)))

        # The admitted request holds the only slot until its body is complete, however fast the engine.
        held = asyncio.ensure_future(client.post(CHAT_PATH, content=held_body(4, body_complete), headers=JSON))
        await wait_for_metric(client, "vllm_api_requests_in_flight", 1)
        # Two requests fill the queue; the next five arrive while it is full, not after a fixed pause.
        queued = [request(), request()]
        await wait_for_metric(client, "vllm_api_queue_depth", 2)
        others = await asyncio.wait_for(asyncio.gather(*queued, *(request() for _ in range(5))), 120)
        body_complete.set()
        responses = [await asyncio.wait_for(held, 60), *others]
        metrics = (await client.get("/metrics")).text
    statuses = Counter(response.status_code for response in responses)
    assert statuses[200] == 1 and statuses[429] >= 1 and statuses[503] >= 1, statuses
    assert statuses[429] + statuses[503] == 7, statuses
    for response in responses:
        if response.status_code in (429, 503):
            assert int(response.headers["retry-after"]) >= 1
            expected = "queue_full" if response.status_code == 429 else "queue_timeout"
            assert response.json()["error"]["code"] == expected
    assert metric_samples(metrics)["vllm_api_queue_depth"] == 0
    # Every request that was not refused at once (429) waited in the queue until its timeout.
    assert metric_samples(metrics)["vllm_api_queue_wait_seconds_count"] == statuses[503]


# --- Cancellation ------------------------------------------------------------------


def test_client_disconnect_mid_stream_aborts_the_engine_request(text_stack: Stack, wrapper) -> None:
    # The engine's core is held, and keep-alive comments begin the stream: the client leaves a stream that
    # has begun, and the engine, let go once its API server has ended the request, never generates it.
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, SSE_KEEPALIVE_S="0.1")
    completed, ended = engine_completed(text_stack), engine_chats_ended(text_stack)
    with engine_core_held(text_stack):
        with (
            httpx.Client(base_url=gateway.base_url, timeout=60) as client,
            client.stream("POST", CHAT_PATH, json=chat_body(LONG_TOKENS, stream=True)) as response,
        ):
            assert response.status_code == 200
            assert next(response.iter_lines()) == ": keep-alive"
        wait_until(lambda: engine_chats_ended(text_stack) > ended, "the engine's API server never saw the client leave")
    assert_engine_stopped_early(text_stack, completed)


async def test_keepalive_comments_before_the_first_token(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, SSE_KEEPALIVE_S="0.05")
    async with (
        httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client,
        saturated_engine(text_stack.engine_url) as saturation,
        client.stream("POST", CHAT_PATH, json=chat_body(4, stream=True)) as response,
    ):
        raw = response.aiter_raw()
        received = [await anext(raw)]  # the request waits for an engine slot
        await saturation.release()
        received += [chunk async for chunk in raw]
    text = b"".join(received).decode()
    assert text.startswith(": keep-alive\n\n")
    assert text.rstrip().endswith("data: [DONE]")


# --- Engine crash and drain ----------------------------------------------------------


# The restart stack runs with every secret the wrapper knows, to show that none reaches the engine.
# CONVERSATIONS_DB_URL names no server: the store is off (CONVERSATIONS_ENABLED=false).
WRAPPER_SECRETS = {
    "API_KEY": "sk-resilience-key",
    "CONVERSATIONS_DB_URL": "postgresql://chat:db-secret-5521@127.0.0.1:1/chat",
    "HF_TOKEN": "hf_resilience_token_7731",
    "VLLM_API_KEY": "stray-engine-key-9102",
}
AUTH = {"Authorization": f"Bearer {WRAPPER_SECRETS['API_KEY']}"}
# Short, so a stopped engine is replaced within the test; a busy engine still answers /health in far less.
ENGINE_HEALTH_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def restart_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        model_dir("tiny-llama"), port=port(41), vllm_port=port(42), log_path=logs_dir / "restart.log",
        extra_env={"SERVED_MODEL_NAME": TEXT_MODEL, "MAX_MODEL_LEN": "2048", "ON_ENGINE_FAILURE": "restart",
                   "DRAIN_TIMEOUT_S": "60", "ENGINE_HEALTH_TIMEOUT_S": str(ENGINE_HEALTH_TIMEOUT_S),
                   "CONVERSATIONS_ENABLED": "false", "SSE_KEEPALIVE_S": "1", **WRAPPER_SECRETS},
    )
    yield stack
    stack.stop(signal.SIGKILL)
    kill_tree(stack.process.pid)


def restart_client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.base_url, timeout=120, headers=AUTH)


async def warm_up(client: httpx.AsyncClient) -> None:
    """A short stream: a fresh engine's first generations are much slower and arrive in bursts."""
    response = await client.post(CHAT_PATH, json=chat_body(32, stream=True))
    assert response.status_code == 200


async def ping_status(client: httpx.AsyncClient) -> int | None:
    """/ping's status; None when an idle keep-alive connection was dropped, as a load balancer retries then."""
    try:
        return (await client.get("/ping", timeout=5)).status_code
    except httpx.TransportError:
        return None


def variables(pid: int) -> dict[bytes, bytes]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.split(b"=", 1) for entry in entries if b"=" in entry)


async def wait_for_log_line(stack: Stack, message: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while not (lines := [line for line in stack.logs() if line.get("message") == message]):
        assert time.monotonic() < deadline, f"no log line {message!r} after {timeout_s}s"
        await asyncio.sleep(0.5)
    return lines[0]


@dataclass
class OpenStream:
    """What a streaming client received so far."""

    status: int | None = None
    raw: bytearray = field(default_factory=bytearray)
    begun: asyncio.Event = field(default_factory=asyncio.Event)
    generating: asyncio.Event = field(default_factory=asyncio.Event)

    def data(self) -> list[str]:
        return sse_data(bytes(self.raw))

    def events(self) -> list[dict[str, object]]:
        """The JSON events before the final `[DONE]`."""
        return [json.loads(data) for data in self.data()[:-1]]


async def open_streams(
    client: httpx.AsyncClient, body: dict[str, object], count: int,
    until: Literal["begun", "generating"] = "generating",
) -> tuple[list[OpenStream], asyncio.Future[list[None]]]:
    """Start `count` streams together; return once every one has `begun` (a status) or is `generating` (an event)."""

    async def read(stream: OpenStream) -> None:
        async with client.stream("POST", CHAT_PATH, json=body) as response:
            stream.status = response.status_code
            stream.begun.set()
            async for chunk in response.aiter_raw():
                stream.raw += chunk
                if b"data: " in chunk:
                    stream.generating.set()

    streams = [OpenStream() for _ in range(count)]
    reading = asyncio.gather(*(read(stream) for stream in streams))
    started = asyncio.ensure_future(
        asyncio.wait_for(asyncio.gather(*(getattr(stream, until).wait() for stream in streams)), WAIT_S)
    )
    await asyncio.wait((reading, started), return_when=asyncio.FIRST_COMPLETED)
    if reading.done():
        reading.result()  # a stream failed before all of them were open: raise its error
    await started
    return streams, reading


async def test_the_engine_gets_none_of_the_wrappers_secrets(restart_stack: Stack) -> None:
    supervisor = variables(restart_stack.process.pid)
    for name, value in WRAPPER_SECRETS.items():
        assert supervisor.get(name.encode()) == value.encode(), f"the stack was started without {name}"

    processes = engine_processes(restart_stack)
    assert len(processes) >= 2, processes  # the API server and the engine core at least
    for process in processes:
        environ = variables(process.pid)
        assert not {name.decode() for name in environ} & WRAPPER_SECRETS.keys(), process.cmdline()
        values = b"\0".join(environ.values())
        for value in WRAPPER_SECRETS.values():
            assert value.encode() not in values, process.cmdline()

    # With VLLM_API_KEY in its environment the engine would answer the wrapper with 401.
    async with restart_client(restart_stack) as client:
        reply = await client.post(CHAT_PATH, json=chat_body(4, stream=False))
    assert reply.status_code == 200, reply.text


async def test_an_engine_that_stops_answering_is_killed_and_restarted(restart_stack: Stack) -> None:
    async with restart_client(restart_stack) as client:
        await asyncio.to_thread(restart_stack.wait_ready, 300)
        restarts = (await client.get("/health")).json()["engine_restarts"]
        stopped = engine_processes(restart_stack)
        try:
            for process in stopped:
                process.suspend()

            line = await wait_for_log_line(
                restart_stack, "engine stopped answering its health check; killing it", ENGINE_HEALTH_TIMEOUT_S + 120
            )
            assert line["silent_s"] >= ENGINE_HEALTH_TIMEOUT_S
            deadline = time.monotonic() + WAIT_S
            while "stopped answering" not in str((health := (await client.get("/health")).json()).get("error")):
                assert time.monotonic() < deadline, f"/health never told why the engine was restarted: {health}"
                await asyncio.sleep(0.2)
            assert health["error"].startswith("The engine stopped answering its health check for ")
            assert f"(ENGINE_HEALTH_TIMEOUT_S={ENGINE_HEALTH_TIMEOUT_S}) and was killed." in health["error"]
            assert health["error"].endswith("Restarting it (ON_ENGINE_FAILURE=restart).")

            await asyncio.to_thread(restart_stack.wait_ready, 300)
            _, alive = psutil.wait_procs(stopped, timeout=WAIT_S)
            assert not alive, f"stopped engine processes are still there: {alive}"
            reply = await client.post(CHAT_PATH, json=chat_body(4, stream=False))
            assert reply.status_code == 200
            assert (await client.get("/health")).json()["engine_restarts"] == restarts + 1
        finally:
            for process in stopped:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()


async def test_engine_crash_ends_open_streams_with_an_error_event_and_restarts(restart_stack: Stack) -> None:
    async with restart_client(restart_stack) as client:
        await asyncio.to_thread(restart_stack.wait_ready, 300)
        restarts = (await client.get("/health")).json()["engine_restarts"]
        await warm_up(client)
        # The engine core is held still, so the streams are open (begun with keep-alives, the
        # engine's API server answering) and unfinished when the engine dies, however fast the engine.
        leader = engine_process(restart_stack)
        with engine_core_held(restart_stack):
            streams, reading = await open_streams(client, chat_body(LONG_TOKENS, stream=True), 3, until="begun")
            # The engine's inter-process sockets are in a directory of its own, removed with the killed engine.
            ipc_dir = Path(variables(leader.pid)[b"VLLM_RPC_BASE_PATH"].decode())
            assert any(entry.is_socket() for entry in ipc_dir.iterdir()), list(ipc_dir.iterdir())
            os.killpg(leader.pid, signal.SIGKILL)

        deadline = time.monotonic() + WAIT_S
        while (await client.get("/health", timeout=WAIT_S)).status_code != 503:
            assert time.monotonic() < deadline, f"/health still answers 200 {WAIT_S}s after the engine was killed"
            await asyncio.sleep(0.1)
        assert (await client.get("/ping", timeout=WAIT_S)).status_code in (204, 503)

        await asyncio.wait_for(reading, WAIT_S)
        for stream in streams:
            assert stream.status == 200
            assert stream.raw.startswith(b": keep-alive\n\n")
            assert stream.data()[-1] == "[DONE]"
            events = stream.events()
            assert len(events) == 1 and events[0]["error"]["type"] == "engine_error", f"the stream ended with {events}"

        await asyncio.to_thread(restart_stack.wait_ready, 300)
        reply = await client.post(CHAT_PATH, json=chat_body(4, stream=False))
        assert reply.status_code == 200
        assert (await client.get("/health")).json()["engine_restarts"] == restarts + 1
        assert not ipc_dir.exists()  # removed with the killed engine, before the new one started


async def test_sigterm_drains_in_flight_streams_then_exits_0(restart_stack: Stack) -> None:
    # Usage counts tokens: a byte-level token can carry an empty delta, so content chunks do not.
    body = chat_body(LONG_TOKENS, stream=True, usage=True)
    body_complete = asyncio.Event()

    async with restart_client(restart_stack) as client:
        await asyncio.to_thread(restart_stack.wait_ready, 300)  # the crash test restarts the engine
        await warm_up(client)
        await wait_for_metric(client, "vllm_api_requests_in_flight", 0)  # the warm-up's request has ended
        # The drain waits for an admitted request whose body is still arriving, however fast the engine.
        held = asyncio.ensure_future(client.post(CHAT_PATH, content=held_body(4, body_complete), headers=JSON))
        await wait_for_metric(client, "vllm_api_requests_in_flight", 1)
        streams, reading = await open_streams(client, body, 2)
        restart_stack.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S
        while await ping_status(client) != 503:
            assert time.monotonic() < deadline, f"/ping not 503 within {WAIT_S:g} s of SIGTERM"
            await asyncio.sleep(0.05)
        late = await client.post(CHAT_PATH, json=chat_body(4, stream=False), timeout=WAIT_S)
        assert late.status_code == 503 and late.headers["retry-after"]
        assert late.json()["error"]["code"] == "draining"
        assert (await client.get("/health", timeout=WAIT_S)).json()["phase"] == "draining"
        body_complete.set()
        assert (await asyncio.wait_for(held, 60)).status_code == 200
        await asyncio.wait_for(reading, 60)
    for stream in streams:
        assert stream.status == 200 and stream.data()[-1] == "[DONE]"
        events = stream.events()
        assert events[-1]["usage"]["completion_tokens"] == LONG_TOKENS, "a drained stream lost tokens"
        choices = [event["choices"][0] for event in events if event["choices"]]
        assert choices[-1]["finish_reason"] == "length"
    assert await asyncio.to_thread(restart_stack.process.wait, 60) == 0


def test_engine_death_with_on_engine_failure_exit_stops_the_container(logs_dir: Path) -> None:
    stack = start_stack(
        model_dir("tiny-llama"), port=port(51), vllm_port=port(52), log_path=logs_dir / "exit.log",
        extra_env={"MAX_MODEL_LEN": "512", "ON_ENGINE_FAILURE": "exit"},
    )
    try:
        processes = [psutil.Process(stack.process.pid), *stack.descendants()]
        os.killpg(engine_process(stack).pid, signal.SIGKILL)
        assert stack.process.wait(60) != 0
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive
        died = [line for line in stack.logs() if line.get("message") == "engine died"]
        assert died and "SIGKILL" in died[0]["exit"]
    finally:
        stack.stop(signal.SIGKILL)
        kill_tree(stack.process.pid)
