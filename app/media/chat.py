"""The media of a chat request: counted, checked and made inline before the engine.

`prepare_chat_media` is the one entry point the proxy calls for
/v1/chat/completions. It walks the messages once; a request without media
parts costs that one pass and nothing else. For each image or video part it:

1. refuses it when the model takes no such media or the server turned it off,
   and refuses the request when it carries more than IMAGE_LIMIT images or
   VIDEO_LIMIT videos (400);
2. for a base64 `data:` URL: refuses a payload over MAX_IMAGE_BYTES /
   MAX_VIDEO_BYTES from its length alone (413), then verifies the image
   (`app.media.images`, downscaled when too big) or the video container
   (`app.media.videos`);
3. for an http(s) URL: fetches it under the URL rules (`app.media.fetch`),
   verifies it the same way and replaces the URL with a `data:` URL, so the
   engine never fetches anything.

Parts are recognised the way the engine recognises them
(`vllm.renderers.chat_utils._parse_chat_message_content_mm_part`): by `type`,
or by key when `type` is missing or a `uuid` is given. A part the engine
would read as media is never skipped here. Audio is not served: an audio URL
is refused (the engine would fetch it), inline audio passes through.

Decoding and Pillow work run in worker threads; the parts of one request
are prepared concurrently. Every refusal is an `APIError` whose `param` is
the JSON path of the part, e.g. `messages[1].content[2].image_url`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from app.errors import APIError
from app.media.dataurl import DataUrl, build_data_url, decode_base64, is_data_url, parse_data_url
from app.media.fetch import MediaFetcher
from app.media.images import check_image
from app.media.policy import MediaKind, MediaPolicy
from app.media.videos import JPEG_FRAMES_TYPE, check_jpeg_frames, video_media_type

PartRole = Literal["text", "image", "video", "audio"]

# The engine's part types (chat_utils.MM_PARSER_MAP) that matter here -> (role, key of the URL).
PART_TYPES: dict[str, tuple[PartRole, str | None]] = {
    "text": ("text", None),
    "input_text": ("text", None),
    "output_text": ("text", None),
    "refusal": ("text", None),
    "thinking": ("text", None),
    "image_url": ("image", "image_url"),
    "input_image": ("image", "image_url"),
    "video_url": ("video", "video_url"),
    "audio_url": ("audio", "audio_url"),
}
# Every other part type the engine knows: embeddings and inline audio, nothing it fetches.
OTHER_ENGINE_PART_TYPES = frozenset(
    {"image_embeds", "audio_embeds", "video_embeds", "prompt_embeds", "image_pil", "input_audio", "tool_reference"}
)
# Without `type` (or with a `uuid`), the engine picks the first of these keys present.
KEYS_IN_ENGINE_ORDER: tuple[tuple[str, PartRole | None], ...] = (
    ("image_url", "image"),
    ("image_pil", None),
    ("image_embeds", None),
    ("audio_embeds", None),
    ("video_embeds", None),
    ("prompt_embeds", None),
    ("audio_url", "audio"),
    ("input_audio", None),
    ("video_url", "video"),
    ("tool_reference", None),
)
# Typed parts whose URL the engine only takes in object form {"url": ...}.
OBJECT_FORM_TYPES = frozenset({"image_url", "video_url"})

LIMIT_SETTINGS = {"image": "IMAGE_LIMIT", "video": "VIDEO_LIMIT"}
SIZE_SETTINGS = {"image": "MAX_IMAGE_BYTES", "video": "MAX_VIDEO_BYTES"}
PLURALS = {"image": "images", "video": "videos"}


@dataclass(frozen=True, slots=True)
class MediaCounts:
    """Parts of one request, for the request log and metrics."""

    text: int = 0
    image: int = 0
    video: int = 0
    # The body was rewritten (media fetched or downscaled): serialize it again.
    changed: bool = False


@dataclass(slots=True)
class _MediaPart:
    kind: MediaKind
    part: dict[str, Any]
    key: str
    url: str | None
    path: str


async def prepare_chat_media(body: dict[str, Any], policy: MediaPolicy, fetcher: MediaFetcher) -> MediaCounts:
    """Check and inline the media of a chat completion request, in place."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return MediaCounts()
    text = 0
    changed = False
    media: list[_MediaPart] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            text += 1
            continue
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            role, key = _classify(part)
            if role == "text":
                text += 1
            elif role == "audio" and key is not None:
                _check_audio(part, key, f"messages[{i}].content[{j}].{key}")
            elif role in ("image", "video") and key is not None:
                found, normalized = _media_part(role, part, key, f"messages[{i}].content[{j}].{key}")
                media.append(found)
                changed = changed or normalized
    if not media:
        return MediaCounts(text=text, changed=changed)

    images = [m for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    _check_count("image", images, policy)
    _check_count("video", videos, policy)
    tasks = [asyncio.create_task(_prepare(m, policy, fetcher)) for m in media if m.url is not None]
    try:
        replaced = await asyncio.gather(*tasks)
    except Exception:
        # The first refusal answers the request; the other parts' work is dropped
        # (and their outcomes collected, so none is reported as never retrieved).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    changed = changed or any(replaced)
    return MediaCounts(text=text, image=len(images), video=len(videos), changed=changed)


def _classify(part: dict[str, Any]) -> tuple[PartRole | None, str | None]:
    """What the engine reads from this part: (role, key holding the URL)."""
    part_type = part.get("type")
    by_type = isinstance(part_type, str) and part.get("uuid") is None
    if by_type and part_type in PART_TYPES:
        return PART_TYPES[part_type]
    if by_type and part_type in OTHER_ENGINE_PART_TYPES:
        return None, None
    if part_type is None or part.get("uuid") is not None:
        for key, role in KEYS_IN_ENGINE_ORDER:
            if key in part:
                return role, key
    return None, None


def _media_part(kind: MediaKind, part: dict[str, Any], key: str, path: str) -> tuple[_MediaPart, bool]:
    """The part's URL; a typed part's plain-string URL is put in the object form the engine needs."""
    value = part.get(key)
    normalized = False
    if isinstance(value, str) and part.get("type") in OBJECT_FORM_TYPES and part.get("uuid") is None:
        value = part[key] = {"url": value}
        normalized = True
    if isinstance(value, dict):
        url = value.get("url")
    elif isinstance(value, str) or value is None:
        url = value
    else:
        raise APIError(400, f"{path} must be an object with a 'url' string.", param=path)
    if url is not None and not isinstance(url, str):
        raise APIError(400, f"{path}.url must be a string: an http(s) URL or a base64 data: URL.", param=path)
    return _MediaPart(kind, part, key, url, path), normalized


def _check_audio(part: dict[str, Any], key: str, path: str) -> None:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str) and not is_data_url(url):
        raise APIError(
            400,
            "Audio URLs are not fetched by this server; send the audio inline as a base64 data: URL.",
            param=path,
        )


