"""The wrapper reads content parts exactly as the installed engine does.

`app.media.chat` mirrors the engine's rules for which part carries which
media (by `type`, or by key when `type` is missing or a `uuid` is given). If
an engine upgrade changed those rules, a URL could reach the engine's own
fetcher unchecked. This test feeds the same parts to the engine's parser and
to `prepare_chat_media`: every part from which the engine would take a URL
must be refused by the wrapper when that URL is private.

Importing the engine's parser loads vLLM (about 10-20 s on the project's
machines); no engine process is started.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.config import load_settings
from app.errors import APIError
from app.media import MediaFetcher, MediaPolicy, prepare_chat_media

chat_utils = pytest.importorskip("vllm.renderers.chat_utils", reason="the vLLM engine is not installed")

PRIVATE = "http://10.0.0.1/x"
URL_PART_TYPES = {"image_url", "input_image", "video_url", "audio_url"}

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


def engine_reads_url(part: dict[str, Any]) -> bool:
    part_type, content = chat_utils._parse_chat_message_content_mm_part(part)
    return part_type in URL_PART_TYPES and content == PRIVATE


def test_the_engine_part_types_are_the_ones_the_wrapper_knows() -> None:
    from app.media.chat import OTHER_ENGINE_PART_TYPES, PART_TYPES

    assert set(chat_utils.MM_PARSER_MAP) == set(PART_TYPES) | OTHER_ENGINE_PART_TYPES


@pytest.mark.asyncio
@pytest.mark.parametrize("part", SHAPES, ids=lambda part: ",".join(f"{k}" for k in part))
async def test_every_part_the_engine_would_fetch_is_checked(part: dict[str, Any]) -> None:
    policy = MediaPolicy.from_settings(load_settings({"IMAGE_LIMIT": "4"}), frozenset({"text", "image", "video"}))
    body = {"messages": [{"role": "user", "content": [dict(part)]}]}
    async with MediaFetcher(policy.urls) as fetcher:
        if engine_reads_url(part):
            with pytest.raises(APIError) as caught:
                await prepare_chat_media(body, policy, fetcher)
            assert caught.value.status == 400
            assert caught.value.param is not None and caught.value.param.startswith("messages[0].content[0].")
        else:
            await prepare_chat_media(body, policy, fetcher)
