"""Videos are measured before the engine decodes them.

The engine's video loader (OpenCV on FFmpeg) decodes every frame from the
start up to the last one it samples, and keeps up to 32 full-size RGB frames.
A few hundred kilobytes of a still 8K video, or a header that claims a
billion frames, therefore cost gigabytes of memory or minutes of CPU inside
the engine. Here, in the bounded media pool, each video is checked without
decoding all of it:

1. its first bytes must be a known container (MP4/MOV, WebM/MKV, AVI, MPEG,
   MPEG-TS, Ogg, FLV). That container's own FFmpeg demuxer is then forced, so
   FFmpeg never probes the bytes as a playlist or a concat list (formats that
   open other files or URLs);
2. every video track's frame size (header) must be within MAX_VIDEO_PIXELS,
   and its frame count and duration, as the header claims them, within
   MAX_VIDEO_FRAMES and MAX_VIDEO_SECONDS;
3. the packets are demuxed (read, not decoded) to count the frames and
   measure the duration the stream really has, against the same limits, so
   a header that understates them does not help;
4. only then is the first frame decoded (one thread), which finds files
   FFmpeg cannot read at all, and its real size is checked again.

A refusal names the limit and its setting (400); a file FFmpeg cannot read
is a 400 too. The engine also takes `data:video/jpeg;base64,<frame>,...`,
a list of JPEG frames: their number counts against MAX_VIDEO_FRAMES and each
frame's header against MAX_VIDEO_PIXELS, without decoding pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from io import BytesIO

import av
from av.container import InputContainer
from av.video.stream import VideoStream

from app.errors import APIError
from app.media.dataurl import decode_base64
from app.media.images import open_image

# (media type, FFmpeg demuxer, every (offset, bytes) that must match). The
# common containers the engine's video loaders (OpenCV / PyAV, both FFmpeg) read.
CONTAINER_SIGNATURES: tuple[tuple[str, str, tuple[tuple[int, bytes], ...]], ...] = (
    ("video/mp4", "mov", ((4, b"ftyp"),)),  # MP4, MOV, M4V, 3GP (ISO base media)
    ("video/quicktime", "mov", ((4, b"moov"),)),  # QuickTime without an ftyp box
    ("video/quicktime", "mov", ((4, b"mdat"),)),
    ("video/quicktime", "mov", ((4, b"wide"),)),
    ("video/quicktime", "mov", ((4, b"free"),)),
    ("video/webm", "matroska", ((0, b"\x1a\x45\xdf\xa3"),)),  # WebM, Matroska (EBML)
    ("video/x-msvideo", "avi", ((0, b"RIFF"), (8, b"AVI "))),
    ("video/mpeg", "mpeg", ((0, b"\x00\x00\x01\xba"),)),  # MPEG program stream
    ("video/mpeg", "mpegvideo", ((0, b"\x00\x00\x01\xb3"),)),  # MPEG-1/2 video sequence
    ("video/mp2t", "mpegts", ((0, b"\x47"), (188, b"\x47"))),  # MPEG transport stream
    ("video/ogg", "ogg", ((0, b"OggS"),)),
    ("video/x-flv", "flv", ((0, b"FLV"),)),
)
CONTAINER_NAMES = "MP4, MOV, WebM, MKV, AVI, MPEG, MPEG-TS, Ogg or FLV"
JPEG_FRAMES_TYPE = "video/jpeg"


@dataclass(frozen=True, slots=True)
class VideoLimits:
    max_pixels: int
    max_frames: int
    max_seconds: float


def video_container(data: bytes) -> tuple[str, str]:
    """(media type, FFmpeg demuxer) of the container, or a 400 when the bytes are not a known one."""
    for media_type, demuxer, signature in CONTAINER_SIGNATURES:
        if all(data[offset : offset + len(magic)] == magic for offset, magic in signature):
            return media_type, demuxer
    raise APIError(400, f"The video is not a {CONTAINER_NAMES} file; convert it to MP4 or WebM.")


def check_video(data: bytes, limits: VideoLimits) -> str:
    """Check a video's size, length and readability; returns its media type."""
    media_type, demuxer = video_container(data)
    try:
        with av.open(BytesIO(data), format=demuxer, metadata_errors="ignore") as container:
            streams = list(container.streams.video)
            if not streams:
                raise APIError(400, "The video file has no video track; send a file with one.")
            for stream in streams:
                _check_header(stream, container, limits)
            _check_packets(container, limits)
        with av.open(BytesIO(data), format=demuxer, metadata_errors="ignore") as container:
            _check_first_frame(container, container.streams.video[0], limits)
    except (av.FFmpegError, ValueError, OSError, EOFError):
        raise APIError(
            400,
            "The video could not be read (corrupt, truncated or an unsupported codec); send a complete MP4 or WebM.",
        ) from None
    return media_type


