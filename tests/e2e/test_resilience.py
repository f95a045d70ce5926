"""Overload, disconnects, engine death and shutdown each end in a bounded, well-formed answer.

All traffic stays on 127.0.0.1 and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import TEXT_MODEL
from tests.stack import Stack, engine_gauge, kill_tree, model_dir, port, start_stack

# Generating this many tokens takes seconds on the tiny model, even on an idle machine.
HOLDING_TOKENS = 1500


def chat_body(max_tokens: int, stream: bool, fixed_length: bool = True) -> dict[str, object]:
    body: dict[str, object] = {
        "model": TEXT_MODEL,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if fixed_length:
        body.update({"min_tokens": max_tokens, "ignore_eos": True})
    return body


def wrapper_sample(base_url: str, name: str) -> float:
    """One unlabelled sample of the wrapper's /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    samples = (sample for family in text_string_to_metric_families(text) for sample in family.samples)
    return next(sample.value for sample in samples if sample.name == name)


def read_sse(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


# --- Backpressure ------------------------------------------------------------------


async def test_queued_requests_are_served_in_arrival_order(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, MAX_CONCURRENT_REQUESTS="1", QUEUE_TIMEOUT_S="60")
    finished: list[int] = []
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:

        async def request(index: int, max_tokens: int) -> None:
            response = await client.post("/v1/chat/completions", json=chat_body(max_tokens, stream=False))
            assert response.status_code == 200
            finished.append(index)

        # The first request holds the only slot for seconds, so the next five queue up.
        tasks = [asyncio.ensure_future(request(0, HOLDING_TOKENS))]
        for index in range(1, 6):
            await asyncio.sleep(0.15)  # distinct arrival times
            tasks.append(asyncio.ensure_future(request(index, 40)))
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    assert finished == list(range(6))
    assert wrapper_sample(gateway.base_url, "vllm_api_queue_wait_seconds_count") == 5


async def test_queue_timeout_is_503_and_full_queue_is_429(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(
        text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL,
        MAX_CONCURRENT_REQUESTS="1", MAX_QUEUE="2", QUEUE_TIMEOUT_S="0.5",
    )
    # Each admitted request holds the slot for far longer than QUEUE_TIMEOUT_S.
    body = chat_body(HOLDING_TOKENS, stream=False)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:
        responses = await asyncio.wait_for(
            asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(8))), 120,
        )
    statuses = Counter(response.status_code for response in responses)
    assert statuses[200] >= 1 and statuses[429] >= 1 and statuses[503] >= 1, statuses
    assert set(statuses) <= {200, 429, 503}
    for response in responses:
        if response.status_code in (429, 503):
            assert int(response.headers["retry-after"]) >= 1
            expected = "queue_full" if response.status_code == 429 else "queue_timeout"
            assert response.json()["error"]["code"] == expected
    assert wrapper_sample(gateway.base_url, "vllm_api_queue_depth") == 0
    assert wrapper_sample(gateway.base_url, "vllm_api_queue_wait_seconds_count") == statuses[503] + statuses[200] - 1


# --- Cancellation ------------------------------------------------------------------


