"""prepare_media on every engine route: the same checks wherever an image can ride.

Each "slot" is one place where a route's engine reads an image: a chat
part, a Responses input_image (in a message or in a tool output), an
Anthropic image block (in a message or a user tool_result), the chat forms
of the pooling routes, a score/rerank query or document. Every slot gets
the same treatment: a valid inline image passes, a big one is downscaled,
bombs, oversized and corrupt images are refused with the slot's JSON path,
an http URL is fetched by the wrapper and written back inline in the form
that route's engine reads, a private address is refused. Then the shapes
nobody can check are refused (fail closed), and images are counted across
the whole request.

`images.example.test` plays a public host: a local server on 127.0.0.1 that
the test policy trusts for exactly that name.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import ipaddress
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from app.config import load_settings
from app.errors import APIError
from app.media import MEDIA_ROUTES, MediaCounts, MediaFetcher, MediaPolicy, prepare_media
from tests.media_server import MediaServer, StaticResolver, png_claiming_size, sample_image

TEST_HOST = "images.example.test"
PNG = sample_image("PNG", (40, 30))
MODEL = "org/model"


def media_policy(env: dict[str, str] | None = None) -> MediaPolicy:
    policy = MediaPolicy.from_settings(
        load_settings({"MODEL_NAME": MODEL, "IMAGE_LIMIT": "4", **(env or {})}), frozenset({"text", "image", "video"})
    )
    trusted = frozenset({(TEST_HOST, ipaddress.ip_address("127.0.0.1"))})
    return dataclasses.replace(policy, urls=dataclasses.replace(policy.urls, trusted_addresses=trusted))


async def prepare(route: str, body: dict[str, Any], policy: MediaPolicy | None = None) -> MediaCounts:
    async with MediaFetcher(media_policy().urls, resolver=StaticResolver({TEST_HOST: [["127.0.0.1"]]})) as fetcher:
        return await prepare_media(route, body, policy or media_policy(), fetcher)


async def refusal(route: str, body: dict[str, Any], policy: MediaPolicy | None = None) -> APIError:
    with pytest.raises(APIError) as caught:
        await prepare(route, body, policy)
    return caught.value


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def decoded(url: str) -> tuple[str, bytes]:
    header, payload = url.split(",", 1)
    return header, base64.b64decode(payload)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MediaServer]:
    async with MediaServer() as media_server:
        yield media_server


# --- Where each route carries an image ----------------------------------------------


def openai_image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def anthropic_image(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, data = url[5:].split(",", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": header.split(";")[0], "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def anthropic_url(source: dict[str, Any]) -> str:
    """The URL the engine builds from an Anthropic image source."""
    if source.get("type") == "url":
        return source["url"]
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "Describe."}, *parts]}


@dataclass(frozen=True)
class Slot:
    name: str
    route: str
    body: Callable[[str], dict[str, Any]]  # a request with one image at this URL
    read: Callable[[dict[str, Any]], str]  # the URL the engine loads from that body
    param: str


SLOTS = [
    Slot(
        "chat", "/v1/chat/completions",
        lambda url: {"model": MODEL, "messages": [user(openai_image(url))]},
        lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
        "messages[0].content[1].image_url",
    ),
    Slot(
        "chat-render", "/v1/chat/completions/render",
        lambda url: {"model": MODEL, "messages": [user(openai_image(url))]},
        lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
        "messages[0].content[1].image_url",
    ),
    Slot(
        "chat-batch", "/v1/chat/completions/batch",
        lambda url: {"model": MODEL, "messages": [[user()], [user(openai_image(url))]]},
        lambda body: body["messages"][1][0]["content"][1]["image_url"]["url"],
        "messages[1][0].content[1].image_url",
    ),
    Slot(
        "tokenize", "/tokenize",
        lambda url: {"model": MODEL, "messages": [user(openai_image(url))]},
        lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
        "messages[0].content[1].image_url",
    ),
    Slot(
        "responses-message", "/v1/responses",
        lambda url: {"model": MODEL, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Describe."},
                                         {"type": "input_image", "image_url": url, "detail": "auto"}]},
        ]},
        lambda body: body["input"][0]["content"][1]["image_url"],
        "input[0].content[1].image_url",
    ),
    Slot(
        "responses-tool-output", "/v1/responses",
        lambda url: {"model": MODEL, "input": [
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1",
             "output": [{"type": "input_image", "image_url": url, "detail": "auto"}]},
        ]},
        lambda body: body["input"][1]["output"][0]["image_url"],
        "input[1].output[0].image_url",
    ),
    Slot(
        "responses-tool-output-with-role", "/v1/responses",
        lambda url: {"model": MODEL, "input": [
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {"type": "function_call_output", "role": "user", "call_id": "c1",
             "output": [{"type": "input_image", "image_url": url, "detail": "auto"}]},
        ]},
        lambda body: body["input"][1]["output"][0]["image_url"],
        "input[1].output[0].image_url",
    ),
    Slot(
        "messages", "/v1/messages",
        lambda url: {"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe."}, anthropic_image(url)]},
        ]},
        lambda body: anthropic_url(body["messages"][0]["content"][1]["source"]),
        "messages[0].content[1].source",
    ),
    Slot(
        "messages-tool-result", "/v1/messages",
        lambda url: {"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "here"},
                                                                         anthropic_image(url)]},
            ]},
        ]},
        lambda body: anthropic_url(body["messages"][1]["content"][0]["content"][1]["source"]),
        "messages[1].content[0].content[1].source",
    ),
    Slot(
        "count-tokens", "/v1/messages/count_tokens",
        lambda url: {"model": MODEL, "messages": [{"role": "assistant", "content": [anthropic_image(url)]}]},
        lambda body: anthropic_url(body["messages"][0]["content"][0]["source"]),
        "messages[0].content[0].source",
    ),
    Slot(
        "embeddings-messages", "/v1/embeddings",
        lambda url: {"model": MODEL, "messages": [user(openai_image(url))]},
        lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
        "messages[0].content[1].image_url",
    ),
    Slot(
        "embeddings-input", "/v1/embeddings",
        lambda url: {"model": MODEL, "input": [[user()], [user(openai_image(url))]]},
        lambda body: body["input"][1][0]["content"][1]["image_url"]["url"],
        "input[1][0].content[1].image_url",
    ),
    Slot(
        "pooling", "/pooling",
        lambda url: {"model": MODEL, "messages": [user(openai_image(url))]},
        lambda body: body["messages"][0]["content"][1]["image_url"]["url"],
        "messages[0].content[1].image_url",
    ),
    Slot(
        "classify", "/classify",
        lambda url: {"model": MODEL, "input": [user(openai_image(url))]},
        lambda body: body["input"][0]["content"][1]["image_url"]["url"],
        "input[0].content[1].image_url",
    ),
    *(
        Slot(
            f"rerank{route}", route,
            lambda url: {"model": MODEL, "query": "a cat", "documents": ["text", {"content": [openai_image(url)]}]},
            lambda body: body["documents"][1]["content"][0]["image_url"]["url"],
            "documents[1].content[0].image_url",
        )
        for route in ("/rerank", "/v1/rerank", "/v2/rerank")
    ),
    *(
        Slot(
            f"score{route}", route,
            lambda url: {"model": MODEL, "queries": {"content": [openai_image(url)]}, "documents": ["a", "b"]},
            lambda body: body["queries"]["content"][0]["image_url"]["url"],
            "queries.content[0].image_url",
        )
        for route in ("/score", "/v1/score")
    ),
    Slot(
        "score-data", "/score",
        lambda url: {"model": MODEL, "data_1": "a cat", "data_2": [{"content": [openai_image(url)]}]},
        lambda body: body["data_2"][0]["content"][0]["image_url"]["url"],
        "data_2[0].content[0].image_url",
    ),
]  # fmt: skip
by_slot = pytest.mark.parametrize("slot", SLOTS, ids=lambda slot: slot.name)


@by_slot
async def test_a_valid_inline_image_passes_unchanged(slot: Slot) -> None:
    body = slot.body(data_url(PNG))
    counts = await prepare(slot.route, body)
    assert (counts.image, counts.changed) == (1, False)
    assert slot.read(body) == data_url(PNG)


@by_slot
async def test_a_big_inline_image_is_downscaled_in_place(slot: Slot) -> None:
    body = slot.body(data_url(sample_image("PNG", (400, 100))))
    counts = await prepare(slot.route, body, media_policy({"MAX_IMAGE_SIDE": "100"}))
    assert counts.changed
    header, data = decoded(slot.read(body))
    assert header == "data:image/png;base64"
    with Image.open(BytesIO(data)) as image:
        assert image.size == (100, 25)


def _corrupt_png() -> bytes:
    corrupt = bytearray(sample_image("PNG", (128, 128)))
    start = corrupt.index(b"IDAT") + 8
    corrupt[start : start + 32] = b"\xff" * 32
    return bytes(corrupt)


BAD_IMAGES = [
    ("pixel-bomb", data_url(png_claiming_size(8000, 8000)), {}, 400, "MAX_IMAGE_PIXELS="),
    ("oversized", data_url(PNG), {"MAX_IMAGE_BYTES": str(len(PNG) - 1)}, 413, "MAX_IMAGE_BYTES="),
    ("corrupt", data_url(_corrupt_png()), {}, 400, "truncated or corrupt"),
    ("not-an-image", data_url(b"%PDF-1.7 not an image"), {}, 400, "not a valid PNG, JPEG, WebP or GIF"),
    ("private-address", "http://10.1.2.3/cat.png", {}, 400, "private address"),
    ("metadata-address", "http://169.254.169.254/latest/meta-data/", {}, 400, "cloud metadata address"),
    ("file-url", "file:///etc/passwd", {}, 400, "scheme 'file:' is not allowed"),
]


@by_slot
@pytest.mark.parametrize(("url", "env", "status", "fragment"), [case[1:] for case in BAD_IMAGES],
                         ids=[case[0] for case in BAD_IMAGES])  # fmt: skip
async def test_bad_images_are_refused_with_the_path_of_the_slot(
    slot: Slot, url: str, env: dict[str, str], status: int, fragment: str
) -> None:
    error = await refusal(slot.route, slot.body(url), media_policy(env))
    assert error.status == status and fragment in error.message, error.message
    assert error.param == slot.param


@by_slot
async def test_an_http_url_is_fetched_and_written_back_inline(slot: Slot, server: MediaServer) -> None:
    server.add_file("/cat", PNG, "application/octet-stream")
    body = slot.body(server.url("/cat", TEST_HOST))
    counts = await prepare(slot.route, body)
    assert (counts.image, counts.changed) == (1, True)
    assert decoded(slot.read(body)) == ("data:image/png;base64", PNG)
    assert [request.path for request in server.requests] == ["/cat"]


@by_slot
async def test_a_private_url_is_never_fetched(slot: Slot, server: MediaServer) -> None:
    server.add_file("/cat.png", PNG, "image/png")
    error = await refusal(slot.route, slot.body(server.url("/cat.png")))
    assert "'127.0.0.1' is a loopback address" in error.message and error.param == slot.param
    assert server.requests == []


def test_every_route_of_the_table_is_covered_here() -> None:
    covered = {slot.route for slot in SLOTS} | {case[0] for case in UNCHECKED} | {case[0] for case in NO_MEDIA}
    assert covered == MEDIA_ROUTES


# --- Counted across the whole request ---------------------------------------------------


COUNTED = [
    ("/v1/chat/completions", lambda url: {"messages": [user(openai_image(url)), {"role": "assistant", "content": "ok"},
                                                       user(openai_image(url), openai_image(url))]}),
    ("/v1/chat/completions/batch", lambda url: {"messages": [[user(openai_image(url))],
                                                             [user(openai_image(url), openai_image(url))]]}),
    ("/v1/responses", lambda url: {"input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": url, "detail": "auto"}]},
        {"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_image", "image_url": url, "detail": "auto"},
            {"type": "input_image", "image_url": url, "detail": "auto"}]}]}),
    ("/v1/messages", lambda url: {"messages": [
        {"role": "user", "content": [anthropic_image(url)]},
        {"role": "assistant", "content": [anthropic_image(url)]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [anthropic_image(url)]}]}]}),
    ("/v1/embeddings", lambda url: {"messages": [user(openai_image(url))],
                                    "input": [user(openai_image(url), openai_image(url))]}),
    ("/rerank", lambda url: {"query": {"content": [openai_image(url)]},
                             "documents": [{"content": [openai_image(url)]}, {"content": [openai_image(url)]}]}),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body"), COUNTED, ids=[case[0] for case in COUNTED])
async def test_images_are_counted_across_the_whole_request(route: str, body: Callable[[str], dict[str, Any]]) -> None:
    url = data_url(PNG)
    counts = await prepare(route, body(url), media_policy({"IMAGE_LIMIT": "3"}))
    assert counts.image == 3
    error = await refusal(route, body(url), media_policy({"IMAGE_LIMIT": "2"}))
    assert error.status == 400 and "The request has 3 images" in error.message and "IMAGE_LIMIT=2" in error.message


async def test_images_for_a_text_only_model_are_refused_on_every_route() -> None:
    text_only = dataclasses.replace(media_policy(), modalities=frozenset({"text"}))
    for slot in SLOTS:
        error = await refusal(slot.route, slot.body(data_url(PNG)), text_only)
        assert f"The model '{MODEL}' does not accept images" in error.message and error.param == slot.param


# --- Shapes nobody can check: refused, never forwarded ----------------------------------


def chat_with(part: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [user(part)]}


UNCHECKED: list[tuple[str, dict[str, Any], str, str]] = [
    ("/v1/chat/completions", chat_with({"type": "image_embeds", "image_embeds": "AAAA"}),
     "messages[0].content[1]", "precomputed embeddings"),
    ("/v1/chat/completions", chat_with({"uuid": "u", "prompt_embeds": {"data": "AAAA"}}),
     "messages[0].content[1].prompt_embeds", "precomputed embeddings"),
    ("/v1/chat/completions", chat_with({"type": "image_pil", "image_pil": "x"}),
     "messages[0].content[1]", "cannot be sent over HTTP"),
    ("/v1/chat/completions", chat_with({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}),
     "messages[0].content[1].audio_url", "Audio URLs are not fetched"),
    ("/v1/chat/completions", chat_with({"type": "image", "image": "https://example.com/a.png"}),
     "messages[0].content[1]", "Content part type 'image' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": openai_image("http://10.0.0.1/x.png")}]},
     "messages[0].content", "does not check"),
    ("/v1/chat/completions", {"messages": [user([openai_image("http://10.0.0.1/x.png")])]},
     "messages[0].content[1][0]", "does not check"),
    ("/v1/chat/completions", chat_with({"type": 5, "image_url": {"url": "http://10.0.0.1/x.png"}}),
     "messages[0].content[1].image_url", "does not check"),
    ("/v1/chat/completions/render", {"messages": [user()], "multi_modal_data": {"image": "x"}},
     "multi_modal_data", "does not check"),
    ("/tokenize", {"prompt": "hi", "mm_data": {}, "extra": {"type": "input_image", "image_url": "http://10.0.0.1"}},
     "extra", "does not check"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "JVBERi0="}]}]},
     "input[0].content[0]", "input_file parts are not accepted"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1",
                                                               "detail": "auto"}]}]},
     "input[0].content[0].file_id", "no file store"),
    ("/v1/responses", {"input": [{"type": "computer_call_output", "call_id": "c",
                                  "output": {"type": "computer_screenshot", "image_url": "http://10.0.0.1/s.png"}}]},
     "input[0].output", "does not check"),
    ("/v1/responses", {"input": "hi", "prompt": {"id": "p", "variables": {
        "photo": {"type": "input_image", "image_url": "http://10.0.0.1/s.png"}}}},
     "prompt.variables.photo", "does not check"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source.type", "Image source type 'file' is not accepted"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]},
     "messages[0].content[0]", "does not check"),
    ("/v1/messages/count_tokens", {"system": [{"type": "image", "source": {"type": "url", "url": "http://10.0.0.1"}}],
                                   "messages": []},
     "system[0]", "image blocks of user or assistant messages"),
    ("/v1/completions", {"prompt": "hi", "prompt_embeds": "AAAA"}, "prompt_embeds", "precomputed embeddings"),
    ("/v1/completions/render", {"prompt": [{"prompt": "hi", "multi_modal_data": {"image": "http://10.0.0.1"}}]},
     "prompt[0].multi_modal_data", "text or token ids only"),
    ("/v1/completions", {"prompt": ["hi", openai_image("http://10.0.0.1/x.png")]},
     "prompt[1]", "text or token ids only"),
    ("/v1/embeddings", {"input": ["hi", {"x": {"image_url": "http://10.0.0.1/x.png"}}]},
     "input[1].x.image_url", "does not check"),
    ("/pooling", {"data": {"data": "https://example.com/tile.tiff", "data_format": "url"}},
     "data", "IO-processor plugin"),
    ("/v1/embeddings", {"input": [user({"type": "video_embeds", "video_embeds": "AAAA"})]},
     "input[0].content[1]", "precomputed embeddings"),
    ("/classify", {"input": "hi", "messages": [user({"type": "input_audio", "input_audio": {"data": "AA"}})],
                   "images": [{"image_url": "http://10.0.0.1/x.png"}]},
     "images[0].image_url", "does not check"),
    ("/v1/score", {"queries": "q", "documents": [{"content": [{"type": "image_embeds", "image_embeds": "AAAA"}]}]},
     "documents[0].content[0]", "precomputed embeddings"),
    ("/v2/rerank", {"query": "q", "documents": [{"text": "t", "image_url": "http://10.0.0.1/x.png"}]},
     "documents[0].image_url", "does not check"),
    ("/detokenize", {"tokens": [1, 2], "messages": [user(openai_image("http://10.0.0.1/x.png"))]},
     "messages[0].content[1]", "this route takes no media"),
    ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x", "image_url": "http://10.0.0.1/x.png"},
     "image_url", "this route takes no media"),
    ("/v1/unload_lora_adapter", {"lora_name": "a", "extra": [{"input_audio": {"data": "AA"}}]},
     "extra[0].input_audio", "this route takes no media"),
]  # fmt: skip


@pytest.mark.parametrize(("route", "body", "param", "fragment"), UNCHECKED, ids=[case[0] for case in UNCHECKED])
async def test_media_the_wrapper_cannot_check_is_refused_naming_its_path(
    route: str, body: dict[str, Any], param: str, fragment: str
) -> None:
    error = await refusal(route, body)
    assert error.status == 400 and fragment in error.message, error.message
    assert error.param == param


NO_MEDIA: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"prompt": ["Once upon", "a time"], "prompt_embeds": None}),
    ("/v1/completions/render", {"prompt": [[1, 2, 3], [4, 5]]}),
    ("/detokenize", {"tokens": [1, 2, 3]}),
    ("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/adapters/sql"}),
    ("/v1/unload_lora_adapter", {"lora_name": "sql"}),
]


@pytest.mark.parametrize(("route", "body"), NO_MEDIA, ids=[case[0] for case in NO_MEDIA])
async def test_routes_without_media_pass_untouched(route: str, body: dict[str, Any]) -> None:
    sent = copy.deepcopy(body)
    assert await prepare(route, sent) == MediaCounts()
    assert sent == body


async def test_schemas_and_tool_calls_that_mention_media_are_not_media() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "describe",
            "parameters": {
                "type": "object",
                "properties": {"image_url": {"type": "string"}, "file_id": {"type": "string"}},
            },
        },
    }
    body = {
        "messages": [
            user(),
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "describe", "arguments": {"image_url": "http://10.0.0.1/x.png"}}}]},
            {"role": "tool", "tool_call_id": "c", "content": "a cat"},
        ],
        "tools": [tool],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"image_url": {"type": "string"}}}}},
    }  # fmt: skip
    assert await prepare("/v1/chat/completions", body) == MediaCounts(text=2)
    anthropic = {
        "messages": [
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t", "name": "look", "input": {"image": {"type": "image", "url": "x"}}}
                ],
            }
        ],
        "tools": [{"name": "look", "input_schema": {"type": "object", "properties": {"image_url": {}}}}],
    }
    assert await prepare("/v1/messages", anthropic) == MediaCounts()


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/responses", {"input": [{"type": []}, {"type": {}, "role": "user", "content": "hi"}]}),
        ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": {}}, {"type": ["image"]}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": ["image_url"]}]}]}),
    ],
    ids=["responses", "messages", "chat"],
)
async def test_types_that_are_not_strings_are_no_media(route: str, body: dict[str, Any]) -> None:
    counts = await prepare(route, body)
    assert (counts.image, counts.video) == (0, 0)


async def test_inline_audio_passes_and_inline_audio_urls_too() -> None:
    body = chat_with({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
    body["messages"].append(user({"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,UklGRg=="}}))
    assert await prepare("/v1/chat/completions", body) == MediaCounts(text=2)


async def test_an_unknown_route_is_refused() -> None:
    error = await refusal("/v1/messages/render", {"messages": []})
    assert error.status == 400 and "/v1/messages/render" in error.message


@pytest.mark.parametrize("role", ["system", "developer"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/responses"])
async def test_media_in_a_system_or_developer_message_is_refused(role: str, route: str) -> None:
    """Chat templates render these roles as text; the engine fails on an image there with a 500."""
    image = openai_image(data_url(sample_image("PNG", (8, 8))))
    field = "messages" if route == "/v1/chat/completions" else "input"
    error = await refusal(route, {field: [user({"type": "text", "text": "hi"}), {"role": role, "content": [image]}]})
    assert error.status == 400 and f"not in a {role} message" in error.message
    assert error.param == f"{field}[1].content[0].image_url"
    assistant = {field: [user(image), {"role": "assistant", "content": [image]}]}
    assert (await prepare(route, assistant)).image == 2, "assistant turns may carry images"


async def test_a_responses_message_without_content_is_refused() -> None:
    """vLLM 0.32 fails such an item with a 500 (an IndexError in its converter)."""
    error = await refusal("/v1/responses", {"input": [{"role": "assistant", "type": "message", "content": []}]})
    assert error.status == 400 and error.param == "input[0].content"
