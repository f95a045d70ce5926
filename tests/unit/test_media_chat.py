"""prepare_media on /v1/chat/completions: what a client sending images and videos in chat requests gets."""

from __future__ import annotations

import base64
import copy
import dataclasses
import ipaddress
import time
from collections.abc import AsyncIterator
from io import BytesIO
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from app.config import load_settings
from app.errors import APIError
from app.media import MediaCounts, MediaFetcher, MediaPolicy, prepare_media
from tests.media_server import MediaServer, StaticResolver, png_claiming_size, sample_image, sample_mp4

VISION_LANGUAGE = frozenset({"text", "image", "video"})
IMAGE_ONLY = frozenset({"text", "image"})
TEXT_ONLY = frozenset({"text"})
TEST_HOST = "images.example.test"
PNG = sample_image("PNG", (40, 30))
MP4 = sample_mp4()


def media_policy(env: dict[str, str] | None = None, modalities: frozenset[str] = VISION_LANGUAGE) -> MediaPolicy:
    policy = MediaPolicy.from_settings(load_settings({"MODEL_NAME": "org/model", **(env or {})}), modalities)
    # The test server on 127.0.0.1 plays the public host images.example.test.
    trusted = frozenset({(TEST_HOST, ipaddress.ip_address("127.0.0.1"))})
    return dataclasses.replace(policy, urls=dataclasses.replace(policy.urls, trusted_addresses=trusted))


async def prepare(body: dict[str, Any], policy: MediaPolicy | None = None) -> MediaCounts:
    policy = policy or media_policy()
    async with MediaFetcher(policy.urls, resolver=StaticResolver({TEST_HOST: [["127.0.0.1"]]})) as fetcher:
        return await prepare_media("/v1/chat/completions", body, policy, fetcher)


async def refusal(body: dict[str, Any], policy: MediaPolicy | None = None) -> APIError:
    with pytest.raises(APIError) as caught:
        await prepare(body, policy)
    return caught.value


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "org/model",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is in this?"}, *parts]},
        ],
    }


def url_of(body: dict[str, Any], index: int = 1) -> str:
    part = body["messages"][1]["content"][index]
    key = "image_url" if "image_url" in part else "video_url"
    value = part[key]
    return value["url"] if isinstance(value, dict) else value


def decode(url: str) -> tuple[str, bytes]:
    header, payload = url.split(",", 1)
    return header, base64.b64decode(payload)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MediaServer]:
    async with MediaServer() as media_server:
        yield media_server


# --- Requests without media --------------------------------------------------------


@pytest.mark.asyncio
async def test_text_only_requests_are_counted_and_left_alone() -> None:
    body = chat()
    body["messages"].append({"role": "assistant", "content": None, "tool_calls": []})
    original = copy.deepcopy(body)
    assert await prepare(body) == MediaCounts(text=2)
    assert body == original


# --- Inline (base64) images -------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(("image_format", "mode"), [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGBA"), ("GIF", "P")])
async def test_base64_images_are_accepted_and_forwarded_unchanged(image_format: str, mode: str) -> None:
    body = chat(image(data_url(sample_image(image_format, (50, 40), mode), f"image/{image_format.lower()}")))
    original = copy.deepcopy(body)
    counts = await prepare(body)
    assert counts == MediaCounts(text=2, image=1)
    assert body == original


@pytest.mark.asyncio
async def test_more_images_than_image_limit_is_400_pointing_at_the_first_extra() -> None:
    png = data_url(PNG, "image/png")
    error = await refusal(chat(image(png), image(png), image(png)), media_policy({"IMAGE_LIMIT": "2"}))
    assert error.status == 400
    assert "3 images" in error.message and "IMAGE_LIMIT=2" in error.message
    assert error.param == "messages[1].content[3].image_url"


@pytest.mark.asyncio
async def test_more_videos_than_video_limit_is_400() -> None:
    mp4 = data_url(MP4, "video/mp4")
    error = await refusal(chat(video(mp4), video(mp4)))
    assert error.status == 400 and "VIDEO_LIMIT=1" in error.message
    assert error.param == "messages[1].content[2].video_url"


