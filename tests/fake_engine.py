"""A stand-in for the engine's HTTP server, so the wrapper's request path is tested in seconds.

It is not the engine: it answers the few routes the wrapper calls, the way
vLLM 0.32's OpenAI server answers them (SSE chunks, the usage block with
`include_usage`, per-chunk usage only with both `include_usage` and
`continuous_usage_stats`, error bodies in OpenAI's and FastAPI's shapes, the
307 of `/v1/models/`), and it can misbehave on request: wait before the first
token, stall, fail or cut a stream. It records every request it receives, so
a test can prove what reached the engine and what did not. The end-to-end
tests run the same paths against the real CPU engine.

It also stands in for vLLM's sleep mode, which the CPU build does not have
(`--enable-sleep-mode` needs a CUDA GPU): `POST /sleep?level=1` and
`POST /wake_up` answer as vLLM's dev routes do, and while asleep it refuses
generation with a 503, as a sleeping engine cannot serve.

Replies: "Echo: <last user message>" word by word, unless `reply` is set.
Token counts: one per word, plus 4 per message.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SERVED_NAME = "fake-model"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: str = ""  # the client's address and port: one per connection

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeEngine:
    max_model_len: int | None = 4096
    reply: str | None = None
    first_token_delay_s: float = 0.0
    piece_delay_s: float = 0.0
    fail_mid_stream: bool = False  # an error event after the first pieces, like vLLM's
    cut_mid_stream: bool = False  # the connection dropped after the first pieces, like a crash
    stall_after_first: bool = False  # the first piece, then silence
    drop_requests: int = 0  # this many requests get no answer: the connection closes, as a stale keep-alive one does
    metrics_text: str | None = None  # what GET /metrics answers (Prometheus text); None: 404 as for any unknown route
    asleep: bool = False  # put to sleep by POST /sleep, woken by POST /wake_up
    received: list[Received] = field(default_factory=list)
    usage_sent: list[dict[str, int]] = field(default_factory=list)
    aborted: int = 0  # streams the wrapper dropped before the end
    url: str = ""
    _runner: web.AppRunner | None = None

    @staticmethod
    def count_tokens(messages: list[dict[str, str]]) -> int:
        return sum(len(str(m["content"]).split()) + 4 for m in messages)

    def requests_to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.requests_to("/v1/chat/completions")]

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/", self._redirect_models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/messages", self._anthropic_stream)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/audio/transcriptions", self._transcription)
        app.router.add_get("/v1/responses/{id}", self._redirect_response)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/sleep", self._sleep)
        app.router.add_post("/wake_up", self._wake_up)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _record(self, request: web.Request) -> Received:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        received = Received(request.method, request.path, dict(request.headers), await request.read(), str(peer))
        self.received.append(received)
        return received

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def _version(self, _: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response(
            {"object": "list", "data": [{"id": SERVED_NAME, "object": "model", "max_model_len": self.max_model_len}]}
        )

    async def _redirect_models(self, request: web.Request) -> web.Response:
        await self._record(request)
        raise web.HTTPTemporaryRedirect(f"{self.url}/v1/models")

    async def _redirect_response(self, request: web.Request) -> web.Response:
        await self._record(request)
        raise web.HTTPTemporaryRedirect(f"{self.url}{request.path}?moved=1")

    async def _sleep(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.asleep = True
        return web.json_response({"status": "sleeping", "level": int(request.query.get("level", "1"))})

    async def _wake_up(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.asleep = False
        return web.json_response({"status": "awake", "tags": None})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics_text is None:
            return await self._unknown(request)
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def _unknown(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"detail": "Not Found"}, status=404)

    async def _tokenize(self, request: web.Request) -> web.Response:
        payload = (await self._record(request)).json()
        return web.json_response({"count": self.count_tokens(payload["messages"]), "tokens": []})

    async def _embeddings(self, request: web.Request) -> web.Response:
        payload = (await self._record(request)).json()
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        tokens = sum(len(str(text).split()) for text in inputs)
        return web.json_response({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.0, 1.0]} for i in range(len(inputs))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def _anthropic_stream(self, request: web.Request) -> web.StreamResponse:
        """Anthropic Messages, streamed: its usage sits in message_start and message_delta."""
        await self._record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for kind, data in (
            ("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 7, "output_tokens": 1}}}),
            ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": 2}}),
            ("message_stop", {"type": "message_stop"}),
        ):
            await response.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
        return response

    async def _transcription(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        return web.json_response({"text": f"{len(received.body)} bytes of {received.headers['Content-Type']}"})

    def _reply_for(self, payload: dict[str, Any]) -> str:
        if self.reply is not None:
            return self.reply
        messages = payload.get("messages")
        last = messages[-1]["content"] if messages else payload.get("prompt", "")
        return f"Echo: {last}"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = (await self._record(request)).json()
        if self.asleep:
            return web.json_response({"error": {"message": "The engine is asleep.", "code": 503}}, status=503)
        if self.drop_requests > 0:
            self.drop_requests -= 1
            assert request.transport is not None
            request.transport.close()
            return web.Response()  # never sent: the connection is gone
        chat = request.path == "/v1/chat/completions"
        prompt_text = json.dumps(payload.get("messages") or payload.get("prompt"))
        if "REFUSE" in prompt_text:
            body = {"error": {"message": "This prompt is refused.", "type": "BadRequestError", "code": 400}}
            return web.json_response(body, status=400)
        if "DETAIL" in prompt_text:
            return web.json_response({"detail": [{"loc": ["body", "messages"], "msg": "bad value"}]}, status=400)
        pieces = re.findall(r"\S+\s*", self._reply_for(payload))
        max_tokens = payload.get("max_tokens") or 16
        finish = "length" if len(pieces) > max_tokens else "stop"
        pieces = pieces[:max_tokens]
        prompt_tokens = self.count_tokens(payload["messages"]) if chat else len(str(payload.get("prompt")).split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        if not payload.get("stream"):
            await asyncio.sleep(self.first_token_delay_s)
            text = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            return web.json_response({"id": "x", "object": "chat.completion", "model": SERVED_NAME,
                                      "choices": [choice], "usage": usage})
        options = payload.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        continuous = include_usage and options.get("continuous_usage_stats") is True
        return await self._stream(request, pieces, finish, usage, chat, include_usage, continuous)

    async def _stream(
        self, request: web.Request, pieces: list[str], finish: str, usage: dict[str, int], chat: bool,
        include_usage: bool, continuous: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], with_usage: dict[str, int] | None = None) -> None:
            event: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "model": SERVED_NAME,
                                     "choices": choices}
            if with_usage is not None:
                event["usage"] = with_usage
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")

        def choice(piece: str | None, finish_reason: str | None) -> dict[str, Any]:
            if chat:
                delta = {"content": piece} if piece is not None else {}
                return {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {"index": 0, "text": piece or "", "finish_reason": finish_reason}

        await asyncio.sleep(self.first_token_delay_s)
        try:
            for index, piece in enumerate(pieces):
                running = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": index + 1,
                           "total_tokens": usage["prompt_tokens"] + index + 1}
                await send([choice(piece, None)], running if continuous else None)
                if index == 0 and self.stall_after_first:
                    await asyncio.sleep(3600)
                if index == 1 and self.cut_mid_stream:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if index == 1 and self.fail_mid_stream:
                    await send_error(response)
                    return response
                await asyncio.sleep(self.piece_delay_s)
            await send([choice(None, finish)], usage if continuous else None)
            if include_usage:
                self.usage_sent.append(usage)
                await send([], usage)
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        return response


async def send_error(response: web.StreamResponse) -> None:
    event = {"error": {"message": "engine crashed", "type": "InternalServerError", "code": 500}}
    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
