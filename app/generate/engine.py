"""The two engine calls `/generate` makes: a streamed chat completion and a token count.

Both go through the wrapper's one engine client (`app.proxy.engine`), so
timeouts, an unreachable engine, a failed start and the drain deadline are
answered exactly as on `/v1`. The completion is always streamed from the
engine, also when the client wants one JSON reply, so that the time to the
first token is measured rather than guessed, and usage is requested in the
stream (`include_usage`) so the token counts are the engine's own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.errors import APIError, engine_error
from app.proxy.engine import EngineClient
from app.proxy.reply import Reply
from app.proxy.upstream import UpstreamResponse

ChatMessage = dict[str, str]
JSON_HEADERS = {"content-type": "application/json"}


class ChatStream:
    """An open streamed chat completion: its text pieces, then usage and finish reason."""

    def __init__(self, response: UpstreamResponse) -> None:
        self._content = response.content
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None

    async def pieces(self, reply: Reply | None, keepalive_s: float) -> AsyncIterator[str]:
        """Yield the generated text piece by piece; with a streaming `reply`, keep-alives until the first."""
        try:
            first = self._content.readline()
            line = await (reply.first_chunk(first, keepalive_s) if reply is not None else first)
            while line:
                text = self._read_event(line.strip())
                if text is _DONE:
                    return
                if text:
                    yield text  # type: ignore[misc]
                line = await self._content.readline()
        except ValueError:  # a line longer than the client's buffer
            raise APIError(502, "The engine sent a stream event too long to read.", code="engine_error",
                           cause="engine_error") from None

    def _read_event(self, line: bytes) -> str | object | None:
        if not line.startswith(b"data:"):
            return None  # blank separators and SSE comments
        data = line[len(b"data:"):].strip()
        if data == b"[DONE]":
            return _DONE
        try:
            chunk = json.loads(data)
        except ValueError:
            raise APIError(502, "The engine sent a malformed stream event.", code="engine_error",
                           cause="engine_error") from None
        if "error" in chunk:
            error = engine_error(502, data)
            raise APIError(502, f"The engine failed while generating: {error.message}", code="engine_error",
                           cause="engine_error")
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
        text = ""
        for choice in chunk.get("choices") or ():
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            text += (choice.get("delta") or {}).get("content") or ""
        return text


_DONE = object()


@asynccontextmanager
async def chat_stream(
    engine: EngineClient, model: str, messages: list[ChatMessage], max_tokens: int, temperature: float,
    engine_url: str | None = None,
) -> AsyncIterator[ChatStream]:
    """A streamed chat completion; the engine's refusal (4xx) is raised as its own error.

    `engine_url` is the model's engine with MODELS (None: the one engine).
    """
    payload = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with engine.call("POST", "/v1/chat/completions", body=_json(payload), headers=JSON_HEADERS,
                           stream=True, base_url=engine_url) as response:
        if response.status != 200:
            raise refusal(response.status, await response.read())
        yield ChatStream(response)


async def count_prompt_tokens(
    engine: EngineClient, model: str, messages: list[ChatMessage], engine_url: str | None = None
) -> int:
    """Tokens of `messages` after the model's chat template, counted by the engine's `/tokenize`."""
    payload = {"model": model, "messages": messages, "add_generation_prompt": True}
    async with engine.call("POST", "/tokenize", body=_json(payload), headers=JSON_HEADERS,
                           base_url=engine_url) as response:
        body = await response.read()
        if response.status != 200:
            raise refusal(response.status, body)
    try:
        return int(json.loads(body)["count"])
    except (ValueError, KeyError, TypeError):
        raise APIError(502, "The engine's /tokenize answer has no token count.", code="engine_error",
                       cause="engine_error") from None


def refusal(status: int, body: bytes) -> APIError:
    """The engine's error answer: its own 4xx as it is, a failure of the engine as 502."""
    error = engine_error(status, body)
    if status < 500:
        return error
    return APIError(502, f"The engine failed (HTTP {status}): {error.message}", code="engine_error",
                    cause="engine_error")


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()
