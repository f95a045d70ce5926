"""The engine relay: one request from the client socket to the engine and back.

The front door (`app.frontdoor`) has already checked the key, the route, the
body's size and read deadline, and holds the request's engine slot. Here:

1. a JSON body is parsed for the model and stream flag, its media checked
   and made inline (`MediaService.prepare`), and for streams the engine is
   asked for a usage block (stripped again if the client did not ask for it);
   a multipart body (audio) is relayed as it is;
2. the request goes to the engine on the shared connection pool
   (`EngineClient.call`), and the answer comes back chunk by chunk as it
   arrives, with keep-alive comments before the first token. With MODELS,
   the engine is the one of the model the body names, leased (and loaded
   if needed) through `app.proxy.models.ModelRouter`; /v1/models is answered
   here with every model's state.

This is the hot path of every token, so it is plain ASGI, not a FastAPI
route: no routing table, no response classes, no per-chunk allocations
beyond the chunk itself. Failures are answered by `serve_exchange` (a JSON
error, or an error event once a stream began).
"""

from __future__ import annotations

import json
import time
from typing import Any

from app import json_codec
from app.auth import header
from app.config import Settings
from app.errors import APIError, openai_error_body
from app.media.service import MediaService
from app.observability.record import RequestRecord
from app.proxy.engine import EngineClient
from app.proxy.form_model import form_model
from app.proxy.models import ModelRouter, keepalive_wait, plain_wait
from app.proxy.reply import DONE, Reply, serve_exchange
from app.proxy.upstream import UpstreamResponse
from app.proxy.usage import UsageFilter, read_json_usage
from app.request_progress import progress_of
from app.routes import Route, canonical_path

Scope = dict[str, Any]

MODELS_PATH = "/v1/models"
# How vLLM begins a stream that it ends at once with an error.
ERROR_EVENT = b'data: {"error"'
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
HOP_BY_HOP = frozenset(
    {
        b"host", b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"authorization",
        b"expect",
    }
)
RESPONSE_SKIP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})


class Relay:
    def __init__(
        self, settings: Settings, engine: EngineClient, media: MediaService, models: ModelRouter | None = None
    ) -> None:
        self._engine = engine
        self._models = models
        self._media = media
        self._served_model = settings.served_model_name
        self._served_names = frozenset(settings.served_model_names)
        self._keepalive_s = settings.SSE_KEEPALIVE_S

    async def __call__(
        self, scope: Scope, receive: Any, send: Any, route: Route, body: bytes, record: RequestRecord
    ) -> None:
        async def relay(reply: Reply) -> None:
            if self._models is not None and route.label == MODELS_PATH:
                record.status = 200
                await _send_json(reply, self._models.listing())
                return
            prepared, strip_usage = await self._prepare(scope, route, body, record)
            if self._models is None:
                await self._forward(reply, scope, prepared, record, strip_usage, self._engine.url)
                return
            asked = time.perf_counter()
            wait = keepalive_wait(reply, self._keepalive_s) if record.stream else plain_wait
            async with self._models.lease(record.model, wait) as url:
                record.load_wait_s = time.perf_counter() - asked
                await self._forward(reply, scope, prepared, record, strip_usage, url)

        try:
            await serve_exchange(send, receive, record, relay, progress_of(scope))
        finally:
            record.finished = time.perf_counter()

    async def _prepare(self, scope: Scope, route: Route, body: bytes, record: RequestRecord) -> tuple[bytes, bool]:
        """Check the body; returns (body to send, whether to strip the usage block the wrapper asked for)."""
        record.model = self._served_model
        if self._models is not None and not (route.body in ("json", "multipart") and scope["method"] == "POST"):
            raise APIError(
                400, f"{route.label} names no model, so a multi-model deployment (MODELS) cannot tell which "
                "engine should answer it; use a POST route whose body names the model.", code="unsupported_route",
            )
        if route.body == "multipart":
            content_type = header(scope["headers"], b"content-type") or b""
            if not content_type.lower().startswith(b"multipart/form-data"):
                raise APIError(
                    400, f"{route.label} takes a multipart/form-data body (the audio file and its fields).",
                    code="invalid_content_type",
                )
            if self._models is not None:
                record.model = self._models.check(form_model(body, content_type))
            return body, False
        if route.body != "json" or scope["method"] != "POST":
            return b"", False
        payload = parse_json_object(body)
        model = payload.get("model")
        if self._models is not None:
            record.model = self._models.check(model)
        elif isinstance(model, str):
            # Every name the model is served under counts as the one it reports.
            record.model = self._served_model if model in self._served_names else model
        counts = await self._media.prepare(route.label, payload, record.model if self._models is not None else None)
        record.text_parts, record.images, record.videos = counts.text, counts.image, counts.video
        changed = counts.changed
        strip_usage = False
        if payload.get("stream") is True:
            record.stream = True
            if route.label in GENERATION_PATHS:
                asked = usage_options(payload.get("stream_options"))
                if asked is not None:  # the wrapper asks for the usage block: it takes it out again
                    payload["stream_options"] = asked
                    changed = strip_usage = True
        return (encode_json(payload) if changed else body), strip_usage

    async def _forward(
        self, reply: Reply, scope: Scope, body: bytes, record: RequestRecord, strip_usage: bool, engine_url: str
    ) -> None:
        path = canonical_path(scope["raw_path"].decode("latin-1")) + _query(scope)
        async with self._engine.call(
            scope["method"], path, body=body or None, headers=_forward_headers(scope, record.request_id),
            stream=record.stream, base_url=engine_url,
        ) as response:
            record.status = response.status
            headers = _response_headers(response, engine_url)
            if response.content_type == "text/event-stream":
                await self._relay_stream(reply, response, headers, record, strip_usage)
                return
            payload = answer = await response.read()
            if reply.started:
                # The stream began while the model loaded; the engine's refusal becomes its last event.
                record.error_cause = "engine_error" if response.status >= 500 else "client_error"
                await reply.finish(b"data: " + (openai_error_body(response.status, payload) or payload) + b"\n\n" + DONE)
                return
            if response.status >= 400:
                record.error_cause = "engine_error" if response.status >= 500 else "client_error"
                reshaped = openai_error_body(response.status, payload)
                if reshaped is not None:
                    answer = reshaped
                    headers = [item for item in headers if item[0] != b"content-type"]
                    headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(answer)).encode()))
            await reply.start(response.status, headers)
            await reply.finish(answer)
            # The client has its answer (the write happened above): the counting is off its path.
            record.prompt_tokens, record.completion_tokens = read_json_usage(payload)

    async def _relay_stream(
        self,
        reply: Reply,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        record: RequestRecord,
        strip_usage: bool,
    ) -> None:
        """Relay an event stream; one whose first event is the engine's refusal is answered as that error.

        The response begins with the first event (or with a keep-alive, when the
        engine is silent that long; a stream that waited for its model began with
        keep-alives already), so a request the engine refuses only after it began
        its stream (vLLM 0.32: an empty completions prompt) still gets its 4xx.
        """
        content = response.content
        usage = UsageFilter(strip=strip_usage)
        chunk = content.read_nowait()
        if not chunk and not content.at_eof():
            chunk = await reply.first_chunk(content.readany(), self._keepalive_s, start=(response.status, headers))
        if not reply.started:
            while chunk.startswith(ERROR_EVENT) and b"\n\n" not in chunk and not content.at_eof():
                chunk += await content.readany()
            refusal = _refusal(chunk)
            if refusal is not None:
                record.status, answer = refusal
                record.error_cause = "engine_error" if record.status >= 500 else "client_error"
                await _send_json(reply, answer, record.status)
                return
            await reply.start(response.status, headers)
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


