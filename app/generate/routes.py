"""HTTP handlers of the simple-client API: `POST /generate` and `/conversations`.

`/generate` is a client of the same request path as `/v1`: the front door has
checked its key, body size and read deadline and holds its engine slot; it
reaches the engine through the one engine client, and answers through
`serve_exchange` like the relay (keep-alives before the first token, an
error event and `[DONE]` when a stream fails, 499 when the client leaves, the
drain deadline's error event). What is its own: conversations, fitting their
history into the context, and the reply's shape with its timings.

Handlers get what they need from `GenerateService`, handed to `build_router`
by the application; nothing comes from `app.state`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.config import Settings
from app.errors import APIError
from app.frontdoor import CALLER_STATE
from app.generate.engine import ChatMessage, ChatStream, chat_stream, count_prompt_tokens
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
from app.generate.store import Conversation, ConversationStore, ConversationStoreError, owner_of
from app.observability.record import RequestRecord
from app.proxy.engine import EngineClient
from app.proxy.models import ModelRouter, keepalive_wait, plain_wait
from app.proxy.reply import DONE, SSE_HEADERS, Reply, serve_exchange
from app.request_progress import progress_of

log = logging.getLogger(__name__)

JSON_HEADERS = [(b"content-type", b"application/json")]
STORAGE_OFF = "Conversation storage is off (CONVERSATIONS_ENABLED=false)"


class ExchangeResponse(Response):
    """A FastAPI return value that hands the ASGI exchange to `serve_exchange`, like the relay."""

    def __init__(self, work: Callable[[Reply], Awaitable[None]]) -> None:
        self._work = work
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await serve_exchange(send, receive, scope["state"]["record"], self._work, progress_of(scope))


class GenerateService:
    """What `/generate` and `/conversations` need: the settings, the engine client, the store, the models."""

    def __init__(
        self, settings: Settings, engine: EngineClient, store: ConversationStore | None,
        models: ModelRouter | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.models = models  # with MODELS: the request's `model` picks the engine

    async def generate(self, body: GenerateRequest, owner: str, record: RequestRecord, reply: Reply) -> None:
        record.stream = body.stream
        if self.models is None:
            record.model = self._single_model(body.model)
            await self._generate(body, owner, record, reply, None)
            return
        record.model = self.models.check(body.model)
        asked = time.perf_counter()
        wait = keepalive_wait(reply, self.settings.SSE_KEEPALIVE_S) if body.stream else plain_wait
        async with self.models.lease(record.model, wait) as engine_url:
            record.load_wait_s = time.perf_counter() - asked
            await self._generate(body, owner, record, reply, engine_url)

    def _single_model(self, model: str | None) -> str:
        """The served name; a `model` other than one of its names gets the 404 that lists them."""
        names = self.settings.served_model_names
        if model is not None and model not in names:
            raise APIError(404, f"The model '{model[:256]}' does not exist; this server serves: {', '.join(names)}.",
                           param="model", code="model_not_found")
        return self.settings.served_model_name

    async def _generate(
        self, body: GenerateRequest, owner: str, record: RequestRecord, reply: Reply, engine_url: str | None
    ) -> None:
        """One /generate exchange with the engine at `engine_url` (None: the single model's)."""
        settings = self.settings
        model = record.model
        assert model is not None
        model_max_len = (await self.engine.facts(engine_url)).get("max_model_len")
        max_tokens = _effective_max_tokens(body.max_tokens, settings.MAX_TOKENS_CAP, model_max_len)
        if model_max_len is not None and max_tokens >= model_max_len:
            raise APIError(
                400,
                f"max_tokens={max_tokens} leaves no room for the prompt in the model's context of {model_max_len} "
                "tokens: lower max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        conversation = await self._load(body.conversation_id, owner)
        conversation_id = body.conversation_id or (uuid.uuid4().hex if self.store is not None else None)
        system = body.system if body.system is not None else (conversation.system if conversation else None)

        async def count_tokens(messages: list[ChatMessage]) -> int:
            return await count_prompt_tokens(self.engine, model, messages, engine_url)

        fitted = await fit_history(
            system,
            conversation.messages() if conversation else [],
            body.user_text,
            None if model_max_len is None else model_max_len - max_tokens,
            count_tokens,
        )
        engine_started = time.perf_counter()
        pieces: list[str] = []
        async with chat_stream(
            self.engine, model, fitted.messages, max_tokens, body.temperature, engine_url
        ) as chat:
            if body.stream and not reply.started:  # a stream that waited for its model began with keep-alives
                await reply.start(200, SSE_HEADERS)
            async for text in chat.pieces(reply if body.stream else None, settings.SSE_KEEPALIVE_S):
                if record.first_token_at is None:
                    record.first_token_at = time.perf_counter()
                pieces.append(text)
                if body.stream:
                    await reply.chunk(_event({"text": text}))
        finished = time.perf_counter()
        record.prompt_tokens, record.completion_tokens = chat.prompt_tokens, chat.completion_tokens
        text = "".join(pieces)
        if conversation_id is not None:
            conversation_id = await self._store_exchange(conversation_id, owner, body, text, conversation is None)
        answer = self._answer(body, record, chat, fitted, text, conversation_id, max_tokens, model_max_len,
                              engine_started, finished)
        if body.stream:
            await reply.finish(_event({"done": True, **answer.model_dump(mode="json")}) + DONE)
        else:
            await reply.start(200, JSON_HEADERS)
            await reply.finish(answer.model_dump_json().encode())

    def _answer(
        self,
        body: GenerateRequest,
        record: RequestRecord,
        chat: ChatStream,
        fitted: FittedPrompt,
        text: str,
        conversation_id: str | None,
        max_tokens: int,
        model_max_len: int | None,
        engine_started: float,
        finished: float,
    ) -> GenerateResponse:
        done = time.perf_counter()
        generation_s = finished - engine_started
        tokens = chat.completion_tokens
        is_json, value = parse_json_reply(text)
        return GenerateResponse(
            response=text,
            conversation_id=conversation_id,
            model_info=ModelInfo(name=str(record.model), max_model_len=model_max_len),
            finish_reason=chat.finish_reason,
            total_ms=_ms(done - record.started),
            ttft_ms=None if record.first_token_at is None else _ms(record.first_token_at - record.started),
            generation_ms=_ms(generation_s),
            prompt_tokens=chat.prompt_tokens,
            tokens_generated=tokens,
            tokens_per_second=round(tokens / generation_s, 2) if tokens and generation_s > 0 else None,
            response_json=value,
            response_is_json=is_json,
            max_tokens=max_tokens,
            max_tokens_clamped=body.max_tokens is not None and body.max_tokens > max_tokens,
            history_truncated=fitted.truncated,
        )

    async def _load(self, conversation_id: str | None, owner: str) -> Conversation | None:
        if conversation_id is None:
            return None
        if self.store is None:
            raise APIError(
                400,
                f"{STORAGE_OFF}: omit conversation_id, or set CONVERSATIONS_ENABLED=true on the server.",
                param="conversation_id",
                code="conversations_disabled",
            )
        with _store_errors():
            conversation = await self.store.get(conversation_id, owner=owner)
        if conversation is None:
            raise _not_found(conversation_id, self.store)
        return conversation

    async def _store_exchange(
        self, conversation_id: str, owner: str, body: GenerateRequest, text: str, new: bool
    ) -> str | None:
        """Keep the turn; returns the conversation id to send back (None: a new one could not be stored).

        A new conversation whose store is down still gets its reply, unsaved; a
        turn of an existing conversation that cannot be stored is a 503, since
        the client expects it continued.
        """
        assert self.store is not None
        try:
            stored = await self.store.append_exchange(
                conversation_id, body.system, body.user_text, text, owner=owner, create=new
            )
        except ConversationStoreError as exc:
            if not new:
                raise _store_unavailable(exc) from exc
            log.warning("Reply sent without a conversation id: %s", exc)
            return None
        if not stored:
            log.info("Conversation %s was deleted while generating; turn dropped", conversation_id)
        return conversation_id

    def require_store(self) -> ConversationStore:
        if self.store is None:
            raise APIError(
                404, f"{STORAGE_OFF}; set CONVERSATIONS_ENABLED=true to keep conversations.",
                code="conversations_disabled",
            )
        return self.store


def build_router(service: GenerateService) -> APIRouter:
    router = APIRouter(tags=["simple client"])

    @router.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate a reply to `prompt`, optionally continuing a stored conversation."""
        record: RequestRecord = request.scope["state"]["record"]
        owner = caller_owner(request)

        async def work(reply: Reply) -> None:
            await service.generate(body, owner, record, reply)

        return ExchangeResponse(work)

    @router.get("/conversations", response_model=ConversationListOut)
    async def list_conversations(
        request: Request, limit: int = Query(100, ge=1, le=1000, description="Most conversations to list.")
    ) -> ConversationListOut:
        """Your stored conversations (those made with the same API key), most recently updated first."""
        store = service.require_store()
        with _store_errors():
            summaries = await store.list_recent(limit, owner=caller_owner(request))
        return ConversationListOut(data=[
            ConversationSummaryOut(id=s.id, created=s.created, updated=s.updated, turn_count=s.turn_count)
            for s in summaries
        ])

    @router.get("/conversations/{conversation_id}", response_model=ConversationOut)
    async def get_conversation(conversation_id: str, request: Request) -> ConversationOut:
        """One of your conversations with its turns in order."""
        store = service.require_store()
        with _store_errors():
            conversation = await store.get(conversation_id, owner=caller_owner(request))
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
        """Delete one of your conversations and its turns."""
        store = service.require_store()
        with _store_errors():
            deleted = await store.delete(conversation_id, owner=caller_owner(request))
        if not deleted:
            raise _not_found(conversation_id, store)
        return ConversationDeletedOut(id=conversation_id)

    return router


def caller_owner(request: Request) -> str:
    """Whose conversations these are: a hash of the API key the front door accepted ("" without keys)."""
    return owner_of(request.scope["state"].get(CALLER_STATE))


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Turn a database failure into a 503 the client can retry."""
    try:
        yield
    except ConversationStoreError as exc:
        raise _store_unavailable(exc) from exc


def _store_unavailable(exc: ConversationStoreError) -> APIError:
    return APIError(
        503, f"{exc}. Retry later.", code="conversation_store_unavailable", cause="unavailable",
        headers={"Retry-After": "5"},
    )


def _not_found(conversation_id: str, store: ConversationStore) -> APIError:
    return APIError(
        404,
        f"No conversation '{conversation_id}': it never existed, was deleted, expired after "
        f"CONVERSATIONS_TTL_S={store.ttl_s:g}s idle, or belongs to another API key. On a RunPod "
        "Serverless endpoint with several workers it may be stored by another worker: send back the "
        "X-Runpod-Worker-Id header of the conversation's replies (client_example.py does), or set "
        "CONVERSATIONS_DB_URL for a store all workers share. Omit conversation_id to start a new conversation.",
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


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"
