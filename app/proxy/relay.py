"""The `/v1/*` proxy: one request from the client socket to the engine and back.

This is the hot path of every token, so it is a plain ASGI middleware rather
than a FastAPI route: no routing table, no response classes, no per-chunk
allocations beyond the chunk itself. In order, a request is:

1. authenticated (`API_KEY`) and refused early while the server drains;
2. read up to `MAX_REQUEST_BYTES`;
3. for JSON bodies: media checked and normalised on every route
   (`app.media.prepare_media`), and for streams the
   engine is asked for a usage block (stripped again if the client did not
   ask for one);
4. admitted by the backpressure queue;
5. forwarded on the shared aiohttp connection pool and relayed back chunk by
   chunk as it arrives, with keep-alive comments before the first token, an
   idle timeout between chunks and a total timeout.

A client that disconnects cancels the relay, which closes the engine
connection; vLLM then aborts the generation. Engine failures mid-stream end
the stream with an OpenAI-style error event and `[DONE]`, never a silent cut.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from yarl import URL

from app.auth import header
from app.errors import APIError, openai_error_body, unavailable
from app.media import MEDIA_ROUTES, prepare_media
from app.observability import metrics
from app.observability.record import RequestRecord
from app.proxy.gateway import Gateway
from app.proxy.usage import UsageFilter, read_json_usage

ASGIApp = Any
Scope = dict[str, Any]

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
HOP_BY_HOP = frozenset(
    {
        b"host", b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"authorization",
    }
)
RESPONSE_SKIP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class V1Proxy:
    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        gateway = self.gateway
        record: RequestRecord = scope["state"]["record"]
        try:
            gateway.keys.verify(header(scope["headers"], b"authorization"))
            if gateway.readiness.draining:
                raise unavailable("Server is shutting down; retry on another replica.", code="draining")
            body = await read_body(receive, scope["headers"], gateway.settings.MAX_REQUEST_BYTES)
            body, client_usage = await self._prepare(scope, body, record)
            record.queue_wait_s = await gateway.admission.acquire()
        except APIError as error:
            record.error_cause = error.cause
            await send_error(send, error)
            return
        except ClientGone:
            record.status, record.error_cause = 499, "client_disconnected"
            return
        metrics.request_started()
        try:
            await self._forward(scope, receive, send, body, record, client_usage)
        finally:
            metrics.request_finished()
            gateway.admission.release()

    async def _prepare(self, scope: Scope, body: bytes, record: RequestRecord) -> tuple[bytes, bool]:
        """Parse JSON bodies for the model, stream flag and media; returns (body, client_wants_usage)."""
        record.model = self.gateway.settings.served_model_name
        if not body or scope["method"] != "POST":
            return body, False
        try:
            payload = json.loads(body)
        except ValueError:
            raise APIError(400, "Request body is not valid JSON.", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "Request body is nested too deeply; flatten the JSON.", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
        model = payload.get("model")
        if isinstance(model, str):
            record.model = model
        if scope["path"] not in MEDIA_ROUTES:
            raise APIError(404, f"{scope['path']} is not served by this server.", code="unknown_route")
        counts = await prepare_media(scope["path"], payload, self.gateway.media_policy, self.gateway.media_fetcher)
        record.text_parts, record.images, record.videos = counts.text, counts.image, counts.video
        changed = counts.changed
        client_usage = False
        if payload.get("stream") is True and scope["path"] in GENERATION_PATHS:
            record.stream = True
            options = payload.get("stream_options")
            client_usage = isinstance(options, dict) and options.get("include_usage") is True
            if not client_usage and (options is None or isinstance(options, dict)):
                payload["stream_options"] = {**(options or {}), "include_usage": True}
                changed = True
        if changed:
            body = _encode_json(payload)
        return body, client_usage

    async def _forward(
        self, scope: Scope, receive: Any, send: Any, body: bytes, record: RequestRecord, client_usage: bool
    ) -> None:
        gateway = self.gateway
        task = asyncio.current_task()
        assert task is not None
        reply = Reply(send, receive, task)
        gateway.active.add(task)
        try:
            timeout = gateway.stream_timeout if record.stream else gateway.request_timeout
            async with gateway.session.request(
                scope["method"],
                URL(gateway.engine_url + scope["raw_path"].decode("latin-1") + _query(scope), encoded=True),
                data=body or None,
                headers=_forward_headers(scope, record.request_id),
                timeout=timeout,
                allow_redirects=False,
            ) as response:
                record.status = response.status
                headers = [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in response.headers.items()
                    if name.lower() not in RESPONSE_SKIP
                ]
                if response.content_type == "text/event-stream":
                    await reply.start(response.status, headers)
                    await self._relay_stream(reply, response, record, strip_usage=not client_usage)
                else:
                    payload = await response.read()
                    record.prompt_tokens, record.completion_tokens = read_json_usage(payload)
                    if response.status >= 400:
                        record.error_cause = "engine_error" if response.status >= 500 else "client_error"
                        reshaped = openai_error_body(response.status, payload)
                        if reshaped is not None:
                            payload = reshaped
                            headers = [item for item in headers if item[0] != b"content-type"]
                            headers.append((b"content-type", b"application/json"))
                    headers.append((b"content-length", str(len(payload)).encode()))
                    await reply.start(response.status, headers)
                    await reply.finish(payload)
        except asyncio.CancelledError:
            if not (reply.client_gone or gateway.aborting):
                raise
            task.uncancel()
            if reply.client_gone:
                record.status, record.error_cause = 499, "client_disconnected"
            else:
                await self._fail(reply, record, unavailable(
                    f"Server shut down before the request finished (DRAIN_TIMEOUT_S={gateway.settings.DRAIN_TIMEOUT_S:g}).",
                    code="drain_timeout",
                ))
        except asyncio.TimeoutError:
            limit = "STREAM_IDLE_TIMEOUT_S" if record.stream else "REQUEST_TIMEOUT_S"
            await self._fail(reply, record, APIError(
                504, f"The engine did not answer in time ({limit}); the request was aborted.",
                code="timeout", cause="timeout",
            ))
        except aiohttp.ClientConnectorError:
            gateway.readiness.mark_engine_failed()
            await self._fail(reply, record, await gateway.engine_unreachable_error())
        except (aiohttp.ClientError, OSError):
            gateway.readiness.mark_engine_failed()
            await self._fail(reply, record, APIError(
                502, "The engine closed the connection before the response was complete; it may have crashed.",
                code="engine_error", cause="engine_error",
            ))
        finally:
            reply.close()
            gateway.active.discard(task)
            record.finished = time.perf_counter()

    async def _relay_stream(
        self, reply: Reply, response: aiohttp.ClientResponse, record: RequestRecord, strip_usage: bool
    ) -> None:
        content = response.content
        usage = UsageFilter(strip=strip_usage)
        chunk = content.read_nowait()
        if not chunk and not content.at_eof():
            chunk = await self._first_chunk(reply, content)
        record.first_token_at = time.perf_counter()
        send = reply.send
        while chunk:
            chunk = usage.feed(chunk)
            if chunk:
                if chunk.endswith(DONE):
                    # The client now has the whole stream; hanging up (the openai SDK does so
                    # right after [DONE]) must not turn a finished request into an abort.
                    reply.disarm()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            chunk = await content.readany()
        record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        await reply.finish(usage.flush())

    async def _first_chunk(self, reply: Reply, content: aiohttp.StreamReader) -> bytes:
        """Wait for the engine's first bytes, sending SSE keep-alive comments meanwhile."""
        first_read = asyncio.ensure_future(content.readany())
        try:
            while True:
                done, _ = await asyncio.wait((first_read,), timeout=self.gateway.settings.SSE_KEEPALIVE_S)
                if done:
                    return first_read.result()
                await reply.chunk(KEEPALIVE)
        finally:
            if not first_read.done():
                first_read.cancel()

    async def _fail(self, reply: Reply, record: RequestRecord, error: APIError) -> None:
        """Report `error` as a JSON response, or as a final SSE event when a stream already began."""
        record.error_cause = error.cause
        if reply.completed or reply.client_gone:
            return
        if not reply.started:
            record.status = error.status
            await reply.error(error)
            return
        await reply.finish(b"data: " + error.json_bytes() + b"\n\n" + DONE)