def _response_headers(response: UpstreamResponse, engine_url: str) -> list[tuple[bytes, bytes]]:
    headers = []
    for name, value in response.headers:
        lower = name.lower()
        if lower in RESPONSE_SKIP:
            continue
        if lower == b"location":
            # The engine's own address means nothing to a client: make the redirect relative.
            own = engine_url.encode("latin-1")
            if value.startswith(own):
                value = value[len(own):] or b"/"
        headers.append((lower, value))
    return headers


async def _send_json(reply: Reply, payload: bytes, status: int = 200) -> None:
    await reply.start(status, [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())])
    await reply.finish(payload)


def _refusal(chunk: bytes) -> tuple[int, bytes] | None:
    """(status, OpenAI error body) when the stream's first event is an error, else None."""
    if not chunk.startswith(ERROR_EVENT):
        return None
    event = chunk[len(b"data: "):].split(b"\n\n", 1)[0]
    try:
        error = json.loads(event)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return status, openai_error_body(status, event) or event


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        payload = json_codec.loads(body)
    except ValueError:
        raise APIError(400, "Request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "Request body is nested too deeply; flatten the JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_json")
    return payload


def usage_options(options: object) -> dict[str, Any] | None:
    """The stream_options to send instead of the client's, or None to send them as they are.

    The wrapper needs the engine's usage block to count tokens. When the client
    did not ask for it, it is asked for, without per-chunk usage
    (`continuous_usage_stats` only applies with `include_usage`: the client
    would not have received it), and `UsageFilter` removes it again.
    """
    if options is not None and not isinstance(options, dict):
        return None  # the engine refuses it with its own 400
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None  # the client asked for it: its stream carries it
    return {**(options or {}), "include_usage": True, "continuous_usage_stats": False}


def encode_json(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (a legal JSON escape, not UTF-8) keeps its escape."""
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode()


def _query(scope: Scope) -> str:
    query = scope.get("query_string", b"")
    return "?" + query.decode("latin-1") if query else ""


def _forward_headers(scope: Scope, request_id: str) -> list[tuple[bytes, bytes]]:
    headers = [(name, value) for name, value in scope["headers"] if name not in HOP_BY_HOP and name != b"x-request-id"]
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    return headers
