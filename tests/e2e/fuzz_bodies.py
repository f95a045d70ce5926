"""Request bodies for the fuzz test (tests/e2e/test_fuzz.py): one strategy per family of engine routes.

Every JSON route of the route table gets bodies in its own shape (chat
`messages`, Responses `input`, Anthropic `messages`, completions `prompt`,
pooling `input`/`messages`, score/rerank queries and documents, token ids)
with media in each shape that route's engine reads, valid or not, plus junk.

A drawn `Case` knows by construction whether the wrapper must refuse it
before the engine (`refusal`): it carries an image or video the wrapper
refuses (a bomb, corrupt or oversized data, broken base64, a URL it must
not fetch), more images or videos than the limits, media in a shape no
walker reads (fail closed), or it is not a JSON object. A body that may
pass is not marked: the test asserts only that it gets no 5xx. Counting is
conservative: media are counted only where the wrapper surely counts them,
and a body is marked only for a reason the wrapper surely refuses, so a
mark never depends on what the engine would do.

Each body draws a budget of reasons to refuse it (none, one, or any
number): a body with exactly one reason is the sharp test, since any other
reason would hide a gap.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from hypothesis import strategies as st
from PIL import Image

from app.routes import ENGINE_ROUTES
from tests.e2e.conftest import VLM_MODEL
from tests.media_server import png_claiming_size, sample_image, sample_mp4

# The fuzz wrapper's media settings; the refused media below are built against them.
IMAGE_LIMIT = 2
VIDEO_LIMIT = 1
MAX_IMAGE_BYTES = 64 * 1024
MAX_VIDEO_FRAMES = 8
MAX_VIDEO_PIXELS = 64 * 64
WRAPPER_SETTINGS = {
    "SERVED_MODEL_NAME": VLM_MODEL,
    "IMAGE_LIMIT": str(IMAGE_LIMIT),
    "VIDEO_LIMIT": str(VIDEO_LIMIT),
    "MAX_IMAGE_SIDE": "256",
    "MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
    "MAX_VIDEO_FRAMES": str(MAX_VIDEO_FRAMES),
    "MAX_VIDEO_PIXELS": str(MAX_VIDEO_PIXELS),
    "MEDIA_FETCH_TIMEOUT_S": "2",
}
JSON_ROUTES = tuple(route.label for route in ENGINE_ROUTES if route.body == "json")


@dataclass(frozen=True)
class Case:
    route: str
    body: bytes
    # Why the wrapper must refuse this body before the engine, or None when it may pass.
    refusal: str | None


# --- Media -------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    url: str
    # Why the wrapper refuses it as media of its slot's kind, or None when it may pass.
    refused: str | None = None


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def noise_png(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress: about 3 bytes per pixel."""
    buffer = BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_png() -> bytes:
    png = bytearray(sample_image("PNG", (128, 128)))
    start = png.index(b"IDAT") + 8
    png[start : start + 32] = b"\xff" * 32
    return bytes(png)