def test_client_disconnect_mid_stream_aborts_the_engine_request(text_stack: Stack) -> None:
    with (
        httpx.Client(base_url=text_stack.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=chat_body(1800, stream=True)) as response,
    ):
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert engine_gauge(text_stack.engine_url, "vllm:num_requests_running") == 1
    deadline = time.monotonic() + 3
    while engine_gauge(text_stack.engine_url, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "engine still generating for a client that left"
        time.sleep(0.1)


def test_keepalive_comments_before_the_first_token(text_stack: Stack, wrapper) -> None:
    # A prompt near MAX_MODEL_LEN (about 1,800 tokens) takes tens of milliseconds to
    # prefill even on the tiny model; the interval is far shorter than that.
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, SSE_KEEPALIVE_S="0.005")
    body = chat_body(1, stream=True) | {"messages": [{"role": "user", "content": "word " * 900}]}
    with (
        httpx.Client(base_url=gateway.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        raw = b"".join(response.iter_raw()).decode()
    assert raw.startswith(": keep-alive\n\n")
    assert raw.rstrip().endswith("data: [DONE]")


# --- Engine crash and drain ----------------------------------------------------------


@pytest.fixture(scope="module")
def restart_stack(logs_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        model_dir("tiny-llama"), port=port(41), vllm_port=port(42), log_path=logs_dir / "restart.log",
        extra_env={"SERVED_MODEL_NAME": TEXT_MODEL, "MAX_MODEL_LEN": "2048", "ON_ENGINE_FAILURE": "restart",
                   "DRAIN_TIMEOUT_S": "60"},
    )
    yield stack
    stack.stop(signal.SIGKILL)
    kill_tree(stack.process.pid)


def engine_process(stack: Stack) -> psutil.Process:
    for process in stack.descendants():
        if "vllm.entrypoints.openai.api_server" in " ".join(process.cmdline()):
            return process
    raise AssertionError("no engine process found")


def stream_in_thread(base_url: str, body: dict[str, object], out: dict[str, object]) -> threading.Thread:
    def run() -> None:
        with (
            httpx.Client(base_url=base_url, timeout=120) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            out["status"] = response.status_code
            out["lines"] = read_sse(response)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_engine_crash_ends_open_streams_with_an_error_event_and_restarts(restart_stack: Stack) -> None:
    results = [{} for _ in range(3)]
    threads = [stream_in_thread(restart_stack.base_url, chat_body(1500, stream=True), out) for out in results]
    deadline = time.monotonic() + 30
    while engine_gauge(restart_stack.engine_url, "vllm:num_requests_running") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.killpg(engine_process(restart_stack).pid, signal.SIGKILL)

    seen_unhealthy = None
    while time.monotonic() - killed_at < 10:
        if httpx.get(f"{restart_stack.base_url}/health", timeout=2).status_code == 503:
            seen_unhealthy = time.monotonic() - killed_at
            break
        time.sleep(0.1)
    assert seen_unhealthy is not None and seen_unhealthy < 2.0
    assert httpx.get(f"{restart_stack.base_url}/ping", timeout=2).status_code in (204, 503)

    for thread in threads:
        thread.join(30)
    for out in results:
        lines = out["lines"]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))
        assert error["error"]["type"] == "engine_error"

    restart_stack.wait_ready(timeout_s=300)
    reply = httpx.post(f"{restart_stack.base_url}/v1/chat/completions", json=chat_body(4, stream=False), timeout=60)
    assert reply.status_code == 200
    assert httpx.get(f"{restart_stack.base_url}/health").json()["engine_restarts"] == 1


def test_sigterm_drains_in_flight_streams_then_exits_0(restart_stack: Stack) -> None:
    results = [{} for _ in range(2)]
    # Long enough (seconds even on an idle machine) that the checks below run mid-drain.
    # Usage counts tokens: a byte-level token can carry an empty delta, so content chunks do not.
    body = chat_body(HOLDING_TOKENS, stream=True) | {"stream_options": {"include_usage": True}}
    threads = [stream_in_thread(restart_stack.base_url, body, out) for out in results]
    deadline = time.monotonic() + 30
    while engine_gauge(restart_stack.engine_url, "vllm:num_requests_running") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    restart_stack.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{restart_stack.base_url}/ping", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/ping still healthy 10 s after SIGTERM"
        time.sleep(0.05)
    late = httpx.post(f"{restart_stack.base_url}/v1/chat/completions", json=chat_body(4, stream=False), timeout=10)
    assert late.status_code == 503 and late.headers["retry-after"]
    assert late.json()["error"]["code"] == "draining"
    assert httpx.get(f"{restart_stack.base_url}/health", timeout=5).json()["phase"] == "draining"
    for thread in threads:
        thread.join(60)
    for out in results:
        lines = out["lines"]
        assert out["status"] == 200 and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == HOLDING_TOKENS, "a drained stream lost tokens"
        choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]
        assert choices[-1]["finish_reason"] == "length"
    assert restart_stack.process.wait(60) == 0


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
