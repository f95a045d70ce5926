"""Timeouts end requests with a well-formed answer and abort the engine's work.

`REQUEST_TIMEOUT_S` bounds a whole request: a non-streaming request gets a
504, a stream ends with an error event and `[DONE]`; either way the engine
stops generating for it.
"""

from __future__ import annotations

import json
import time

import httpx

from tests.e2e.conftest import TEXT_MODEL
from tests.stack import Stack, engine_gauge

LONG = 1900


def long_generation(stream: bool) -> dict[str, object]:
    return {
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "Go on"}], "stream": stream,
        "max_tokens": LONG, "min_tokens": LONG, "ignore_eos": True,
    }


def completed(stack: Stack) -> float:
    """Requests the engine finished at their max_tokens (an aborted request is not counted)."""
    text = httpx.get(f"{stack.engine_url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("vllm:request_success_total{") and 'finished_reason="length"' in line
    )


def assert_engine_stopped_early(stack: Stack, completed_before: float, timeout_s: float = 120.0) -> None:
    """Wait until the engine is idle; it must not have finished the request (it was aborted)."""
    deadline = time.monotonic() + timeout_s
    while engine_gauge(stack.engine_url, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine is still busy"
        time.sleep(0.1)
    assert completed(stack) == completed_before, "the engine generated the whole reply: it was not aborted"


def test_non_streaming_request_over_request_timeout_is_a_504(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, REQUEST_TIMEOUT_S="0.5")
    before = completed(text_stack)
    response = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json=long_generation(False), timeout=30,
        headers={"X-Request-ID": "over-request-timeout"},
    )
    assert response.status_code == 504
    error = response.json()["error"]
    assert "REQUEST_TIMEOUT_S" in error["message"] and error["code"] == "timeout"
    assert_engine_stopped_early(text_stack, before)
    line = gateway.request_line("over-request-timeout")
    assert line["status"] == 504 and line["error"] == "timeout"


def test_stream_over_request_timeout_ends_with_an_error_event(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, REQUEST_TIMEOUT_S="0.5")
    before = completed(text_stack)
    with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=long_generation(True), timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "timeout"
    assert_engine_stopped_early(text_stack, before)
    assert httpx.get(f"{gateway.base_url}/health").status_code == 200