PNG = sample_image("PNG", (40, 30))
MP4 = sample_mp4()
GOOD_IMAGES = [
    Media(data_url("image/png", PNG)),
    Media(data_url("image/jpeg", sample_image("JPEG", (32, 32)))),
    Media(data_url("image/webp", sample_image("WEBP", (24, 24)))),
    Media(data_url("image/png", sample_image("PNG", (300, 40)))),  # over MAX_IMAGE_SIDE: downscaled
    # Odd modes, and an aspect ratio the model's processor refuses (the engine's 400).
    Media(data_url("image/jpeg", sample_image("JPEG", (32, 32), "CMYK"))),
    Media(data_url("image/gif", sample_image("GIF", (32, 32), "P"))),
    Media(data_url("image/png", sample_image("PNG", (250, 1)))),
]
BAD_IMAGES = [
    Media(data_url("image/png", png_claiming_size(50_000, 50_000)), "pixel bomb"),
    Media(data_url("image/png", png_claiming_size(8000, 8000)), "pixel bomb"),
    Media(data_url("image/png", PNG[:40]), "truncated image"),
    Media(data_url("image/png", corrupt_png()), "corrupt image"),
    Media(data_url("image/png", noise_png((160, 160))), "image over MAX_IMAGE_BYTES"),
    Media(data_url("image/png", b"not an image"), "not an image"),
    Media(data_url("video/mp4", MP4), "a video as an image"),
    Media(f"data:image/png,{base64.b64encode(PNG).decode()}", "data: URL not base64"),
    Media("data:image/png;base64,!!!", "broken base64"),
    Media(data_url("image/png", PNG)[:-3], "broken base64"),
    Media("data:image/png;base64," + base64.encodebytes(PNG).decode(), "base64 with line breaks"),
    Media("data:;base64,", "empty data: URL"),
    Media("data:", "data: URL without payload"),
]
GOOD_VIDEOS = [
    Media(data_url("video/mp4", MP4)),
    Media(data_url("video/mp4", MP4[: len(MP4) // 2])),  # truncated: may pass the container checks
    Media(data_url("video/mp4", b"\0\0\0\x18ftypisom" + bytes(64))),  # an MP4 box header, then zeros
    Media(data_url("video/jpeg", sample_image("JPEG", (32, 32)))),  # JPEG frames
]
BAD_VIDEOS = [
    Media(data_url("video/mp4", sample_mp4(frames=MAX_VIDEO_FRAMES + 4)), "video over MAX_VIDEO_FRAMES"),
    Media(data_url("video/mp4", sample_mp4(size=(96, 96))), "video over MAX_VIDEO_PIXELS"),
    Media(data_url("video/mp4", PNG), "an image as a video"),
    Media(data_url("application/vnd.apple.mpegurl", b"#EXTM3U\n#EXTINF:1,\nhttp://10.0.0.1/a.ts\n"), "a playlist"),
    Media("data:video/mp4;base64,%%%", "broken base64"),
]
REFUSED_URLS = [
    Media("file:///etc/passwd", "file: URL"),
    Media("http://169.254.169.254/latest/meta-data/", "metadata address"),
    Media("http://[fd00:ec2::254]/latest/meta-data/", "metadata address"),
    Media("http://127.0.0.1:1/x.png", "loopback address"),
    Media("http://[::1]/x.png", "loopback address"),
    Media("http://0x7f.1/x.png", "loopback address"),
    Media("http://10.0.0.1/x.png", "private address"),
    Media("http://media.example.invalid/x.png", "host that does not resolve"),
    Media("ftp://example.invalid/x.png", "not http(s)"),
    Media("gopher://127.0.0.1:70/x", "not http(s)"),
    Media("//no-scheme/x.png", "no scheme"),
    Media("http://", "no host"),
    Media("not a url", "not a URL"),
]


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, picked in proportion to its weight."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


# Random text is never media the wrapper accepts: no data: URL of an image, no reachable host.
random_urls = st.text(min_size=1, max_size=20).map(lambda text: Media(text, "random text as a URL"))
good_images = st.sampled_from(GOOD_IMAGES)
good_videos = st.sampled_from(GOOD_VIDEOS)
any_images = weighted(
    (4, good_images), (3, st.sampled_from(BAD_IMAGES)), (2, st.sampled_from(REFUSED_URLS)), (1, random_urls)
)
any_videos = weighted((3, good_videos), (2, st.sampled_from(BAD_VIDEOS)), (1, st.sampled_from(REFUSED_URLS)))
any_url = st.sampled_from([media.url for media in [*GOOD_IMAGES[:3], *BAD_IMAGES[:3], *REFUSED_URLS[:4]]])


# --- JSON junk ---------------------------------------------------------------------

# Text includes lone surrogates: legal as JSON escapes (\ud800), not encodable as UTF-8.
texts = st.text(max_size=30) | st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=6)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Objects made of the field names of real request shapes, with values of any type (a list as a `type`).
FIELD_NAMES = ["type", "role", "content", "text", "source", "url", "image_url", "video_url", "output", "uuid", "data"]
junk = json_values | st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, min_size=1, max_size=3)
token_ids = st.lists(st.integers(0, 150), min_size=1, max_size=6)


def sometimes(draw: st.DrawFn, chance: int) -> bool:
    """True about once in `chance` draws."""
    return draw(st.integers(0, chance - 1)) == 0


# --- What a body carries ---------------------------------------------------------------


@dataclass
class Tally:
    """What a body being drawn carries where the wrapper surely reads media, and why it must be refused."""

    # Reasons to refuse the body that may still be drawn (None: any number).
    budget: int | None = None
    images: int = 0
    videos: int = 0
    reasons: list[str] = field(default_factory=list)

    def may_refuse(self) -> bool:
        return self.budget is None or self.budget > 0

    def refuse(self, reason: str) -> None:
        self.reasons.append(reason)
        if self.budget is not None:
            self.budget -= 1

    def add(self, kind: str, media: Media) -> str:
        if kind == "image":
            self.images += 1
        else:
            self.videos += 1
        if media.refused:
            self.refuse(f"{kind}: {media.refused}")
        return media.url

    def refusal(self) -> str | None:
        reasons = list(self.reasons)
        if self.images > IMAGE_LIMIT:
            reasons.append(f"{self.images} images, over IMAGE_LIMIT")
        if self.videos > VIDEO_LIMIT:
            reasons.append(f"{self.videos} videos, over VIDEO_LIMIT")
        return "; ".join(reasons) or None


def pick(draw: st.DrawFn, tally: Tally, kinds: list[str], refused: list[str]) -> str:
    """One of `kinds`, or, while the tally allows, of `refused` (kinds that make the wrapper refuse the body)."""
    return draw(st.sampled_from(kinds + refused if tally.may_refuse() else kinds))


def now_and_then(draw: st.DrawFn, tally: Tally, chance: int) -> bool:
    """Whether to add a reason to refuse the body here: about once in `chance` draws, while the tally allows."""
    return tally.may_refuse() and sometimes(draw, chance)


@st.composite
def image(draw: st.DrawFn, tally: Tally) -> str:
    return tally.add("image", draw(any_images if tally.may_refuse() else good_images))


@st.composite
def video(draw: st.DrawFn, tally: Tally) -> str:
    return tally.add("video", draw(any_videos if tally.may_refuse() else good_videos))


# Media-shaped objects: wherever no walker reads them, the wrapper refuses them (fail closed).
MEDIA_SHAPES: list[Callable[[str], dict[str, Any]]] = [
    lambda url: {"type": "image_url", "image_url": {"url": url}},
    lambda url: {"type": "input_image", "image_url": url},
    lambda url: {"video_url": {"url": url}},
    lambda url: {"image_url": url, "text": "a caption"},
    lambda url: {"type": "image", "source": {"type": "url", "url": url}},
    lambda url: {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
    lambda url: {"type": "input_file", "file_data": "JVBERi0=", "filename": "a.pdf"},
    lambda url: {"input_audio": {"data": "UklGRg==", "format": "wav"}},
    lambda url: {"type": "image_embeds", "image_embeds": "AAAA"},
    lambda url: {"prompt_embeds": "AAAA"},
    lambda url: {"multi_modal_data": {"image": url}},
]


@st.composite
def media_object(draw: st.DrawFn) -> dict[str, Any]:
    return draw(st.sampled_from(MEDIA_SHAPES))(draw(any_url))


@st.composite
def media_shape(draw: st.DrawFn) -> Any:
    """A media-shaped object, maybe nested in lists and objects."""
    shape: Any = draw(media_object())
    for _ in range(draw(st.integers(0, 2))):
        shape = [shape] if draw(st.booleans()) else {"x": shape}
    return shape


@st.composite
def extras(draw: st.DrawFn, tally: Tally) -> dict[str, Any]:
    """Sampling options and junk fields; now and then a field no walker reads, holding media."""
    fields = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(-1, 3) | json_scalars,
                "n": st.sampled_from([1, 2, 0, -1, "1"]),
                "seed": st.integers() | json_scalars,
                "stop": json_values,
                "logit_bias": json_values,
                "response_format": json_values,
                "extra_field": json_values,
            },
        )
    )
    if now_and_then(draw, tally, 6):
        tally.refuse("media in a top-level field no walker reads")
        key = draw(st.sampled_from(["multi_modal_data", "attachments", "mm_data", "media", "x"]))
        fields[key] = draw(media_shape())
    return fields


