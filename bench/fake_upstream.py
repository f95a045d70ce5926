"""A near-zero-cost OpenAI-compatible engine for the benchmark.

The benchmark measures what a gateway adds per request and per chunk, so the
engine behind the gateway must cost almost nothing: it shares one core with the
load generator. This server is a raw asyncio protocol (uvloop, httptools parser)
that answers with bytes built once: one-token SSE chunks shaped like vLLM's, a
usage chunk when `stream_options.include_usage` is true, then `data: [DONE]`;
or a pre-built JSON body for non-streaming requests.

Run: `python -m bench.fake_upstream --port 8500 [--tokens 64] [--delay-ms 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import httptools
import uvloop

CHAT_PATH = b"/v1/chat/completions"
COMPLETIONS_PATH = b"/v1/completions"
MAX_TOKENS_LIMIT = 100_000
CREATED = int(time.time())

SSE_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    tokens: int = 64
    delay_s: float = 0.0
    model: str = "m"
    # Without a delay: one send() per event (True) or the whole stream in one send() (False).
    write_per_chunk: bool = False


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (chunked transfer encoding) around `payload`."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}


@lru_cache(maxsize=64)
def stream_frames(chat: bool, tokens: int, include_usage: bool, model: str) -> tuple[bytes, ...]:
    """The framed SSE events of one streamed answer: `tokens` one-token chunks, usage, [DONE]."""
    rid = "chatcmpl-bench0000000000000000" if chat else "cmpl-bench0000000000000000"
    obj = "chat.completion.chunk" if chat else "text_completion"
    events: list[bytes] = []
    for i in range(tokens):
        finish = "length" if i == tokens - 1 else None
        if chat:
            # Like OpenAI, the first chunk also carries the role.
            delta = {"role": "assistant", "content": "x"} if i == 0 else {"content": "x"}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": finish, "stop_reason": None}
        events.append(_sse({"id": rid, "object": obj, "created": CREATED, "model": model, "choices": [choice]}))
    if include_usage:
        events.append(
            _sse({"id": rid, "object": obj, "created": CREATED, "model": model, "choices": [], "usage": _usage(tokens)})
        )
    events.append(b"data: [DONE]\n\n")
    frames = [_frame(event) for event in events]
    frames[-1] += LAST_CHUNK
    return tuple(frames)


@lru_cache(maxsize=64)
def whole_stream(chat: bool, tokens: int, include_usage: bool, model: str) -> bytes:
    """Headers and every event of one streamed answer, for a single send()."""
    return SSE_HEADERS + b"".join(stream_frames(chat, tokens, include_usage, model))


def _json_response(status: int, body: bytes, keep_alive: bool, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
    connection = b"" if keep_alive else b"connection: close\r\n"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
        % (status, reason, content_type, len(body), connection)
    ) + body


@lru_cache(maxsize=64)
def completion_response(chat: bool, tokens: int, model: str, keep_alive: bool) -> bytes:
    """The whole HTTP response of one non-streamed answer of `tokens` tokens."""
    text = "x" * tokens
    if chat:
        body = {
            "id": "chatcmpl-bench0000000000000000", "object": "chat.completion", "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": _usage(tokens),
        }
    else:
        body = {
            "id": "cmpl-bench0000000000000000", "object": "text_completion", "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": _usage(tokens),
        }
    return _json_response(200, json.dumps(body, separators=(",", ":")).encode(), keep_alive)


def _static_routes(model: str) -> dict[bytes, tuple[bytes, bytes]]:
    models = {"object": "list", "data": [{"id": model, "object": "model", "created": CREATED,
                                          "owned_by": "vllm", "max_model_len": 1024}]}
    metrics = (
        "# HELP vllm:num_requests_running Requests running on the engine.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{model}"}} 0.0\n'
    )
    return {
        b"/health": (b"", b"text/plain"),
        b"/v1/models": (json.dumps(models).encode(), b"application/json"),
        b"/metrics": (metrics.encode(), b"text/plain; version=0.0.4"),
    }


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered one after another."""

    def __init__(self, config: UpstreamConfig, routes: dict[bytes, tuple[bytes, bytes]]) -> None:
        self._config = config
        self._routes = routes
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    # --- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    # --- httptools callbacks --------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        keep_alive = self._parser.should_keep_alive()
        path = self._url.split(b"?", 1)[0]
        if path in (CHAT_PATH, COMPLETIONS_PATH) and self._parser.get_method() == b"POST":
            self._complete(path == CHAT_PATH, b"".join(self._body), keep_alive)
            return
        route = self._routes.get(path)
        if route is None:
            transport.write(_json_response(404, b'{"detail":"Not Found"}', keep_alive))
        else:
            transport.write(_json_response(200, route[0], keep_alive, route[1]))
        if not keep_alive:
            self._close()

    # --- answers ---------------------------------------------------------
    def _complete(self, chat: bool, raw: bytes, keep_alive: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            request = json.loads(raw)
            tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or self._config.tokens)
            tokens = max(1, min(tokens, MAX_TOKENS_LIMIT))
            stream = bool(request.get("stream"))
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        except (ValueError, TypeError, AttributeError) as exc:
            body = json.dumps({"error": {"message": f"bad request body: {exc}", "type": "BadRequestError",
                                         "param": None, "code": 400}}).encode()
            transport.write(_json_response(400, body, keep_alive))
            if not keep_alive:
                self._close()
            return
        model = self._config.model
        if not stream:
            transport.write(completion_response(chat, tokens, model, keep_alive))
            if not keep_alive:
                self._close()
            return
        frames = stream_frames(chat, tokens, include_usage, model)
        if self._config.delay_s > 0:
            transport.write(SSE_HEADERS)
            _PacedStream(transport, frames, tokens, self._config.delay_s, keep_alive).next()
            return
        if self._config.write_per_chunk:
            # Each event leaves as its own send(), as an engine emits tokens.
            transport.write(SSE_HEADERS)
            for frame in frames:
                transport.write(frame)
        else:
            transport.write(whole_stream(chat, tokens, include_usage, model))
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _PacedStream:
    """Writes one token chunk per `delay_s`, like an engine decoding; timers, not tasks, to stay cheap."""

    __slots__ = ("_delay_s", "_frames", "_index", "_keep_alive", "_loop", "_tokens", "_transport")

    def __init__(
        self, transport: asyncio.Transport, frames: tuple[bytes, ...], tokens: int, delay_s: float, keep_alive: bool
    ) -> None:
        self._transport = transport
        self._frames = frames
        self._tokens = tokens
        self._index = 0
        self._delay_s = delay_s
        self._keep_alive = keep_alive
        self._loop = asyncio.get_running_loop()

    def next(self) -> None:
        self._loop.call_later(self._delay_s, self._send)

    def _send(self) -> None:
        if self._transport.is_closing():
            return  # the client went away: stop decoding, as an engine aborts the request
        self._transport.write(self._frames[self._index])
        self._index += 1
        if self._index < self._tokens:
            self.next()
            return
        # The usage chunk and [DONE] follow the last token at once.
        for frame in self._frames[self._index:]:
            self._transport.write(frame)
        if not self._keep_alive:
            self._transport.close()


async def start_server(host: str, port: int, config: UpstreamConfig) -> asyncio.Server:
    """Listen on host:port; the caller owns the returned server (close it when done)."""
    loop = asyncio.get_running_loop()
    routes = _static_routes(config.model)
    return await loop.create_server(lambda: UpstreamProtocol(config, routes), host, port, backlog=1024)


async def _serve_forever(host: str, port: int, config: UpstreamConfig) -> None:
    server = await start_server(host, port, config)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=64, help="chunks per answer when the request sets no max_tokens")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time between tokens (0: all at once)")
    parser.add_argument("--model", default="m", help="model name in answers and /v1/models")
    parser.add_argument("--write-per-chunk", action="store_true",
                        help="without a delay, send each chunk with its own send() instead of the whole stream at once")
    args = parser.parse_args(argv)
    config = UpstreamConfig(tokens=args.tokens, delay_s=args.delay_ms / 1000.0, model=args.model,
                            write_per_chunk=args.write_per_chunk)
    uvloop.run(_serve_forever(args.host, args.port, config))


if __name__ == "__main__":
    main()
