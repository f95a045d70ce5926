"""Every image is checked before the engine decodes it, and big ones are shrunk.

The engine decodes whatever bytes it gets with Pillow inside its own
process; a malformed or hostile image there costs a 500 or the engine's
memory. Here, in a worker thread of the wrapper:

- only PNG, JPEG, WebP and GIF are opened (Pillow's other parsers never see
  the bytes);
- the pixel count is read from the header and checked against
  MAX_IMAGE_PIXELS before any pixel is decoded (decompression bombs).
  Pillow's own guard (DecompressionBombError beyond twice its 89 M-pixel
  default) also answers 400; its DecompressionBombWarning fires at the same
  point as the explicit check, so it needs no handling of its own;
- the first frame is decoded once, which finds truncated and corrupt data;
- an image whose longer side exceeds MAX_IMAGE_SIDE is downscaled, keeping
  its aspect ratio, and re-encoded (PNG stays PNG, JPEG stays JPEG, WebP stays
  WebP, GIF becomes PNG). Smaller images are forwarded byte for byte.

The functions here are blocking and CPU-bound: callers run them in the
bounded media pool (`app.media.pool`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageOps

from app.errors import APIError

# Pillow format name -> media type of the data URL sent to the engine.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
RESIZED_FORMAT = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WEBP", "GIF": "PNG"}
LOSSY_QUALITY = 90
FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF"}

# Load Pillow's format plugins now, at start-up: lazily, the first image request after
# `ready` would pay for them (about 20 ms on a 2-core machine; see app/lifecycle/warmup.py).
Image.init()


@dataclass(frozen=True, slots=True)
class CheckedImage:
    media_type: str
    width: int
    height: int
    # The downscaled re-encoding; None means: forward the original bytes.
    resized: bytes | None = None


def check_image(data: bytes, *, max_pixels: int, max_side: int) -> CheckedImage:
    """Verify an image and downscale it when its longer side exceeds `max_side` (0: never)."""
    image = open_image(data, max_pixels=max_pixels, formats=tuple(IMAGE_FORMATS))
    with image:
        source_format = image.format or ""
        width, height = image.size
        needs_resize = 0 < max_side < max(width, height)
        if needs_resize and source_format == "JPEG":
            # Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while decoding: far less work for big photos.
            image.draft(image.mode, _fit(width, height, max_side))
        _decode(image, source_format)
        if not needs_resize:
            return CheckedImage(IMAGE_FORMATS[source_format], width, height)
        return _downscale(image, source_format, max_side)


def open_image(
    data: bytes,
    *,
    max_pixels: int,
    formats: tuple[str, ...],
    pixel_setting: str = "MAX_IMAGE_PIXELS",
    what: str = "image",
) -> Image.Image:
    """Open an image lazily (header only) and refuse it if it has too many pixels.

    `pixel_setting` and `what` name the limit and the thing in refusals (video frames reuse this).
    """
    try:
        image = Image.open(BytesIO(data), formats=formats)
    except Image.DecompressionBombError:
        raise APIError(
            400, f"The {what} has too many pixels to decode safely; at most {pixel_setting}={max_pixels} are allowed."
        ) from None
    except (OSError, ValueError):
        names = [FORMAT_NAMES[name] for name in formats]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise APIError(400, f"The {what} is not a valid {listed} file; convert it to one of these formats.") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise APIError(
            400,
            f"The {what} is {width}x{height} ({width * height} pixels), more than {pixel_setting}={max_pixels}; "
            f"send a smaller {what}.",
        )
    return image


def _decode(image: Image.Image, source_format: str) -> None:
    try:
        image.load()
    # Pillow's decoders raise a wide, undocumented set of exceptions on malformed data.
    except Exception:  # noqa: BLE001
        raise APIError(400, f"The {source_format} image is truncated or corrupt; send the complete file.") from None


def _downscale(image: Image.Image, source_format: str, max_side: int) -> CheckedImage:
    _apply_exif_orientation(image)
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out_format = RESIZED_FORMAT[source_format]
    if out_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = BytesIO()
    options = {"quality": LOSSY_QUALITY} if out_format in ("JPEG", "WEBP") else {}
    image.save(buffer, format=out_format, **options)
    return CheckedImage(IMAGE_FORMATS[out_format], image.width, image.height, buffer.getvalue())


def _apply_exif_orientation(image: Image.Image) -> None:
    # The engine turns images upright by their EXIF orientation and ignores a
    # broken EXIF block (vllm.multimodal.image.normalize_image); the
    # re-encoded copy carries no EXIF, so it is turned here the same way.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a big image


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size of width x height scaled down so its longer side is max_side."""
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
