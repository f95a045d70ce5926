"""Images and videos in chat requests, end to end on the tiny Qwen2-VL CPU engine.

What a user of the image sees:
- images by URL, base64 PNG/JPEG/WebP, two images at once, a base64 MP4
  video and a streamed image request are answered (official `openai` client);
- a request with too many images, an oversized, corrupt, fake or bomb image,
  an image for a text-only model, or a media URL that is not allowed
  (`file:`, cloud metadata, a private address, a redirect to a refused
  address, a host that never answers) gets the documented 4xx and message,
  and the engine never sees it: its own request counter for
  /v1/chat/completions does not move. The server stays healthy throughout;
- an image larger than MAX_IMAGE_SIDE reaches the engine downscaled.

There is no internet here: a local HTTP server on 127.0.0.1 plays the remote
media host (the `vlm_stack` allows private media URLs for that reason; the
tests of the default policy use a wrapper-only instance without it).
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import TEXT_MODEL, VLM_MODEL
from tests.media_server import MediaServer, png_claiming_size, sample_image, sample_mp4
from tests.stack import Stack

QUESTION = "Describe this."
MAX_IMAGE_SIDE = 256  # the vlm_stack's setting
# Default-policy wrapper settings in front of the vlm_stack's engine: in
# wrapper-only mode the model directory is unknown, so the limits decide.
VLM_WRAPPER_ENV = {"SERVED_MODEL_NAME": VLM_MODEL, "IMAGE_LIMIT": "2", "VIDEO_LIMIT": "1"}


# --- Helpers ----------------------------------------------------------------------


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat_body(*parts: dict[str, Any], model: str = VLM_MODEL) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}],
        "max_tokens": 4,
        "temperature": 0,
    }


def ask(base_url: str, *parts: dict[str, Any]) -> Any:
    """A chat completion with the question and `parts`, through the official client."""
    reply = client(base_url).chat.completions.create(**chat_body(*parts))
    assert reply.choices[0].finish_reason in ("length", "stop")
    return reply


def engine_requests(engine_url: str, route: str = "/v1/chat/completions") -> float:
    """Requests the engine's own HTTP server got on `route`, whatever it answered."""
    text = httpx.get(f"{engine_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("http_requests_total{") and f'handler="{route}"' in line
    )


def assert_refused_before_engine(
    stack: Stack,
    body: dict[str, Any],
    status: int,
    fragments: tuple[str, ...],
    param: str,
    route: str = "/v1/chat/completions",
) -> float:
    """POST `body` to `route`; the answer is `status` with an OpenAI error naming `param`, the engine was not called.

    Returns how long the answer took (seconds).
    """
    before = engine_requests(stack.engine_url, route)
    started = time.monotonic()
    response = httpx.post(f"{stack.base_url}{route}", json=body, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    assert engine_requests(stack.engine_url, route) == before
    assert httpx.get(f"{stack.base_url}/health", timeout=10).status_code == 200
    return elapsed


def noise_png(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress: its size in bytes is about 3 x its pixels."""
    buffer = BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_server() -> Iterator[MediaServer]:
    """The stand-in media host on 127.0.0.1, run on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="media-server", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(MediaServer().__aenter__(), loop).result(10)
    yield server
    asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(scope="module")
def text_only_tokens(vlm_stack: Stack) -> int:
    """Prompt tokens of the question without any media."""
    reply = client(vlm_stack.base_url).chat.completions.create(
        model=VLM_MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}], max_tokens=1
    )
    return reply.usage.prompt_tokens


# --- Accepted ---------------------------------------------------------------------


def test_image_by_url_is_fetched_by_the_wrapper_and_reaches_the_engine(
    vlm_stack: Stack, media_server: MediaServer, text_only_tokens: int
) -> None:
    png = sample_image("PNG", (64, 48))
    media_server.add_file("/photos/cat.png", png, "image/png")

    by_url = ask(vlm_stack.base_url, image_part(media_server.url("/photos/cat.png")))
    inline = ask(vlm_stack.base_url, image_part(data_url("image/png", png)))

    assert [r.path for r in media_server.requests].count("/photos/cat.png") == 1
    assert by_url.usage.prompt_tokens == inline.usage.prompt_tokens > text_only_tokens


@pytest.mark.parametrize(
    ("image_format", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_base64_image(vlm_stack: Stack, text_only_tokens: int, image_format: str, media_type: str) -> None:
    reply = ask(vlm_stack.base_url, image_part(data_url(media_type, sample_image(image_format, (64, 48)))))
    assert reply.usage.prompt_tokens > text_only_tokens


def test_two_images_in_one_request(vlm_stack: Stack, text_only_tokens: int) -> None:
    url = data_url("image/png", sample_image("PNG", (64, 48)))
    one = ask(vlm_stack.base_url, image_part(url))
    two = ask(vlm_stack.base_url, image_part(url), image_part(url))
    assert two.usage.prompt_tokens - text_only_tokens == 2 * (one.usage.prompt_tokens - text_only_tokens)


def test_base64_mp4_video(vlm_stack: Stack, text_only_tokens: int) -> None:
    video = {"type": "video_url", "video_url": {"url": data_url("video/mp4", sample_mp4())}}
    reply = ask(vlm_stack.base_url, video)
    assert reply.usage.prompt_tokens > text_only_tokens


def test_streaming_image_request(vlm_stack: Stack, text_only_tokens: int) -> None:
    url = data_url("image/png", sample_image("PNG", (64, 48)))
    stream = client(vlm_stack.base_url).chat.completions.create(
        **chat_body(image_part(url)), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    finish_reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finish_reasons == ["length"] or finish_reasons == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == ask(vlm_stack.base_url, image_part(url)).usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens > text_only_tokens


# --- Downscaling --------------------------------------------------------------------


def test_image_over_max_image_side_reaches_the_engine_downscaled(vlm_stack: Stack) -> None:
    # The model's processor caps images at 50176 pixels itself (processor_config.json,
    # size.longest_edge), so a square 1024 and a square 256 image would cost the
    # same tokens. A wide image stays under that cap once downscaled to 256 wide.
    big, small = (1024, 128), (MAX_IMAGE_SIDE, 128 * MAX_IMAGE_SIDE // 1024)
    big_url = data_url("image/png", sample_image("PNG", big))
    small_url = data_url("image/png", sample_image("PNG", small))

    through_wrapper = ask(vlm_stack.base_url, image_part(big_url)).usage.prompt_tokens
    small_direct = ask(vlm_stack.engine_url, image_part(small_url)).usage.prompt_tokens
    big_direct = ask(vlm_stack.engine_url, image_part(big_url)).usage.prompt_tokens

    assert through_wrapper == small_direct
    assert through_wrapper < big_direct


# --- Refused before the engine --------------------------------------------------------


def test_engine_request_counter_sees_requests_the_engine_refuses(vlm_stack: Stack) -> None:
    """The 'engine untouched' check below is meaningful: the counter counts 4xx answers too."""
    before = engine_requests(vlm_stack.engine_url)
    url = data_url("image/png", sample_image("PNG", (32, 32)))
    response = httpx.post(
        f"{vlm_stack.engine_url}/v1/chat/completions", json=chat_body(*[image_part(url)] * 3), timeout=60
    )
    assert response.status_code == 400  # the engine's own limit check
    deadline = time.monotonic() + 30
    while engine_requests(vlm_stack.engine_url) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine_requests(vlm_stack.engine_url) == before + 1


def _parts_too_many_images(_: MediaServer) -> list[dict[str, Any]]:
    return [image_part(data_url("image/png", sample_image("PNG", (32, 32))))] * 3


def _parts_corrupt_png(_: MediaServer) -> list[dict[str, Any]]:
    png = sample_image("PNG", (64, 64))
    return [image_part(data_url("image/png", png[: len(png) // 2]))]


def _parts_text_as_image(_: MediaServer) -> list[dict[str, Any]]:
    return [image_part(data_url("image/png", b"just some text, not an image\n"))]


def _parts_decompression_bomb(_: MediaServer) -> list[dict[str, Any]]:
    # 64 M pixels claimed by a ~100-byte file: over MAX_IMAGE_PIXELS (40 M) and
    # under Pillow's own warning threshold, so the wrapper's check is what answers.
    return [image_part(data_url("image/png", png_claiming_size(8000, 8000)))]


def _parts_local_file(_: MediaServer) -> list[dict[str, Any]]:
    return [image_part("file:///etc/passwd")]


def _parts_metadata(_: MediaServer) -> list[dict[str, Any]]:
    return [image_part("http://169.254.169.254/latest/meta-data/")]


def _parts_redirect_to_metadata(server: MediaServer) -> list[dict[str, Any]]:
    server.add_redirect("/hop-to-metadata.png", "http://169.254.169.254/latest/meta-data/")
    return [image_part(server.url("/hop-to-metadata.png"))]


IMAGE_PARAM = "messages[0].content[1].image_url"
REFUSALS: list[tuple[str, Callable[[MediaServer], list[dict[str, Any]]], int, tuple[str, ...], str]] = [
    (
        "three-images",
        _parts_too_many_images,
        400,
        ("The request has 3 images", "at most 2", "IMAGE_LIMIT=2"),
        "messages[0].content[3].image_url",
    ),
    ("corrupt-png", _parts_corrupt_png, 400, ("PNG image is truncated or corrupt",), IMAGE_PARAM),
    ("text-as-image", _parts_text_as_image, 400, ("not a valid PNG, JPEG, WebP or GIF file",), IMAGE_PARAM),
    ("decompression-bomb", _parts_decompression_bomb, 400, ("8000x8000", "MAX_IMAGE_PIXELS="), IMAGE_PARAM),
    ("file-url", _parts_local_file, 400, ("scheme 'file:' is not allowed",), IMAGE_PARAM),
    ("metadata-url", _parts_metadata, 400, ("'169.254.169.254' is a cloud metadata address",), IMAGE_PARAM),
    (
        "redirect-to-metadata",
        _parts_redirect_to_metadata,
        400,
        ("redirects to a refused location", "'169.254.169.254' is a cloud metadata address"),
        IMAGE_PARAM,
    ),
]


@pytest.mark.parametrize(
    ("parts", "status", "fragments", "param"), [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS]
)
def test_refused_media_never_reaches_the_engine(
    vlm_stack: Stack,
    media_server: MediaServer,
    parts: Callable[[MediaServer], list[dict[str, Any]]],
    status: int,
    fragments: tuple[str, ...],
    param: str,
) -> None:
    assert_refused_before_engine(vlm_stack, chat_body(*parts(media_server)), status, fragments, param)


def test_redirect_is_followed_and_its_target_checked_again(vlm_stack: Stack, media_server: MediaServer) -> None:
    """The first hop (an allowed host) is fetched; the target behind it never is.

    0.0.0.0 reaches this very media server on Linux: without the second check
    the image would be fetched and answered.
    """
    media_server.add_file("/behind-redirect.png", sample_image("PNG"), "image/png")
    media_server.add_redirect("/hop-to-unspecified.png", media_server.url("/behind-redirect.png", host="0.0.0.0"))
    assert_refused_before_engine(
        vlm_stack,
        chat_body(image_part(media_server.url("/hop-to-unspecified.png"))),
        400,
        ("redirects to a refused location", "'0.0.0.0' is an unspecified address"),
        IMAGE_PARAM,
    )
    paths = [request.path for request in media_server.requests]
    assert "/hop-to-unspecified.png" in paths
    assert "/behind-redirect.png" not in paths


def test_image_for_text_only_model(text_stack: Stack) -> None:
    body = chat_body(image_part(data_url("image/png", sample_image("PNG"))), model=TEXT_MODEL)
    assert_refused_before_engine(
        text_stack, body, 400, (f"The model '{TEXT_MODEL}' does not accept images",), IMAGE_PARAM
    )


def test_private_url_refused_by_default(vlm_stack: Stack, wrapper, media_server: MediaServer) -> None:
    gateway = wrapper(vlm_stack.engine_url, **VLM_WRAPPER_ENV)
    media_server.add_file("/private.png", sample_image("PNG"), "image/png")
    assert_refused_before_engine(
        gateway,
        chat_body(image_part(media_server.url("/private.png"))),
        400,
        ("'127.0.0.1' is a loopback address", "ALLOW_PRIVATE_MEDIA_URLS=true"),
        IMAGE_PARAM,
    )
    assert "/private.png" not in [request.path for request in media_server.requests]


def test_base64_image_over_max_image_bytes_is_413(vlm_stack: Stack, wrapper) -> None:
    gateway = wrapper(vlm_stack.engine_url, **VLM_WRAPPER_ENV, MAX_IMAGE_BYTES="4096")
    big = noise_png((96, 96))
    assert len(big) > 4096
    assert_refused_before_engine(
        gateway,
        chat_body(image_part(data_url("image/png", big))),
        413,
        (f"The image is {len(big)} bytes", "MAX_IMAGE_BYTES=4096"),
        IMAGE_PARAM,
    )
    small = sample_image("PNG", (32, 32))
    assert len(small) <= 4096
    ask(gateway.base_url, image_part(data_url("image/png", small)))


def test_media_host_that_never_answers_times_out(vlm_stack: Stack, wrapper, media_server: MediaServer) -> None:
    gateway = wrapper(
        vlm_stack.engine_url, **VLM_WRAPPER_ENV, ALLOW_PRIVATE_MEDIA_URLS="true", MEDIA_FETCH_TIMEOUT_S="1"
    )
    media_server.add_slow("/never.png", delay_s=120)
    elapsed = assert_refused_before_engine(
        gateway,
        chat_body(image_part(media_server.url("/never.png"))),
        400,
        ("host '127.0.0.1' timed out after 1 s", "MEDIA_FETCH_TIMEOUT_S"),
        IMAGE_PARAM,
    )
    assert elapsed < 60, "the fetch was not cut at MEDIA_FETCH_TIMEOUT_S"


# --- Responses and Anthropic Messages: the same checks as chat -------------------------


def responses_body(*parts: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "input_text", "text": QUESTION}, *parts]
    return {"model": VLM_MODEL, "input": [{"role": "user", "content": content}], "max_output_tokens": 4,
            "temperature": 0, "store": False}  # fmt: skip


def input_image(url: str) -> dict[str, Any]:
    return {"type": "input_image", "image_url": url, "detail": "auto"}


def messages_body(*blocks: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "text", "text": QUESTION}, *blocks]
    return {"model": VLM_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


def image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


ROUTES = {
    # route -> (body builder, image part builder, JSON path of the image, input tokens of an answer)
    "/v1/responses": (responses_body, input_image, "input[0].content[1].image_url",
                      lambda answer: answer["usage"]["input_tokens"]),
    "/v1/messages": (messages_body, image_block, "messages[0].content[1].source",
                     lambda answer: answer["usage"]["input_tokens"]),
}  # fmt: skip
by_route = pytest.mark.parametrize("route", sorted(ROUTES))


def post_ok(base_url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{base_url}{route}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@by_route
def test_images_reach_the_engine_inline_and_by_url(vlm_stack: Stack, media_server: MediaServer, route: str) -> None:
    """A data: image and an http URL (fetched by the wrapper, sent inline) cost the engine the same tokens."""
    body, image, _, input_tokens = ROUTES[route]
    png = sample_image("PNG", (64, 48))
    media_server.add_file(f"/route{route}.png", png, "image/png")

    text_only = input_tokens(post_ok(vlm_stack.base_url, route, body()))
    inline = input_tokens(post_ok(vlm_stack.base_url, route, body(image(data_url("image/png", png)))))
    by_url = input_tokens(post_ok(vlm_stack.base_url, route, body(image(media_server.url(f"/route{route}.png")))))

    assert by_url == inline > text_only
    assert [r.path for r in media_server.requests].count(f"/route{route}.png") == 1


@by_route
def test_a_pixel_bomb_never_reaches_the_engine(vlm_stack: Stack, route: str) -> None:
    body, image, param, _ = ROUTES[route]
    bomb = data_url("image/png", png_claiming_size(8000, 8000))
    assert_refused_before_engine(vlm_stack, body(image(bomb)), 400, ("8000x8000", "MAX_IMAGE_PIXELS="), param, route)


@by_route
def test_a_private_url_is_refused_by_default(vlm_stack: Stack, wrapper, media_server: MediaServer, route: str) -> None:
    body, image, param, _ = ROUTES[route]
    gateway = wrapper(vlm_stack.engine_url, **VLM_WRAPPER_ENV)
    media_server.add_file(f"/private{route}.png", sample_image("PNG"), "image/png")
    assert_refused_before_engine(
        gateway, body(image(media_server.url(f"/private{route}.png"))), 400,
        ("'127.0.0.1' is a loopback address", "ALLOW_PRIVATE_MEDIA_URLS=true"), param, route,
    )  # fmt: skip
    assert f"/private{route}.png" not in [request.path for request in media_server.requests]


# --- Videos are measured before the engine decodes them ------------------------------------


def test_videos_over_the_limits_never_reach_the_engine(vlm_stack: Stack, wrapper) -> None:
    """4 frames of 32x32 at 4 fps: 1 s. Each limit set just below refuses it, naming its setting."""
    video = {"type": "video_url", "video_url": {"url": data_url("video/mp4", sample_mp4(frames=4, size=(32, 32)))}}
    param = "messages[0].content[1].video_url"
    for setting, value, fragment in (
        ("MAX_VIDEO_FRAMES", "3", "at most MAX_VIDEO_FRAMES=3"),
        ("MAX_VIDEO_PIXELS", "1000", "more than MAX_VIDEO_PIXELS=1000"),
        ("MAX_VIDEO_SECONDS", "0.5", "more than MAX_VIDEO_SECONDS=0.5"),
    ):
        gateway = wrapper(vlm_stack.engine_url, **VLM_WRAPPER_ENV, **{setting: value})
        assert_refused_before_engine(gateway, chat_body(video), 400, (fragment,), param)
    # The same video within the default limits is answered.
    assert ask(vlm_stack.base_url, video).usage.prompt_tokens > 0
