"""HTTP handlers of the simple-client API: `POST /generate` and `/conversations`.

The handlers take their dependencies from `request.app.state`, which the
application fills at start:

- `settings`: the `Settings` (engine URL, served model name, limits, timeouts);
- `upstream`: the `aiohttp.ClientSession` used to reach the engine;
- `conversations`: the started `ConversationStore`, or None when storage is off;
- `model_max_len`: the engine's context length in tokens, or None when unknown.

When `request.state.record` holds the request's `RequestRecord`, `/generate`
fills in the model, stream flag, first-token time and token counts for the
request log. The handlers are plain functions on `router`, so the application
can wrap them (auth, admission control, request log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app.config import Settings
from app.errors import APIError
from app.generate.engine import ChatMessage, ChatStream, count_prompt_tokens, open_chat_stream
from app.generate.history import FittedPrompt, fit_history
from app.generate.json_reply import parse_json_reply
from app.generate.schemas import (
    DEFAULT_MAX_TOKENS,
    ConversationDeletedOut,
    ConversationListOut,
    ConversationOut,
    ConversationSummaryOut,
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    TurnOut,
)
from app.generate.store import Conversation, ConversationStore, ConversationStoreError
from app.observability.record import RequestRecord

log = logging.getLogger(__name__)

router = APIRouter(tags=["simple client"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_KEEPALIVE = b": keep-alive\n\n"
SSE_END = b"data: [DONE]\n\n"
STORAGE_OFF = "Conversation storage is off (CONVERSATIONS_ENABLED=false)"


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Turn a database failure into a 503 the client can retry."""
    try:
        yield
    except ConversationStoreError as exc:
        raise APIError(
            503, f"{exc}. Retry later.", code="conversation_store_unavailable", cause="unavailable"
        ) from exc


def _require_store(request: Request) -> ConversationStore:
    store: ConversationStore | None = request.app.state.conversations
    if store is None:
        raise APIError(
            404, f"{STORAGE_OFF}; set CONVERSATIONS_ENABLED=true to keep conversations.", code="conversations_disabled"
        )
    return store


def _not_found(conversation_id: str, store: ConversationStore) -> APIError:
    return APIError(
        404,
        f"No conversation '{conversation_id}': it never existed, was deleted, or expired after "
        f"CONVERSATIONS_TTL_S={store.ttl_s:g}s idle. Omit conversation_id to start a new conversation.",
        param="conversation_id",
        code="conversation_not_found",
    )


