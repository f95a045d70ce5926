"""Videos are measured before the engine sees them: frame size, frame count, duration, readability.

The test videos are real (encoded with PyAV here) and tiny; the limits are
set low in each test's policy instead, so that every limit is exercised
without building a big video. Every refusal must name its setting.
"""

from __future__ import annotations

import base64
import copy
import struct
from collections.abc import AsyncIterator
from io import BytesIO
from typing import Any

import pytest
import pytest_asyncio

from app.errors import APIError
from app.media import MediaCounts, MediaFetcher, MediaPolicy, prepare_media
from app.media.videos import VideoLimits, check_video
from tests.media_server import MediaServer, StaticResolver, sample_image, sample_video
from tests.unit.test_media_routes import TEST_HOST, media_policy

ROUTE = "/v1/chat/completions"
PARAM = "messages[0].content[1].video_url"
CONTAINERS = {"mp4": "video/mp4", "webm": "video/webm", "avi": "video/x-msvideo", "mpegts": "video/mp2t"}
# 10 frames of 64x48 at 4 fps: 2.5 s.
FRAMES, SIZE, FPS = 10, (64, 48), 4
LOOSE = VideoLimits(max_pixels=1920 * 1080, max_frames=9000, max_seconds=300)


def video_body(url: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What happens?"},
                                         {"type": "video_url", "video_url": {"url": url}}]},
        ]
    }  # fmt: skip


def data_url(data: bytes, media_type: str = "video/mp4") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def limits_policy(**limits: float) -> MediaPolicy:
    return media_policy({name: str(value) for name, value in limits.items()})


async def prepare(body: dict[str, Any], policy: MediaPolicy) -> MediaCounts:
    async with MediaFetcher(policy.urls, resolver=StaticResolver({TEST_HOST: [["127.0.0.1"]]})) as fetcher:
        return await prepare_media(ROUTE, body, policy, fetcher)


async def refusal(body: dict[str, Any], policy: MediaPolicy) -> APIError:
    with pytest.raises(APIError) as caught:
        await prepare(body, policy)
    return caught.value


@pytest_asyncio.fixture
async def server() -> AsyncIterator[MediaServer]:
    async with MediaServer() as media_server:
        yield media_server