@pytest.mark.asyncio
async def test_images_over_max_image_bytes_are_413_before_decoding() -> None:
    png = sample_image("PNG", (400, 400))
    limit = len(png) - 1
    policy = media_policy({"MAX_IMAGE_BYTES": str(limit)})
    error = await refusal(chat(image(data_url(png, "image/png"))), policy)
    assert error.status == 413
    assert f"{len(png)} bytes, more than MAX_IMAGE_BYTES={limit}" in error.message
    at_limit = media_policy({"MAX_IMAGE_BYTES": str(len(png))})
    assert await prepare(chat(image(data_url(png, "image/png"))), at_limit) == MediaCounts(text=2, image=1)
    # Not even valid base64: refused for its size, so nothing was decoded.
    error = await refusal(chat(image("data:image/png;base64," + "!" * 10_000)), policy)
    assert error.status == 413


@pytest.mark.asyncio
async def test_videos_over_max_video_bytes_are_413() -> None:
    error = await refusal(chat(video(data_url(MP4, "video/mp4"))), media_policy({"MAX_VIDEO_BYTES": "1000"}))
    assert error.status == 413 and "MAX_VIDEO_BYTES=1000" in error.message


@pytest.mark.asyncio
async def test_corrupt_png_is_400_with_the_part_path() -> None:
    corrupt = bytearray(sample_image("PNG", (128, 128)))
    start = corrupt.index(b"IDAT") + 8
    corrupt[start : start + 32] = b"\xff" * 32
    body = chat({"type": "text", "text": "and this?"}, image(data_url(bytes(corrupt), "image/png")))
    error = await refusal(body)
    assert error.status == 400 and "truncated or corrupt" in error.message
    assert error.param == "messages[1].content[2].image_url"


@pytest.mark.asyncio
async def test_text_file_labelled_image_png_is_400() -> None:
    error = await refusal(chat(image(data_url(b"just some text\n" * 20, "image/png"))))
    assert error.status == 400 and "not a valid PNG, JPEG, WebP or GIF" in error.message


@pytest.mark.asyncio
async def test_decompression_bomb_is_400() -> None:
    error = await refusal(chat(image(data_url(png_claiming_size(100_000, 100_000), "image/png"))))
    assert error.status == 400 and "MAX_IMAGE_PIXELS" in error.message


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,iVBORw0KGgo===?", "not valid base64"),
        ("data:image/png,rawbytes", "Only base64 data: URLs"),
        ("data:image/png;base64", "no ','"),
    ],
)
async def test_malformed_data_urls_are_400(url: str, message: str) -> None:
    error = await refusal(chat(image(url)))
    assert error.status == 400 and message in error.message


@pytest.mark.asyncio
async def test_large_base64_images_are_downscaled_keeping_aspect() -> None:
    body = chat(image(data_url(sample_image("JPEG", (1200, 800)), "image/jpeg")))
    counts = await prepare(body, media_policy({"MAX_IMAGE_SIDE": "300"}))
    assert counts == MediaCounts(text=2, image=1, changed=True)
    header, data = decode(url_of(body))
    assert header == "data:image/jpeg;base64"
    with Image.open(BytesIO(data)) as resized:
        assert resized.size == (300, 200)


# --- Modalities ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_image_sent_to_a_text_only_model_is_400() -> None:
    error = await refusal(chat(image(data_url(PNG, "image/png"))), media_policy(modalities=TEXT_ONLY))
    assert error.status == 400
    assert "model 'org/model' does not accept images" in error.message
    assert error.param == "messages[1].content[1].image_url"


@pytest.mark.asyncio
async def test_video_sent_to_an_image_only_model_is_400() -> None:
    body = chat(image(data_url(PNG, "image/png")), video(data_url(MP4, "video/mp4")))
    error = await refusal(body, media_policy(modalities=IMAGE_ONLY))
    assert error.status == 400 and "does not accept videos" in error.message
    assert error.param == "messages[1].content[2].video_url"


@pytest.mark.asyncio
async def test_a_zero_limit_turns_the_modality_off() -> None:
    error = await refusal(chat(image(data_url(PNG, "image/png"))), media_policy({"IMAGE_LIMIT": "0"}))
    assert error.status == 400 and "turned off on this server (IMAGE_LIMIT=0)" in error.message