def check_jpeg_frames(payload: str, limits: VideoLimits) -> None:
    """Check a `data:video/jpeg` payload: the number of frames and every frame's header."""
    count = payload.count(",") + 1
    if count > limits.max_frames:
        raise _too_many_frames(count, limits)
    for frame in payload.split(","):
        image = open_image(
            decode_base64(frame),
            max_pixels=limits.max_pixels,
            formats=("JPEG",),
            pixel_setting="MAX_VIDEO_PIXELS",
            what="video frame",
        )
        image.close()


def _check_header(stream: VideoStream, container: InputContainer, limits: VideoLimits) -> None:
    codec = stream.codec_context
    _check_pixels(codec.width, codec.height, limits)
    if stream.frames > limits.max_frames:
        raise _too_many_frames(stream.frames, limits)
    seconds = max(
        float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0,
        container.duration / av.time_base if container.duration else 0.0,
    )
    _check_seconds(seconds, limits)


def _check_first_frame(container: InputContainer, stream: VideoStream, limits: VideoLimits) -> None:
    stream.codec_context.thread_count = 1
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height, limits)
        return
    raise APIError(400, "The video has no frame that can be decoded; send a complete MP4 or WebM.")


def _check_packets(container: InputContainer, limits: VideoLimits) -> None:
    """Count every video track's packets and measure their time span, without decoding."""
    streams = list(container.streams.video)
    counts = dict.fromkeys((stream.index for stream in streams), 0)
    spans: dict[int, tuple[int, int, Fraction]] = {}
    for packet in container.demux(streams):
        if packet.size == 0:  # the demuxer's final flush packet
            continue
        index = packet.stream.index
        counts[index] += 1
        if counts[index] > limits.max_frames:
            raise _too_many_frames(f"more than {limits.max_frames}", limits)
        if packet.pts is not None and packet.time_base:
            end = packet.pts + (packet.duration or 0)
            start, last, _ = spans.get(index, (packet.pts, end, packet.time_base))
            spans[index] = (min(start, packet.pts), max(last, end), packet.time_base)
    for start, end, time_base in spans.values():
        _check_seconds(float((end - start) * time_base), limits)


def _check_pixels(width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.max_pixels:
        raise APIError(
            400,
            f"The video is {width}x{height} ({width * height} pixels per frame), more than "
            f"MAX_VIDEO_PIXELS={limits.max_pixels}; send a smaller video (e.g. scaled to 1080p or less).",
        )


def _check_seconds(seconds: float, limits: VideoLimits) -> None:
    if seconds > limits.max_seconds:
        raise APIError(
            400,
            f"The video lasts {seconds:.1f} s, more than MAX_VIDEO_SECONDS={limits.max_seconds:g}; "
            "send a shorter clip.",
        )


def _too_many_frames(count: int | str, limits: VideoLimits) -> APIError:
    return APIError(
        400,
        f"The video has {count} frames; this server allows at most MAX_VIDEO_FRAMES={limits.max_frames}. "
        "Send a shorter clip or a lower frame rate.",
    )
