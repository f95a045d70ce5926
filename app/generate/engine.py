"""The two engine calls `/generate` makes: a streamed chat completion and a token count.

The completion is always streamed from the engine, also when the client wants
one JSON reply, so that the time to the first token is measured rather than
guessed, and usage is requested in the stream (`include_usage`) so the token
counts are the engine's own. Engine failures become `APIError`s that tell the
client what happened: unreachable (503), too slow (504), refused the request
(its own 4xx message) or failed (502).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from app.errors import APIError, unavailable

ChatMessage = dict[str, str]


def _engine_message(body: str) -> str:
    """The error message inside an engine error body, else the body itself (shortened)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "no details"
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if parsed.get("message"):
            return str(parsed["message"])
    return body.strip()[:500]


def _refused(status: int, body: str) -> APIError:
    message = _engine_message(body)
    if 400 <= status < 500:
        return APIError(status, f"The engine refused the request: {message}", code="engine_refused")
    return APIError(502, f"The engine failed ({status}): {message}", code="engine_error", cause="engine_error")


def _timed_out(timeout: aiohttp.ClientTimeout) -> APIError:
    return APIError(
        504,
        f"The engine did not answer in time (REQUEST_TIMEOUT_S={timeout.total:g}, "
        f"STREAM_IDLE_TIMEOUT_S={timeout.sock_read:g}); try a smaller max_tokens or retry later.",
        code="engine_timeout",
        cause="timeout",
    )


def _broken(message: str) -> APIError:
    return APIError(502, message, code="engine_error", cause="engine_error")


def _unreachable() -> APIError:
    return unavailable("The engine is not reachable; retry when /health reports ready.", code="engine_unreachable")


class ChatStream:
    """An open streamed chat completion; read it once with `texts()`, then `close()`."""

    def __init__(self, response: aiohttp.ClientResponse, timeout: aiohttp.ClientTimeout) -> None:
        self._response = response
        self._timeout = timeout
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None

    async def texts(self) -> AsyncIterator[str]:
        """Yield the generated text piece by piece; usage and finish reason are set when it ends."""
        try:
            async for raw_line in self._response.content:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _refused(502, data.decode(errors="replace"))
                usage = chunk.get("usage")
                if usage:
                    self.prompt_tokens = usage.get("prompt_tokens")
                    self.completion_tokens = usage.get("completion_tokens")
                for choice in chunk.get("choices") or ():
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
        except asyncio.TimeoutError:
            raise _timed_out(self._timeout) from None
        except aiohttp.ClientError as exc:
            raise _broken(f"The engine broke off the reply: {exc}") from None
        except ValueError as exc:
            raise _broken(f"The engine sent a malformed stream event: {exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        # Closing (not releasing) drops the connection, which aborts the request in the engine.
        self._response.close()


async def open_chat_stream(
    session: aiohttp.ClientSession,
    engine_url: str,
    model: str,
    messages: list[ChatMessage],
    max_tokens: int,
    temperature: float,
    timeout: aiohttp.ClientTimeout,
) -> ChatStream:
    """Send the completion request and wait for the engine to accept it (status 200)."""
    payload = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        response = await session.post(f"{engine_url}/v1/chat/completions", json=payload, timeout=timeout)
    except asyncio.TimeoutError:
        raise _timed_out(timeout) from None
    except aiohttp.ClientError:
        raise _unreachable() from None
    if response.status != 200:
        async with response:
            raise _refused(response.status, await response.text(errors="replace"))
    return ChatStream(response, timeout)


async def count_prompt_tokens(
    session: aiohttp.ClientSession,
    engine_url: str,
    model: str,
    messages: list[ChatMessage],
    timeout: aiohttp.ClientTimeout,
) -> int:
    """Tokens of `messages` after the model's chat template, counted by the engine's `/tokenize`."""
    payload = {"model": model, "messages": messages, "add_generation_prompt": True}
    try:
        async with session.post(f"{engine_url}/tokenize", json=payload, timeout=timeout) as response:
            body = await response.text(errors="replace")
            if response.status != 200:
                raise _refused(response.status, body)
    except asyncio.TimeoutError:
        raise _timed_out(timeout) from None
    except aiohttp.ClientError:
        raise _unreachable() from None
    return int(json.loads(body)["count"])