# --- Inline videos ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_base64_mp4_is_accepted_unchanged() -> None:
    body = chat(video(data_url(MP4, "video/mp4")))
    original = copy.deepcopy(body)
    assert await prepare(body) == MediaCounts(text=2, video=1)
    assert body == original


@pytest.mark.asyncio
async def test_something_that_is_not_a_video_container_is_400() -> None:
    error = await refusal(chat(video(data_url(PNG, "video/mp4"))))
    assert error.status == 400 and "is not a MP4" in error.message


@pytest.mark.asyncio
async def test_jpeg_frame_lists_are_checked_frame_by_frame() -> None:
    frame = base64.b64encode(sample_image("JPEG", (32, 32))).decode()
    assert await prepare(chat(video(f"data:video/jpeg;base64,{frame},{frame}"))) == MediaCounts(text=2, video=1)
    png_frame = base64.b64encode(PNG).decode()
    error = await refusal(chat(video(f"data:video/jpeg;base64,{frame},{png_frame}")))
    assert error.status == 400 and "not a valid JPEG file" in error.message


# --- Media URLs ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "scheme 'file:' is not allowed"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata address"),
        ("http://[::1]/x.png", "loopback"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://2130706433/x.png", "non-standard form"),
    ],
)
async def test_unsafe_media_urls_are_400(url: str, message: str) -> None:
    error = await refusal(chat(image(url)))
    assert error.status == 400 and message in error.message
    assert error.param == "messages[1].content[1].image_url"


@pytest.mark.asyncio
async def test_fetched_images_are_inlined_with_the_verified_media_type(server: MediaServer) -> None:
    server.add_file("/photo", PNG, "application/octet-stream")
    body = chat(image(server.url("/photo", TEST_HOST)))
    assert await prepare(body) == MediaCounts(text=2, image=1, changed=True)
    assert decode(url_of(body)) == ("data:image/png;base64", PNG)


@pytest.mark.asyncio
async def test_fetched_large_images_are_downscaled(server: MediaServer) -> None:
    server.add_file("/wide.png", sample_image("PNG", (1000, 250)), "image/png")
    body = chat(image(server.url("/wide.png", TEST_HOST)))
    await prepare(body, media_policy({"MAX_IMAGE_SIDE": "200"}))
    header, data = decode(url_of(body))
    assert header == "data:image/png;base64"
    with Image.open(BytesIO(data)) as resized:
        assert resized.size == (200, 50)


@pytest.mark.asyncio
async def test_fetched_videos_are_inlined(server: MediaServer) -> None:
    server.add_file("/clip", MP4, "application/octet-stream")
    body = chat(video(server.url("/clip", TEST_HOST)))
    assert await prepare(body) == MediaCounts(text=2, video=1, changed=True)
    assert decode(url_of(body)) == ("data:video/mp4;base64", MP4)


@pytest.mark.asyncio
async def test_several_urls_in_one_request_are_all_inlined(server: MediaServer) -> None:
    jpeg = sample_image("JPEG", (30, 30))
    server.add_file("/a.png", PNG, "image/png")
    server.add_file("/b.jpg", jpeg, "image/jpeg")
    body = chat(image(server.url("/a.png", TEST_HOST)), image(server.url("/b.jpg", TEST_HOST)))
    await prepare(body)
    assert decode(url_of(body, 1)) == ("data:image/png;base64", PNG)
    assert decode(url_of(body, 2)) == ("data:image/jpeg;base64", jpeg)


@pytest.mark.asyncio
async def test_fetched_non_images_are_400(server: MediaServer) -> None:
    server.add_file("/page.png", b"<html>not an image</html>", "image/png")
    error = await refusal(chat(image(server.url("/page.png", TEST_HOST))))
    assert error.status == 400 and "not a valid PNG" in error.message
    assert error.param == "messages[1].content[1].image_url"


@pytest.mark.asyncio
async def test_loopback_urls_need_allow_private_media_urls(server: MediaServer) -> None:
    server.add_file("/x.png", PNG, "image/png")
    error = await refusal(chat(image(server.url("/x.png"))))
    assert error.status == 400 and "ALLOW_PRIVATE_MEDIA_URLS=true" in error.message
    body = chat(image(server.url("/x.png")))
    await prepare(body, media_policy({"ALLOW_PRIVATE_MEDIA_URLS": "true"}))
    assert decode(url_of(body)) == ("data:image/png;base64", PNG)