class Reply:
    """The client side of one exchange: what was sent, and whether the client left.

    A watcher task waits for `http.disconnect` and cancels the relaying task,
    which closes the engine connection so the engine aborts the generation.
    It only fires while armed, i.e. before the last message is handed to the
    server, so a cancellation always lands inside the relay's own try block.
    """

    def __init__(self, send: Any, receive: Any, task: asyncio.Task[Any]) -> None:
        self.send = send
        self.started = False
        self.completed = False
        self.client_gone = False
        self._armed = True
        self._watcher = task.get_loop().create_task(self._watch(receive, task))

    async def _watch(self, receive: Any, task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self._armed:
                    self.client_gone = True
                    task.cancel()
                return

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, body: bytes) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self, body: bytes) -> None:
        self.disarm()
        self.completed = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def error(self, error: APIError) -> None:
        """The whole response: `error` as a JSON body."""
        self.disarm()
        self.completed = True
        await send_error(self.send, error)

    def disarm(self) -> None:
        self._armed = False

    def close(self) -> None:
        self._armed = False
        # Once the response is complete, the server answers the pending `receive`
        # with http.disconnect and the watcher ends by itself. Cancelling it would
        # leave a CancelledError whose traceback ties the request's objects into
        # a reference cycle, which only the garbage collector can free.
        if not self.completed:
            self._watcher.cancel()


def _encode_json(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (a legal JSON escape, not UTF-8) keeps its escape."""
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode()


def _query(scope: Scope) -> str:
    query = scope.get("query_string", b"")
    return "?" + query.decode("latin-1") if query else ""


def _forward_headers(scope: Scope, request_id: str) -> list[tuple[str, str]]:
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in scope["headers"]
        if name not in HOP_BY_HOP and name != b"x-request-id"
    ]
    headers.append(("x-request-id", request_id))
    return headers


async def read_body(receive: Any, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    declared = header(headers, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds MAX_REQUEST_BYTES ({limit} bytes).", code="request_too_large")


async def send_error(send: Any, error: APIError) -> None:
    body = error.json_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