@pytest.fixture(scope="module", params=sorted(CONTAINERS))
def container(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def video(container: str) -> bytes:
    return sample_video(container, frames=FRAMES, size=SIZE, fps=FPS)


# --- Accepted ----------------------------------------------------------------------------


async def test_a_small_video_passes_unchanged(container: str, video: bytes) -> None:
    assert check_video(video, LOOSE) == CONTAINERS[container]
    body = video_body(data_url(video, CONTAINERS[container]))
    original = copy.deepcopy(body)
    assert await prepare(body, media_policy()) == MediaCounts(text=1, video=1)
    assert body == original


async def test_a_video_exactly_at_every_limit_passes(video: bytes) -> None:
    policy = limits_policy(MAX_VIDEO_PIXELS=SIZE[0] * SIZE[1], MAX_VIDEO_FRAMES=FRAMES, MAX_VIDEO_SECONDS=2.5)
    assert (await prepare(video_body(data_url(video)), policy)).video == 1


# --- Each limit refuses, naming its setting -----------------------------------------------


async def test_frames_larger_than_max_video_pixels_are_refused(video: bytes) -> None:
    limit = SIZE[0] * SIZE[1] - 1
    error = await refusal(video_body(data_url(video)), limits_policy(MAX_VIDEO_PIXELS=limit))
    assert error.status == 400 and error.param == PARAM
    assert f"64x48 (3072 pixels per frame), more than MAX_VIDEO_PIXELS={limit}" in error.message


async def test_more_frames_than_max_video_frames_are_refused(container: str, video: bytes) -> None:
    """MP4 and AVI state the frame count in the header; WebM and MPEG-TS do not, so packets are counted."""
    error = await refusal(video_body(data_url(video)), limits_policy(MAX_VIDEO_FRAMES=FRAMES - 1))
    assert error.status == 400 and error.param == PARAM
    assert f"at most MAX_VIDEO_FRAMES={FRAMES - 1}" in error.message


async def test_videos_longer_than_max_video_seconds_are_refused(video: bytes) -> None:
    error = await refusal(video_body(data_url(video)), limits_policy(MAX_VIDEO_SECONDS=2))
    assert error.status == 400 and error.param == PARAM
    assert "lasts 2.5 s, more than MAX_VIDEO_SECONDS=2" in error.message


async def test_a_header_claiming_a_billion_frames_is_refused_without_reading_them() -> None:
    """The engine's loader trusts the header's frame count and would walk that many frames."""
    video = bytearray(sample_video("mp4", frames=4, size=(32, 32)))
    stts = video.index(b"stts")  # entry count, then (sample count, sample delta)
    struct.pack_into(">I", video, stts + 12, 1_000_000_000)
    error = await refusal(video_body(data_url(bytes(video))), media_policy())
    assert "The video has 1000000000 frames" in error.message and "MAX_VIDEO_FRAMES=9000" in error.message


async def test_fetched_videos_are_measured_too(server: MediaServer) -> None:
    server.add_file("/clip.webm", sample_video("webm", frames=FRAMES, size=SIZE, fps=FPS), "video/webm")
    body = video_body(server.url("/clip.webm", TEST_HOST))
    error = await refusal(body, limits_policy(MAX_VIDEO_FRAMES=3))
    assert "MAX_VIDEO_FRAMES=3" in error.message and error.param == PARAM
    body = video_body(server.url("/clip.webm", TEST_HOST))
    assert await prepare(body, media_policy()) == MediaCounts(text=1, video=1, changed=True)
    assert body["messages"][0]["content"][1]["video_url"]["url"].startswith("data:video/webm;base64,")


# --- Unreadable -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "fragment"),
    [
        (lambda data: data[: len(data) // 2], "could not be read"),
        (lambda data: data[:64], "could not be read"),
        (lambda data: data[:40] + b"\0" * 4000, "could not be read"),
        (lambda data: sample_image("PNG"), "is not a MP4"),
        (lambda data: b"#EXTM3U\n#EXTINF:10,\nhttp://10.0.0.1/secret.ts\n", "is not a MP4"),
    ],
    ids=["truncated", "header-only", "zeroed", "an-image", "hls-playlist"],
)
async def test_corrupt_and_foreign_files_are_400(cut: Any, fragment: str) -> None:
    error = await refusal(video_body(data_url(cut(sample_video("mp4", frames=6)))), media_policy())
    assert error.status == 400 and fragment in error.message and error.param == PARAM


def test_a_file_without_a_video_track_is_400() -> None:
    import av

    buffer = BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("aac", rate=16000)
        frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
        frame.sample_rate = 16000
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*stream.encode(frame), *stream.encode()]:
            output.mux(packet)
    with pytest.raises(APIError) as caught:
        check_video(buffer.getvalue(), LOOSE)
    assert caught.value.status == 400 and "no video track" in caught.value.message


# --- data:video/jpeg frame lists --------------------------------------------------------------


def jpeg_frames(count: int, size: tuple[int, int] = (32, 32)) -> str:
    frame = base64.b64encode(sample_image("JPEG", size)).decode()
    return "data:video/jpeg;base64," + ",".join([frame] * count)


async def test_jpeg_frame_lists_pass_within_the_limits() -> None:
    assert (await prepare(video_body(jpeg_frames(5)), limits_policy(MAX_VIDEO_FRAMES=5))).video == 1


async def test_jpeg_frame_lists_count_against_max_video_frames() -> None:
    error = await refusal(video_body(jpeg_frames(6)), limits_policy(MAX_VIDEO_FRAMES=5))
    assert "The video has 6 frames" in error.message and "MAX_VIDEO_FRAMES=5" in error.message


async def test_jpeg_frames_larger_than_max_video_pixels_are_refused() -> None:
    error = await refusal(video_body(jpeg_frames(2, (40, 30))), limits_policy(MAX_VIDEO_PIXELS=1000))
    assert "video frame is 40x30 (1200 pixels), more than MAX_VIDEO_PIXELS=1000" in error.message