@pytest.mark.asyncio
async def test_allowed_media_domains_setting(server: MediaServer) -> None:
    server.add_file("/x.png", PNG, "image/png")
    policy = media_policy({"ALLOWED_MEDIA_DOMAINS": "cdn.example.com, *.example.test"})
    body = chat(image(server.url("/x.png", TEST_HOST)))
    await prepare(body, policy)
    assert decode(url_of(body))[1] == PNG
    error = await refusal(chat(image("https://elsewhere.example.com/x.png")), policy)
    assert "not in ALLOWED_MEDIA_DOMAINS" in error.message


@pytest.mark.asyncio
async def test_fetch_timeouts_are_400_naming_the_host(server: MediaServer) -> None:
    server.add_slow("/slow.png", 5)
    policy = media_policy({"MEDIA_FETCH_TIMEOUT_S": "0.3"})
    error = await refusal(chat(image(server.url("/slow.png", TEST_HOST) + "?sig=abc")), policy)
    assert error.status == 400
    assert f"host '{TEST_HOST}' timed out after 0.3 s" in error.message and "sig=abc" not in error.message
    assert error.param == "messages[1].content[1].image_url"


# --- The part shapes the engine accepts ----------------------------------------------


@pytest.mark.asyncio
async def test_plain_string_image_url_forms(server: MediaServer) -> None:
    server.add_file("/x.png", PNG, "image/png")
    url = server.url("/x.png", TEST_HOST)
    body = chat(
        {"type": "image_url", "image_url": url},  # typed, string: put in the object form the engine needs
        {"image_url": url},  # untyped: the engine takes the string as it is
        {"type": "input_image", "image_url": url},
    )
    counts = await prepare(body, media_policy({"IMAGE_LIMIT": "3"}))
    assert counts == MediaCounts(text=2, image=3, changed=True)
    parts = body["messages"][1]["content"]
    inlined = data_url(PNG, "image/png")
    assert parts[1] == {"type": "image_url", "image_url": {"url": inlined}}
    assert parts[2] == {"image_url": inlined}
    assert parts[3] == {"type": "input_image", "image_url": inlined}


@pytest.mark.asyncio
async def test_untyped_parts_and_uuid_parts_are_checked_like_the_engine_reads_them() -> None:
    error = await refusal(chat({"video_url": "file:///etc/passwd"}))
    assert error.param == "messages[1].content[1].video_url"
    error = await refusal(chat({"type": "image_url", "uuid": "u1", "image_url": "http://10.0.0.1/a.png"}))
    assert "private address" in error.message
    # A uuid alone refers to media the engine has cached: counted, nothing to check.
    assert await prepare(chat({"type": "image_url", "uuid": "u1", "image_url": None})) == MediaCounts(text=2, image=1)


@pytest.mark.asyncio
async def test_audio_urls_are_refused_inline_audio_passes() -> None:
    error = await refusal(chat({"type": "audio_url", "audio_url": {"url": "http://169.254.169.254/a.wav"}}))
    assert error.status == 400 and "Audio URLs are not fetched" in error.message
    inline = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    assert await prepare(chat(inline)) == MediaCounts(text=2)


@pytest.mark.asyncio
async def test_wrongly_shaped_image_parts_are_400() -> None:
    error = await refusal(chat({"type": "image_url", "image_url": {"url": 42}}))
    assert error.status == 400 and error.param == "messages[1].content[1].image_url"
    error = await refusal(chat({"type": "image_url", "image_url": ["http://example.com/a.png"]}))
    assert error.status == 400


@pytest.mark.asyncio
async def test_one_refused_part_ends_the_request_without_waiting_for_the_others(server: MediaServer) -> None:
    server.add_slow("/slow.png", 300)
    body = chat(image(server.url("/slow.png", TEST_HOST)), image("file:///etc/passwd"))
    started = time.monotonic()
    error = await refusal(body, media_policy({"MEDIA_FETCH_TIMEOUT_S": "300"}))
    assert time.monotonic() - started < 60, "the refusal waited for the slow fetch"
    assert error.param == "messages[1].content[2].image_url"
