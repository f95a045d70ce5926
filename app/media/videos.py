"""A cheap sanity check for videos: a known container, no frame decoding.

Decoding a video costs far more than the engine's own sampling of frames,
so the wrapper only caps the size (MAX_VIDEO_BYTES, elsewhere) and looks at
the first bytes: a file that does not start like a video container is
refused with a 400 instead of failing deep in the engine's video loader.

The engine also takes `data:video/jpeg;base64,<frame>,<frame>,...`: a list
of JPEG frames. Each frame's header is checked like an image's (format and
pixel count), still without decoding pixels.
"""

from __future__ import annotations

from app.errors import APIError
from app.media.dataurl import decode_base64
from app.media.images import open_image

# media type -> every (offset, bytes) that must match. The common containers
# the engine's video loaders (OpenCV / PyAV, both FFmpeg) read.
CONTAINER_SIGNATURES: tuple[tuple[str, tuple[tuple[int, bytes], ...]], ...] = (
    ("video/mp4", ((4, b"ftyp"),)),  # MP4, MOV, M4V, 3GP (ISO base media)
    ("video/quicktime", ((4, b"moov"),)),  # QuickTime without an ftyp box
    ("video/quicktime", ((4, b"mdat"),)),
    ("video/quicktime", ((4, b"wide"),)),
    ("video/quicktime", ((4, b"free"),)),
    ("video/webm", ((0, b"\x1a\x45\xdf\xa3"),)),  # WebM, Matroska (EBML)
    ("video/x-msvideo", ((0, b"RIFF"), (8, b"AVI "))),
    ("video/mpeg", ((0, b"\x00\x00\x01\xba"),)),  # MPEG program stream
    ("video/mpeg", ((0, b"\x00\x00\x01\xb3"),)),  # MPEG-1/2 video sequence
    ("video/mp2t", ((0, b"\x47"), (188, b"\x47"))),  # MPEG transport stream
    ("video/ogg", ((0, b"OggS"),)),
    ("video/x-flv", ((0, b"FLV"),)),
)
CONTAINER_NAMES = "MP4, MOV, WebM, MKV, AVI, MPEG, MPEG-TS, Ogg or FLV"
JPEG_FRAMES_TYPE = "video/jpeg"


def video_media_type(data: bytes) -> str:
    """The container's media type, or a 400 when the bytes are not a known video container."""
    for media_type, signature in CONTAINER_SIGNATURES:
        if all(data[offset : offset + len(magic)] == magic for offset, magic in signature):
            return media_type
    raise APIError(400, f"The video is not a {CONTAINER_NAMES} file; convert it to MP4 or WebM.")


def check_jpeg_frames(payload: str, *, max_pixels: int) -> None:
    """Check the header of every frame of a `data:video/jpeg` payload."""
    for frame in payload.split(","):
        open_image(decode_base64(frame), max_pixels=max_pixels, formats=("JPEG",)).close()
