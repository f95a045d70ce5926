"""Timeouts end requests with a well-formed answer and abort the engine's work.

`REQUEST_TIMEOUT_S` bounds a whole request: a non-streaming request gets a
504, a stream ends with an error event and `[DONE]`; either way the engine
stops generating for it.

The engine's core is held still while the request times out, so the engine
cannot finish the reply before the abort reaches it, however fast it is. The
test lets go once the engine's API server has ended the request (its own HTTP
request counter), then checks that the engine never completes it.
"""

from __future__ import annotations

import json

import httpx

from tests.e2e.conftest import TEXT_MODEL
from tests.stack import (
    Stack,
    assert_engine_stopped_early,
    engine_chats_ended,
    engine_completed,
    engine_core_held,
    wait_until,
)

LONG = 1900


def long_generation(stream: bool) -> dict[str, object]:
    return {
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "Go on"}], "stream": stream,
        "max_tokens": LONG, "min_tokens": LONG, "ignore_eos": True,
    }


def test_non_streaming_request_over_request_timeout_is_a_504(text_stack: Stack, wrapper) -> None:
    gateway = wrapper(text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, REQUEST_TIMEOUT_S="0.5")
    before, ended = engine_completed(text_stack), engine_chats_ended(text_stack)
    with engine_core_held(text_stack):
        response = httpx.post(
            f"{gateway.base_url}/v1/chat/completions", json=long_generation(False), timeout=30,
            headers={"X-Request-ID": "over-request-timeout"},
        )
        wait_until(lambda: engine_chats_ended(text_stack) > ended, "the engine's API server did not end the request")
    assert response.status_code == 504
    error = response.json()["error"]
    assert "REQUEST_TIMEOUT_S" in error["message"] and error["code"] == "timeout"
    assert_engine_stopped_early(text_stack, before)
    line = gateway.request_line("over-request-timeout")
    assert line["status"] == 504 and line["error"] == "timeout"


def test_stream_over_request_timeout_ends_with_an_error_event(text_stack: Stack, wrapper) -> None:
    # Keep-alive comments begin the stream while the engine is held, so the timeout ends a begun stream.
    gateway = wrapper(
        text_stack.engine_url, SERVED_MODEL_NAME=TEXT_MODEL, REQUEST_TIMEOUT_S="0.5", SSE_KEEPALIVE_S="0.1"
    )
    before, ended = engine_completed(text_stack), engine_chats_ended(text_stack)
    with engine_core_held(text_stack):
        with httpx.stream(
            "POST", f"{gateway.base_url}/v1/chat/completions", json=long_generation(True), timeout=30
        ) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        wait_until(lambda: engine_chats_ended(text_stack) > ended, "the engine's API server did not end the request")
    assert lines[0] == ": keep-alive" and lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "timeout"
    assert_engine_stopped_early(text_stack, before)
    assert httpx.get(f"{gateway.base_url}/health").status_code == 200
