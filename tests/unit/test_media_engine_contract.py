"""The wrapper reads every route's media exactly where the installed engine does.

The walkers in `app.media` mirror the engine's request models and
converters (chat parts, Responses items, Anthropic blocks, pooling and
scoring inputs). If an engine upgrade moved media somewhere else, a URL
could reach the engine unchecked. So each body here goes through the
engine's own code: its request model, its converter (Anthropic -> chat,
Responses -> chat, score inputs) and its content-part parser, which yields
the URLs the engine would load. The wrapper must find exactly those, and
after it writes checked media back, the engine (validating the body again)
must load exactly what the wrapper wrote.

Importing the engine's code loads vLLM (about 10-30 s on the project's
machines); no engine process is started.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import TypeAdapter

from app.config import load_settings
from app.errors import APIError
from app.media import MediaFetcher, MediaPolicy, prepare_media
from app.media.dataurl import DataUrl
from app.media.parts import ENGINE_PART_TYPES
from app.media.routes import ROUTES
from app.media.walk import Walk

chat_utils = pytest.importorskip("vllm.renderers.chat_utils", reason="the vLLM engine is not installed")

from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.protocol import (
    BatchChatCompletionRequest,
    ChatCompletionRequest,
)
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.utils import construct_input_messages
from vllm.entrypoints.pooling.classify.protocol import ClassificationRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
from vllm.entrypoints.pooling.pooling.protocol import PoolingRequest
from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest
from vllm.entrypoints.pooling.scoring.utils import validate_score_input
from vllm.entrypoints.serve.tokenize.protocol import TokenizeRequest

PRIVATE = "http://10.0.0.1/x"
URL_PART_TYPES = {"image_url", "input_image", "video_url", "audio_url"}
MEDIA_PART_TYPES = {"image_url", "input_image", "video_url"}
WRITTEN = DataUrl("image/png", "iVBORw0KGgo=")


# --- What the engine loads, by its own code --------------------------------------------


def urls_of_parts(parts: Any) -> list[str]:
    urls = []
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, dict):
            part_type, content = chat_utils._parse_chat_message_content_mm_part(part)
            if part_type in MEDIA_PART_TYPES and isinstance(content, str):
                urls.append(content)
    return urls


def urls_of_messages(messages: Any) -> list[str]:
    return [url for message in messages for url in urls_of_parts(dict(message).get("content"))]


def urls_of_scoring(data_1: Any, data_2: Any) -> list[str]:
    scoring = validate_score_input(data_1, data_2, is_multimodal_model=True, architecture="test")
    return [url for data in scoring.data_1 + scoring.data_2 for url in urls_of_parts(data)]


def _conversations(request: Any) -> list[Any]:
    messages = request.messages
    return [m for conversation in messages for m in conversation] if isinstance(messages[0], list) else messages


def engine_urls(route: str, body: dict[str, Any]) -> list[str]:
    """The media URLs the engine loads for this body on this route (validating it first)."""
    body = {"model": "m", **copy.deepcopy(body)}
    if route in ("/v1/chat/completions", "/v1/chat/completions/render"):
        return urls_of_messages(ChatCompletionRequest.model_validate(body).messages)
    if route == "/v1/chat/completions/batch":
        return urls_of_messages(_conversations(BatchChatCompletionRequest.model_validate(body)))
    if route == "/tokenize":
        return urls_of_messages(TypeAdapter(TokenizeRequest).validate_python(body).messages)
    if route == "/v1/responses":
        request = ResponsesRequest.model_validate(body)
        return urls_of_messages(construct_input_messages(request_instructions=None, request_input=request.input))
    if route in ("/v1/messages", "/v1/messages/count_tokens"):
        model = AnthropicMessagesRequest if route == "/v1/messages" else AnthropicCountTokensRequest
        chat = AnthropicServingMessages.to_chat_completion_request(model.model_validate(body))
        return urls_of_messages(chat.messages)
    if route in ("/v1/embeddings", "/pooling", "/classify"):
        adapter = {"/v1/embeddings": EmbeddingRequest, "/pooling": PoolingRequest, "/classify": ClassificationRequest}
        request = TypeAdapter(adapter[route]).validate_python(body)
        return urls_of_messages(_conversations(request)) if hasattr(request, "messages") else []
    if route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        request = RerankRequest.model_validate(body)
        return urls_of_scoring(request.query, request.documents)
    request = TypeAdapter(ScoreRequest).validate_python(body)
    return urls_of_scoring(request.data_1, request.data_2)


def wrapper_walk(route: str, body: dict[str, Any]) -> Walk:
    walk = Walk()
    ROUTES[route].walker(body, walk)
    return walk


# --- Bodies: every shape that carries media, on every route -----------------------------


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def input_image(url: str) -> dict[str, Any]:
    return {"type": "input_image", "image_url": url, "detail": "auto"}


def anthropic_url(url: str) -> dict[str, Any]:
    return {"type": "image", "source": {"type": "url", "url": url}}


ANTHROPIC_BASE64 = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "a"}, image("http://a.test/1"), video("http://a.test/v")]},
    {"role": "assistant", "content": [image("http://a.test/2")]},
    {"role": "user", "content": [{"image_url": "http://a.test/3"}, {"type": "image_url", "uuid": "u",
                                                                     "image_url": {"url": "http://a.test/4"}}]},
]  # fmt: skip
ANTHROPIC = [
    {"role": "system", "content": [{"type": "text", "text": "sys"}]},
    {"role": "user", "content": [{"type": "text", "text": "a"}, anthropic_url("http://a.test/1"), ANTHROPIC_BASE64]},
    {"role": "assistant", "content": [anthropic_url("http://a.test/2"),
                                      {"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "text", "text": "r"}, anthropic_url("http://a.test/3"), {"type": "image", "source": {"type": "url"}},
        {"type": "image", "source": {"type": "base64", "data": "BBBB"}}]}]},
    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        anthropic_url("http://a.test/as-text")]}]},
]  # fmt: skip
RESPONSES_INPUT = [
    {"role": "user", "content": [{"type": "input_text", "text": "a"}, input_image("http://a.test/1")]},
    {"role": "assistant", "content": [input_image("http://a.test/2"), {"type": "input_text", "text": "b"}]},
    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c", "output": [input_image("http://a.test/3")]},
    {"role": "user", "content": "plain"},
    {"type": "function_call", "call_id": "d", "name": "f", "arguments": "{}"},
    # The engine reads the output by the item's type, whatever else the item has.
    {"type": "function_call_output", "role": "user", "call_id": "d", "output": [input_image("http://a.test/4")]},
]
SCORE_DOCS = ["text", {"content": [image("http://a.test/d1")]}, {"content": [video("http://a.test/d2")]}]

CASES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/chat/completions/render", {"messages": CHAT}),
    ("/v1/chat/completions/batch", {"messages": [CHAT[1:2], CHAT[2:]]}),
    ("/tokenize", {"messages": CHAT}),
    ("/v1/responses", {"input": RESPONSES_INPUT}),
    ("/v1/messages", {"max_tokens": 4, "messages": ANTHROPIC}),
    ("/v1/messages", {"max_tokens": 4, "system": "s", "messages": ANTHROPIC[1:2]}),
    ("/v1/messages/count_tokens", {"messages": ANTHROPIC}),
    ("/v1/embeddings", {"messages": CHAT}),
    ("/v1/embeddings", {"input": CHAT}),
    ("/v1/embeddings", {"input": [CHAT[1:2], CHAT[2:]]}),
    ("/v1/embeddings", {"input": ["just", "text"]}),
    ("/pooling", {"messages": CHAT}),
    ("/classify", {"messages": CHAT}),
    ("/rerank", {"query": {"content": [image("http://a.test/q")]}, "documents": SCORE_DOCS}),
    ("/v1/rerank", {"query": "q", "documents": SCORE_DOCS}),
    ("/v2/rerank", {"query": "q", "documents": SCORE_DOCS}),
    ("/score", {"queries": "q", "documents": SCORE_DOCS}),
    ("/v1/score", {"queries": {"content": [image("http://a.test/q")]}, "items": SCORE_DOCS[1:]}),
    ("/score", {"data_1": "q", "data_2": SCORE_DOCS}),
    ("/score", {"text_1": ["q1", "q2"], "text_2": SCORE_DOCS[1:]}),
]


@pytest.mark.parametrize(("route", "body"), CASES, ids=[case[0] for case in CASES])
def test_the_wrapper_finds_exactly_the_media_the_engine_loads(route: str, body: dict[str, Any]) -> None:
    found = [ref.url for ref in wrapper_walk(route, copy.deepcopy(body)).media]
    assert sorted(found) == sorted(engine_urls(route, body))


@pytest.mark.parametrize(("route", "body"), CASES, ids=[case[0] for case in CASES])
def test_the_engine_loads_what_the_wrapper_writes_back(route: str, body: dict[str, Any]) -> None:
    body = copy.deepcopy(body)
    walk = wrapper_walk(route, body)
    for ref in walk.media:
        ref.write(WRITTEN)
    assert engine_urls(route, body) == [WRITTEN.url] * len(walk.media)


def test_the_engine_part_types_are_the_ones_the_wrapper_knows() -> None:
    assert set(chat_utils.MM_PARSER_MAP) == ENGINE_PART_TYPES


# --- Every chat part from which the engine would take a URL is checked ------------------

SHAPES: list[dict[str, Any]] = [
    {"type": "image_url", "image_url": {"url": PRIVATE}},
    {"type": "image_url", "image_url": {"url": PRIVATE, "detail": "low"}},
    {"type": "input_image", "image_url": PRIVATE, "detail": "auto"},
    {"type": "video_url", "video_url": {"url": PRIVATE}},
    {"type": "audio_url", "audio_url": {"url": PRIVATE}},
    {"image_url": PRIVATE},
    {"image_url": {"url": PRIVATE}},
    {"video_url": PRIVATE},
    {"video_url": {"url": PRIVATE}},
    {"audio_url": PRIVATE},
    {"image_url": PRIVATE, "video_url": PRIVATE},
    {"image_embeds": "AAAA", "video_url": PRIVATE},
    {"input_audio": {"data": "AAAA", "format": "wav"}, "video_url": PRIVATE},
    {"type": "image_url", "uuid": "u1", "image_url": PRIVATE},
    {"type": "image_url", "uuid": "u1", "image_url": {"url": PRIVATE}},
    {"type": "video_url", "uuid": "u1", "video_url": PRIVATE},
    {"type": "text", "uuid": "u1", "image_url": PRIVATE},
    {"type": "text", "text": "hi", "image_url": PRIVATE},
    {"type": "refusal", "refusal": "no", "video_url": PRIVATE},
    {"type": "image_embeds", "image_embeds": "AAAA", "image_url": PRIVATE},
    {"type": "tool_reference", "name": "t", "image_url": PRIVATE},
]
# What the engine reads from a part that the wrapper refuses whatever its URL.
UNCHECKABLE = {"image_embeds", "audio_embeds", "video_embeds", "prompt_embeds", "image_pil"}


@pytest.mark.parametrize("part", SHAPES, ids=lambda part: ",".join(f"{k}" for k in part))
async def test_every_part_the_engine_would_fetch_or_cannot_be_checked_is_refused(part: dict[str, Any]) -> None:
    policy = MediaPolicy.from_settings(load_settings({"IMAGE_LIMIT": "4"}), frozenset({"text", "image", "video"}))
    body = {"messages": [{"role": "user", "content": [dict(part)]}]}
    part_type, content = chat_utils._parse_chat_message_content_mm_part(part)
    refused = (part_type in URL_PART_TYPES and content == PRIVATE) or part_type in UNCHECKABLE
    async with MediaFetcher(policy.urls) as fetcher:
        if refused:
            with pytest.raises(APIError) as caught:
                await prepare_media("/v1/chat/completions", body, policy, fetcher)
            assert caught.value.status == 400
            assert caught.value.param is not None and caught.value.param.startswith("messages[0].content[0]")
        else:
            await prepare_media("/v1/chat/completions", body, policy, fetcher)