def _effective_max_tokens(requested: int | None, cap: int, model_max_len: int | None) -> int:
    if requested is not None:
        return min(requested, cap)
    default = min(DEFAULT_MAX_TOKENS, cap)
    # Without an explicit value, a small context still leaves room for the prompt.
    return default if model_max_len is None else max(1, min(default, model_max_len // 2))


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


class _Generation:
    """One /generate call from the open engine stream to the finished reply."""

    def __init__(
        self,
        request: Request,
        body: GenerateRequest,
        chat: ChatStream,
        fitted: FittedPrompt,
        conversation_id: str | None,
        is_new_conversation: bool,
        max_tokens: int,
        started: float,
        engine_started: float,
    ) -> None:
        self._state = request.app.state
        self._record = getattr(request.state, "record", None)
        self._body = body
        self._chat = chat
        self._fitted = fitted
        self._conversation_id = conversation_id
        self._is_new_conversation = is_new_conversation
        self._max_tokens = max_tokens
        self._started = started
        self._engine_started = engine_started
        self._first_token_at: float | None = None
        self._finished_at: float | None = None
        self._pieces: list[str] = []

    async def texts(self) -> AsyncIterator[str]:
        async for text in self._chat.texts():
            if self._first_token_at is None:
                self._first_token_at = time.perf_counter()
                if isinstance(self._record, RequestRecord):
                    self._record.first_token_at = self._first_token_at
            self._pieces.append(text)
            yield text
        self._finished_at = time.perf_counter()

    def close(self) -> None:
        self._chat.close()

    def note_failure(self, error: APIError) -> None:
        """A stream that fails after its 200 status still counts as failed in the request log."""
        if isinstance(self._record, RequestRecord):
            self._record.error_cause = error.cause

    async def finish(self) -> GenerateResponse:
        """Store the exchange (when the conversation is kept) and build the reply."""
        text = "".join(self._pieces)
        store: ConversationStore | None = self._state.conversations
        if store is not None and self._conversation_id is not None:
            with _store_errors():
                stored = await store.append_exchange(
                    self._conversation_id,
                    self._body.system,
                    self._body.user_text,
                    text,
                    create=self._is_new_conversation,
                )
            if not stored:
                log.info("Conversation %s was deleted while generating; turn dropped", self._conversation_id)
        done = time.perf_counter()
        finished_at = self._finished_at or done
        generation_s = finished_at - self._engine_started
        tokens = self._chat.completion_tokens
        if isinstance(self._record, RequestRecord):
            self._record.prompt_tokens = self._chat.prompt_tokens
            self._record.completion_tokens = tokens
        settings: Settings = self._state.settings
        is_json, value = parse_json_reply(text)
        return GenerateResponse(
            response=text,
            conversation_id=self._conversation_id,
            model_info=ModelInfo(name=settings.served_model_name, max_model_len=self._state.model_max_len),
            finish_reason=self._chat.finish_reason,
            total_ms=_ms(done - self._started),
            ttft_ms=None if self._first_token_at is None else _ms(self._first_token_at - self._started),
            generation_ms=_ms(generation_s),
            prompt_tokens=self._chat.prompt_tokens,
            tokens_generated=tokens,
            tokens_per_second=round(tokens / generation_s, 2) if tokens and generation_s > 0 else None,
            response_json=value,
            response_is_json=is_json,
            max_tokens=self._max_tokens,
            max_tokens_clamped=self._body.max_tokens is not None and self._body.max_tokens > self._max_tokens,
            history_truncated=self._fitted.truncated,
        )


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def _with_keepalive(pieces: AsyncIterator[str], interval_s: float) -> AsyncIterator[str | None]:
    """Yield the pieces, and None each time `interval_s` passes without one (a slow prefill)."""
    next_piece: asyncio.Future[str] = asyncio.ensure_future(anext(pieces))
    try:
        while True:
            done, _ = await asyncio.wait({next_piece}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                text = next_piece.result()
            except StopAsyncIteration:
                return
            yield text
            next_piece = asyncio.ensure_future(anext(pieces))
    finally:
        next_piece.cancel()
        await asyncio.wait({next_piece})


async def _sse_events(generation: _Generation, keepalive_s: float) -> AsyncIterator[bytes]:
    """`data: {"text"}` per piece, then `data: {"done": true, ...reply}` (or `data: {"error"}`), then `[DONE]`."""
    try:
        async for text in _with_keepalive(generation.texts(), keepalive_s):
            yield SSE_KEEPALIVE if text is None else _event({"text": text})
        reply = await generation.finish()
        yield _event({"done": True, **reply.model_dump(mode="json")})
    except APIError as exc:
        generation.note_failure(exc)
        yield _event(exc.body())
    finally:
        generation.close()
    yield SSE_END


async def _load_conversation(store: ConversationStore | None, conversation_id: str | None) -> Conversation | None:
    if conversation_id is None:
        return None
    if store is None:
        raise APIError(
            400,
            f"{STORAGE_OFF}: omit conversation_id, or set CONVERSATIONS_ENABLED=true on the server.",
            param="conversation_id",
            code="conversations_disabled",
        )
    with _store_errors():
        conversation = await store.get(conversation_id)
    if conversation is None:
        raise _not_found(conversation_id, store)
    return conversation


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse | StreamingResponse:
    """Generate a reply to `prompt`, optionally continuing a stored conversation."""
    started = time.perf_counter()
    state = request.app.state
    settings: Settings = state.settings
    store: ConversationStore | None = state.conversations
    model_max_len: int | None = state.model_max_len
    session: aiohttp.ClientSession = state.upstream
    record = getattr(request.state, "record", None)
    if isinstance(record, RequestRecord):
        record.model = settings.served_model_name
        record.stream = body.stream

    max_tokens = _effective_max_tokens(body.max_tokens, settings.MAX_TOKENS_CAP, model_max_len)
    if model_max_len is not None and max_tokens >= model_max_len:
        raise APIError(
            400,
            f"max_tokens={max_tokens} leaves no room for the prompt in the model's context of {model_max_len} "
            "tokens: lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    conversation = await _load_conversation(store, body.conversation_id)
    conversation_id = body.conversation_id or (uuid.uuid4().hex if store is not None else None)
    system = body.system if body.system is not None else (conversation.system if conversation else None)
    timeout = aiohttp.ClientTimeout(total=settings.REQUEST_TIMEOUT_S, sock_read=settings.STREAM_IDLE_TIMEOUT_S)

    async def count_tokens(messages: list[ChatMessage]) -> int:
        return await count_prompt_tokens(session, settings.engine_url, settings.served_model_name, messages, timeout)

    fitted = await fit_history(
        system,
        conversation.messages() if conversation else [],
        body.user_text,
        None if model_max_len is None else model_max_len - max_tokens,
        count_tokens,
    )
    engine_started = time.perf_counter()
    chat = await open_chat_stream(
        session, settings.engine_url, settings.served_model_name, fitted.messages, max_tokens, body.temperature, timeout
    )
    generation = _Generation(
        request, body, chat, fitted, conversation_id, conversation is None, max_tokens, started, engine_started
    )
    if body.stream:
        return StreamingResponse(
            _sse_events(generation, settings.SSE_KEEPALIVE_S), media_type="text/event-stream", headers=SSE_HEADERS
        )
    try:
        async for _ in generation.texts():
            pass
    finally:
        generation.close()
    return await generation.finish()


@router.get("/conversations", response_model=ConversationListOut)
async def list_conversations(
    request: Request, limit: int = Query(100, ge=1, le=1000, description="Most conversations to list.")
) -> ConversationListOut:
    """Stored conversations, most recently updated first."""
    store = _require_store(request)
    with _store_errors():
        summaries = await store.list_recent(limit)
    return ConversationListOut(data=[
        ConversationSummaryOut(id=s.id, created=s.created, updated=s.updated, turn_count=s.turn_count)
        for s in summaries
    ])


@router.get("/conversations/{conversation_id}", response_model=ConversationOut)
async def get_conversation(conversation_id: str, request: Request) -> ConversationOut:
    """One conversation with its turns in order."""
    store = _require_store(request)
    with _store_errors():
        conversation = await store.get(conversation_id)
    if conversation is None:
        raise _not_found(conversation_id, store)
    return ConversationOut(
        id=conversation.id,
        created=conversation.created,
        updated=conversation.updated,
        turn_count=len(conversation.turns),
        system=conversation.system,
        turns=[TurnOut(role=t.role, content=t.content, created=t.created) for t in conversation.turns],
    )


@router.delete("/conversations/{conversation_id}", response_model=ConversationDeletedOut)
async def delete_conversation(conversation_id: str, request: Request) -> ConversationDeletedOut:
    """Delete a conversation and its turns."""
    store = _require_store(request)
    with _store_errors():
        deleted = await store.delete(conversation_id)
    if not deleted:
        raise _not_found(conversation_id, store)
    return ConversationDeletedOut(id=conversation_id)