def _check_count(kind: MediaKind, parts: list[_MediaPart], policy: MediaPolicy) -> None:
    if not parts:
        return
    plural = PLURALS[kind]
    if kind not in policy.modalities:
        raise APIError(
            400,
            f"The model '{policy.model_name}' does not accept {plural}; send text only, "
            f"or serve a model that takes {plural}.",
            param=parts[0].path,
        )
    limit = policy.limit(kind)
    if limit == 0:
        raise APIError(
            400, f"{plural.capitalize()} are turned off on this server ({LIMIT_SETTINGS[kind]}=0).", param=parts[0].path
        )
    if len(parts) > limit:
        raise APIError(
            400,
            f"The request has {len(parts)} {plural}; this server allows at most {limit} per request "
            f"({LIMIT_SETTINGS[kind]}={limit}).",
            param=parts[limit].path,
        )


async def _prepare(media: _MediaPart, policy: MediaPolicy, fetcher: MediaFetcher) -> bool:
    """Verify one part's media; returns whether its URL was replaced."""
    assert media.url is not None
    with _located(media.path):
        if is_data_url(media.url):
            inline = parse_data_url(media.url)
            _check_inline_size(media.kind, inline, policy)
            if media.kind == "video":
                await asyncio.to_thread(_check_inline_video, inline, policy)
                return False
            resized = await asyncio.to_thread(_resized_inline_image, inline.payload, policy)
            if resized is None:
                return False
            _replace_url(media, resized)
            return True
        data = await fetcher.fetch(
            media.url, max_bytes=policy.max_bytes(media.kind), limit_name=SIZE_SETTINGS[media.kind]
        )
        if media.kind == "image":
            inlined = await asyncio.to_thread(_image_data_url, data, policy)
        else:
            inlined = await asyncio.to_thread(_video_data_url, data)
        _replace_url(media, inlined)
        return True


def _check_inline_size(kind: MediaKind, inline: DataUrl, policy: MediaPolicy) -> None:
    size, limit = inline.decoded_size, policy.max_bytes(kind)
    if size > limit:
        raise APIError(
            413, f"The {kind} is {size} bytes, more than {SIZE_SETTINGS[kind]}={limit} bytes; send a smaller {kind}."
        )


# --- Blocking work, run in worker threads --------------------------------------


def _resized_inline_image(payload: str, policy: MediaPolicy) -> str | None:
    """A data URL of the downscaled image, or None when the original is forwarded unchanged."""
    checked = check_image(decode_base64(payload), max_pixels=policy.max_image_pixels, max_side=policy.max_image_side)
    return None if checked.resized is None else build_data_url(checked.media_type, checked.resized)


def _image_data_url(data: bytes, policy: MediaPolicy) -> str:
    checked = check_image(data, max_pixels=policy.max_image_pixels, max_side=policy.max_image_side)
    return build_data_url(checked.media_type, data if checked.resized is None else checked.resized)


def _check_inline_video(inline: DataUrl, policy: MediaPolicy) -> None:
    if inline.media_type == JPEG_FRAMES_TYPE:
        check_jpeg_frames(inline.payload, max_pixels=policy.max_image_pixels)
    else:
        video_media_type(decode_base64(inline.payload))


def _video_data_url(data: bytes) -> str:
    return build_data_url(video_media_type(data), data)


# --- Helpers --------------------------------------------------------------------


def _replace_url(media: _MediaPart, url: str) -> None:
    value = media.part.get(media.key)
    if isinstance(value, dict):
        value["url"] = url
    else:
        media.part[media.key] = url


@contextmanager
def _located(path: str) -> Iterator[None]:
    """Point errors raised below at the part's JSON path."""
    try:
        yield
    except APIError as error:
        if error.param is None:
            error.param = path
        raise