def max_tokens() -> st.SearchStrategy[Any]:
    """Small when valid, so that an answer from the engine stays quick."""
    return weighted((8, st.integers(1, 3)), (1, st.sampled_from([0, -1, 10**9, 1.5, "2", []])))


# --- OpenAI content parts (chat, pooling, score, Responses) --------------------------


@st.composite
def image_part(draw: st.DrawFn, tally: Tally) -> dict[str, Any]:
    url = draw(image(tally))
    shapes = [
        {"type": "image_url", "image_url": {"url": url}},
        # The engine caches media by a client's uuid: one uuid per image, as a client would send.
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}, "uuid": f"img-{zlib.crc32(url.encode())}"},
        {"type": "image_url", "image_url": url},
        {"image_url": {"url": url}},
        {"image_url": url},
        {"type": "input_image", "image_url": url},
    ]
    return draw(st.sampled_from(shapes))


@st.composite
def video_part(draw: st.DrawFn, tally: Tally) -> dict[str, Any]:
    url = draw(video(tally))
    shapes = [
        {"type": "video_url", "video_url": {"url": url}},
        {"type": "video_url", "video_url": url},
        {"video_url": {"url": url}},
    ]
    return draw(st.sampled_from(shapes))


# Parts the walkers refuse themselves: nothing can check them.
REFUSED_PARTS: list[tuple[str, dict[str, Any]]] = [
    ("precomputed embeddings", {"type": "image_embeds", "image_embeds": "AAAA"}),
    ("precomputed embeddings", {"type": "video_embeds", "video_embeds": {"data": "AAAA"}}),
    ("precomputed embeddings", {"uuid": "u", "prompt_embeds": "AAAA"}),
    ("PIL image over HTTP", {"type": "image_pil", "image_pil": "x"}),
    ("audio URL", {"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}}),
    ("file part", {"type": "input_file", "file_data": "JVBERi0=", "filename": "a.pdf"}),
    ("file id", {"type": "input_image", "file_id": "file-1"}),
    ("unknown part type", {"type": "image", "image": "http://10.0.0.1/a.png"}),
    ("unknown part type", {"type": "file", "file": {"file_id": "f"}}),
]
INLINE_AUDIO = [  # passes: the engine bounds audio decoding itself
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,UklGRg=="}},
]


@st.composite
def content_part(draw: st.DrawFn, tally: Tally) -> Any:
    kind = pick(draw, tally, ["text", "text", "image", "image", "video", "audio", "junk"], ["refused"])
    if kind == "text":
        return {
            "type": draw(st.sampled_from(["text", "input_text"])),
            "text": draw(weighted((4, texts), (1, json_values))),
        }
    if kind == "image":
        return draw(image_part(tally))
    if kind == "video":
        return draw(video_part(tally))
    if kind == "audio":
        return draw(st.sampled_from(INLINE_AUDIO))
    if kind == "refused":
        reason, part = draw(st.sampled_from(REFUSED_PARTS))
        tally.refuse(reason)
        return part
    return draw(junk)  # neither counted nor marked


@st.composite
def content(draw: st.DrawFn, tally: Tally) -> Any:
    """A message's content: parts, text or junk; or media as the content itself, or one list too deep."""
    kind = pick(draw, tally, ["parts", "parts", "parts", "text", "junk"], ["bare part", "nested"])
    if kind == "parts":
        return draw(st.lists(content_part(tally), max_size=4))
    if kind == "text":
        return draw(texts)
    if kind == "bare part":
        tally.refuse("a media part as the content itself, not in a list")
        return draw(media_object())
    if kind == "nested":
        tally.refuse("media in a list inside the content list")
        return [[{"type": "text", "text": "Describe."}, draw(media_shape())]]
    return draw(junk)


ROLES = weighted(
    (6, st.just("user")), (2, st.sampled_from(["system", "assistant", "tool", "developer"])), (1, json_scalars)
)


@st.composite
def chat_message(draw: st.DrawFn, tally: Tally) -> dict[str, Any]:
    message = {"role": draw(ROLES), "content": draw(content(tally))}
    if sometimes(draw, 5):  # fields the engine reads as text or tool calls, never media
        message[draw(st.sampled_from(["name", "tool_call_id", "tool_calls", "reasoning"]))] = draw(json_values)
    return message


@st.composite
def conversation(draw: st.DrawFn, tally: Tally) -> list[Any]:
    return draw(st.lists(chat_message(tally), min_size=1, max_size=3))


# --- Route families ------------------------------------------------------------------

BodyDraw = Callable[[st.DrawFn, Tally, str], dict[str, Any]]


def chat_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    """/v1/chat/completions, /render, /batch (a list of conversations), /tokenize (also a text prompt)."""
    body: dict[str, Any] = {"model": draw(weighted((8, st.just(VLM_MODEL)), (1, json_scalars)))}
    kind = pick(draw, tally, ["messages"] * 8 + ["junk"] + (["prompt"] * 4 if route == "/tokenize" else []), ["deep"])
    if kind == "messages" and route.endswith("/batch"):
        body["messages"] = draw(st.lists(conversation(tally), min_size=1, max_size=2))
    elif kind == "messages":
        body["messages"] = draw(conversation(tally))
    elif kind == "prompt":
        body["prompt"] = draw(texts)
        if now_and_then(draw, tally, 3):
            tally.refuse("media in a tokenize prompt")
            body["prompt"] = [draw(texts), draw(media_shape())]
    elif kind == "deep":
        tally.refuse("a message three lists deep")
        body["messages"] = [{"role": "user", "content": "Hi"}, [[{"role": "user", "content": [draw(media_object())]}]]]
    else:
        body["messages"] = draw(junk)
    if route != "/tokenize":
        body["max_tokens"] = draw(max_tokens())
        optional = {"stream": st.booleans() | json_scalars, "stream_options": json_values, "tools": json_values}
        body.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return body


@st.composite
def responses_part(draw: st.DrawFn, tally: Tally) -> Any:
    kind = draw(st.sampled_from(["text", "image", "image", "chat"]))
    if kind == "text":
        return {"type": draw(st.sampled_from(["input_text", "output_text"])), "text": draw(texts)}
    if kind == "image":
        return {"type": "input_image", "image_url": draw(image(tally)), "detail": "auto"}
    return draw(content_part(tally))  # the engine's one part parser reads chat parts here too


@st.composite
def responses_item(draw: st.DrawFn, tally: Tally) -> Any:
    kinds = ["message", "message", "tool output", "tool call", "reasoning", "junk"]
    kind = pick(draw, tally, kinds, ["unchecked"])
    if kind == "message":
        item: dict[str, Any] = {"role": draw(st.sampled_from(["user", "user", "system", "assistant", "developer"]))}
        item["content"] = draw(st.lists(responses_part(tally), max_size=3) | texts)
        if draw(st.booleans()):
            item["type"] = "message"
        return item
    if kind == "tool output":
        item = {"type": draw(st.sampled_from(["function_call_output", "custom_tool_call_output"])), "call_id": "c1"}
        item["output"] = draw(st.lists(responses_part(tally), max_size=3) | texts)
        if sometimes(draw, 3):
            item["role"] = "user"  # the engine reads a tool output's `output` whatever else the item has
        return item
    if kind == "tool call":
        arguments = draw(st.sampled_from(["{}", '{"image_url": "http://10.0.0.1/x.png"}']))
        return {"type": "function_call", "call_id": "c1", "name": "look", "arguments": arguments}
    if kind == "reasoning":
        return {
            "type": "reasoning",
            "id": "r1",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": draw(texts)}],
        }
    if kind == "unchecked":
        tally.refuse("media in a Responses item no walker reads")
        url = draw(any_url)
        items = [
            {
                "type": "computer_call_output",
                "call_id": "c1",
                "output": {"type": "computer_screenshot", "image_url": url},
            },
            {"type": "input_image", "image_url": url},
            {"type": "item_reference", "id": "i1", "image_url": url},
        ]
        return draw(st.sampled_from(items))
    return draw(junk)


def responses_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": VLM_MODEL, "max_output_tokens": draw(max_tokens())}
    if sometimes(draw, 8):
        body["input"] = draw(texts | junk)
    else:
        body["input"] = draw(st.lists(responses_item(tally), min_size=1, max_size=3))
    if now_and_then(draw, tally, 8):
        tally.refuse("media in prompt variables")
        body["prompt"] = {"id": "p1", "variables": {"photo": {"type": "input_image", "image_url": draw(any_url)}}}
    body.update(draw(st.fixed_dictionaries({}, optional={"stream": st.booleans(), "instructions": texts})))
    return body


def anthropic_source(url: str) -> dict[str, Any]:
    """The Anthropic image source the engine turns back into `url`."""
    header, comma, data = url.partition(",")
    if url.startswith("data:") and comma and header.endswith(";base64"):
        return {"type": "base64", "media_type": header[5:-7], "data": data}
    return {"type": "url", "url": url}


@st.composite
def anthropic_image(draw: st.DrawFn, tally: Tally) -> dict[str, Any]:
    return {"type": "image", "source": anthropic_source(draw(image(tally)))}


@st.composite
def anthropic_block(draw: st.DrawFn, tally: Tally, role: str) -> Any:
    kinds = ["text", "image", "image", "tool_use", "tool_result", "thinking", "junk"]
    kind = pick(draw, tally, kinds, ["file source", "source not an object", "document"])
    if kind == "text":
        return {"type": "text", "text": draw(texts)}
    if kind == "image":
        return draw(anthropic_image(tally))
    if kind == "tool_use":  # tool arguments are not media
        return {
            "type": "tool_use",
            "id": "t1",
            "name": "look",
            "input": {"image": {"type": "image", "url": draw(any_url)}},
        }
    if kind == "tool_result":
        if draw(st.booleans()):
            return {"type": "tool_result", "tool_use_id": "t1", "content": draw(texts)}
        if role == "user":  # the engine reads images only in a user's tool_result
            items = draw(st.lists(st.just({"type": "text", "text": "here"}) | anthropic_image(tally), max_size=3))
        else:
            items = [{"type": "text", "text": "here"}]
        return {"type": "tool_result", "tool_use_id": "t1", "content": items}
    if kind == "thinking":
        return {"type": "thinking", "thinking": draw(texts), "signature": "s"}
    if kind == "file source":
        tally.refuse("an image source of type file")
        return {"type": "image", "source": {"type": "file", "file_id": "f1"}}
    if kind == "source not an object":
        tally.refuse("an image source that is not an object")
        return {"type": "image", "source": draw(any_url)}
    if kind == "document":
        tally.refuse("a document block")
        return {"type": "document", "source": {"type": "url", "url": draw(any_url)}}
    return draw(junk)


@st.composite
def anthropic_message(draw: st.DrawFn, tally: Tally) -> dict[str, Any]:
    if now_and_then(draw, tally, 8):
        tally.refuse("an image in a system message")
        return {"role": "system", "content": [draw(anthropic_image(Tally()))]}
    role = draw(st.sampled_from(["user", "user", "assistant"]))
    return {"role": role, "content": draw(st.lists(anthropic_block(tally, role), min_size=1, max_size=3) | texts)}


def anthropic_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    """/v1/messages and /v1/messages/count_tokens."""
    body: dict[str, Any] = {"model": VLM_MODEL}
    if route == "/v1/messages":
        body["max_tokens"] = draw(max_tokens())
        body.update(draw(st.fixed_dictionaries({}, optional={"stream": st.booleans()})))
    body["messages"] = draw(st.lists(anthropic_message(tally), min_size=1, max_size=3) | junk.map(lambda v: [v]))
    if now_and_then(draw, tally, 8):
        tally.refuse("an image in the system prompt")
        body["system"] = [{"type": "text", "text": "Be brief."}, draw(anthropic_image(Tally()))]
    elif draw(st.booleans()):
        body["system"] = draw(texts)
    return body


@st.composite
def mixed_list(draw: st.DrawFn, tally: Tally, first: st.SearchStrategy[Any]) -> list[Any]:
    """A list that starts like text or token ids, then carries media."""
    tally.refuse("media in a list of texts or token ids")
    return [draw(first), draw(media_shape())]


def completions_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    """/v1/completions and /render: the prompt is text or token ids."""
    kinds = ["text", "texts", "tokens", "token lists", "junk"]
    kind = pick(draw, tally, kinds, ["embeds", "objects", "mixed"])
    if kind == "text":
        prompt: Any = draw(texts)
    elif kind == "texts":
        prompt = draw(st.lists(texts, min_size=1, max_size=3))
    elif kind == "tokens":
        prompt = draw(token_ids)
    elif kind == "token lists":
        prompt = draw(st.lists(token_ids, min_size=1, max_size=2))
    elif kind == "embeds":
        tally.refuse("prompt_embeds")
        prompt = draw(texts)
    elif kind == "objects":
        tally.refuse("a prompt object with multi_modal_data")
        prompt = [{"prompt": "Describe.", "multi_modal_data": {"image": draw(any_url)}}]
    elif kind == "mixed":
        prompt = draw(mixed_list(tally, texts | st.integers(0, 100)))
    else:
        prompt = draw(junk)
    body: dict[str, Any] = {"model": VLM_MODEL, "prompt": prompt, "max_tokens": draw(max_tokens())}
    if kind == "embeds":
        body["prompt_embeds"] = draw(st.sampled_from(["AAAA", ["AAAA"]]))
    body.update(draw(st.fixed_dictionaries({}, optional={"stream": st.booleans(), "echo": st.booleans()})))
    return body


def pooling_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    """/v1/embeddings, /pooling, /classify: `input` (text, token ids, one or several conversations) or `messages`."""
    kinds = ["text", "tokens", "messages", "conversation", "conversations", "junk"]
    kind = pick(draw, tally, kinds, ["mixed"] + (["plugin"] if route == "/pooling" else []))
    body: dict[str, Any] = {"model": VLM_MODEL}
    if kind == "text":
        body["input"] = draw(texts | st.lists(texts, min_size=1, max_size=3))
    elif kind == "tokens":
        body["input"] = draw(token_ids | st.lists(token_ids, min_size=1, max_size=2))
    elif kind == "messages":
        body["messages"] = draw(conversation(tally) | st.lists(conversation(tally), min_size=1, max_size=2))
    elif kind == "conversation":
        body["input"] = draw(conversation(tally))
    elif kind == "conversations":
        body["input"] = draw(st.lists(conversation(tally), min_size=1, max_size=2))
    elif kind == "mixed":
        body["input"] = draw(mixed_list(tally, texts))
    elif kind == "plugin":
        tally.refuse("an IO-processor plugin request")
        body["data"] = {"data": draw(any_url), "data_format": "url"}
    else:
        body["input"] = draw(junk)
    return body


@st.composite
def score_input(draw: st.DrawFn, tally: Tally) -> Any:
    kind = pick(draw, tally, ["text", "text", "content", "content", "junk"], ["bare part", "part as content"])
    if kind == "text":
        return draw(texts)
    if kind == "content":
        parts = st.just({"type": "text", "text": "a cat"}) | image_part(tally) | video_part(tally)
        return {"content": draw(st.lists(parts | content_part(tally), min_size=1, max_size=2))}
    if kind == "bare part":
        tally.refuse("a media part as a query or document")
        return draw(media_shape())
    if kind == "part as content":
        tally.refuse("a media part as the content itself, not in a list")
        return {"content": draw(media_object())}
    return draw(junk)


SCORE_PAIRS = [("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2")]


def scoring_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    """/score, /v1/score (four pairs of field names); /rerank, /v1/rerank, /v2/rerank (query, documents)."""
    first, second = ("query", "documents") if "rerank" in route else draw(st.sampled_from(SCORE_PAIRS))
    one = score_input(tally)
    body: dict[str, Any] = {
        "model": VLM_MODEL,
        first: draw(one if first == "query" else one | st.lists(one, max_size=3)),
    }
    body[second] = draw(one | st.lists(one, min_size=1, max_size=3))
    if "rerank" in route and draw(st.booleans()):
        body["top_n"] = draw(st.integers(-1, 3))
    return body


def detokenize_body(draw: st.DrawFn, tally: Tally, route: str) -> dict[str, Any]:
    """/detokenize takes token ids, no media at all."""
    body: dict[str, Any] = {"model": VLM_MODEL, "tokens": draw(token_ids | json_values)}
    if now_and_then(draw, tally, 3):
        tally.refuse("media on a route that takes none")
        body["messages"] = [{"role": "user", "content": [draw(image_part(Tally()))]}]
    return body


FAMILIES: dict[str, BodyDraw] = {
    "/v1/chat/completions": chat_body,
    "/v1/chat/completions/render": chat_body,
    "/v1/chat/completions/batch": chat_body,
    "/tokenize": chat_body,
    "/v1/completions": completions_body,
    "/v1/completions/render": completions_body,
    "/v1/responses": responses_body,
    "/v1/messages": anthropic_body,
    "/v1/messages/count_tokens": anthropic_body,
    "/v1/embeddings": pooling_body,
    "/pooling": pooling_body,
    "/classify": pooling_body,
    "/score": scoring_body,
    "/v1/score": scoring_body,
    "/rerank": scoring_body,
    "/v1/rerank": scoring_body,
    "/v2/rerank": scoring_body,
    "/detokenize": detokenize_body,
}


# --- Cases ---------------------------------------------------------------------------


def encode(body: dict[str, Any]) -> bytes:
    """JSON as a client sends it; a lone surrogate keeps its escape."""
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(body).encode()


def deeply_nested(body: bytes, depth: int) -> bytes:
    """`body` (a JSON object) with a list nested `depth` levels deep as one more field."""
    return body[:-1] + b', "nested": ' + b"[" * depth + b"]" * depth + b"}"


def not_a_json_object(body: bytes) -> str | None:
    """Why the wrapper refuses `body` before reading a field, or None when it is a JSON object."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return "not JSON"
    return None if isinstance(value, dict) else "JSON but not an object"


@st.composite
def route_body(draw: st.DrawFn, route: str) -> Case:
    tally = Tally(budget=draw(st.sampled_from([0, 1, 1, None])))
    body = FAMILIES[route](draw, tally, route)
    body.update(draw(extras(tally)))
    raw = encode(body)
    if sometimes(draw, 10):  # past a parser's recursion limit or not: either way no media hides in it
        raw = deeply_nested(raw, draw(st.sampled_from([500, 990, 2_000, 100_000])))
    return Case(route, raw, tally.refusal())


@st.composite
def junk_body(draw: st.DrawFn, route: str) -> Case:
    raw = draw(
        weighted(
            (2, st.binary(max_size=40)),
            (2, json_values.map(lambda value: json.dumps(value).encode())),
            (1, route_body(route).map(lambda case: case.body[:-3])),  # truncated JSON
        )
    )
    return Case(route, raw, not_a_json_object(raw))


def cases(route: str) -> st.SearchStrategy[Case]:
    return weighted((10, route_body(route)), (1, junk_body(route)))


every_route = st.sampled_from(JSON_ROUTES).flatmap(cases)
