"""Image verification and downscaling, as the engine will receive the images."""

from __future__ import annotations

from io import BytesIO

import pytest
from PIL import Image

from app.errors import APIError
from app.media.images import check_image
from tests.media_server import png_claiming_size, sample_image

LIMITS = {"max_pixels": 40_000_000, "max_side": 2048}


@pytest.mark.parametrize(
    ("image_format", "media_type", "mode"),
    [
        ("PNG", "image/png", "RGB"),
        ("JPEG", "image/jpeg", "RGB"),
        ("WEBP", "image/webp", "RGB"),
        ("GIF", "image/gif", "P"),
    ],
)
def test_allowed_formats_pass_unchanged(image_format: str, media_type: str, mode: str) -> None:
    checked = check_image(sample_image(image_format, (64, 48), mode), **LIMITS)
    assert (checked.media_type, checked.width, checked.height) == (media_type, 64, 48)
    assert checked.resized is None


@pytest.mark.parametrize("image_format", ["BMP", "TIFF", "ICO", "PPM"])
def test_other_image_formats_are_refused(image_format: str) -> None:
    with pytest.raises(APIError) as caught:
        check_image(sample_image(image_format, (16, 16)), **LIMITS)
    assert caught.value.status == 400
    assert "PNG, JPEG, WebP or GIF" in caught.value.message


def test_text_labelled_as_png_is_refused() -> None:
    with pytest.raises(APIError, match="not a valid PNG, JPEG, WebP or GIF"):
        check_image(b"hello, this is a text file and not an image\n" * 10, **LIMITS)


@pytest.mark.parametrize(
    ("image_format", "mode", "message"),
    [
        ("PNG", "RGB", "The PNG image is truncated or corrupt"),
        ("JPEG", "RGB", "The JPEG image is truncated or corrupt"),
        ("GIF", "P", "The GIF image is truncated or corrupt"),
        ("WEBP", "RGB", "not a valid PNG, JPEG, WebP or GIF file"),  # Pillow reads WebP whole when opening
    ],
)
def test_truncated_images_are_refused(image_format: str, mode: str, message: str) -> None:
    data = sample_image(image_format, (256, 256), mode)
    with pytest.raises(APIError) as caught:
        check_image(data[: len(data) // 2], **LIMITS)
    assert caught.value.status == 400
    assert message in caught.value.message


def test_corrupt_png_data_is_refused() -> None:
    data = bytearray(sample_image("PNG", (128, 128)))
    start = data.index(b"IDAT") + 8
    data[start : start + 32] = b"\xff" * 32  # garbage inside the compressed pixels
    with pytest.raises(APIError, match="truncated or corrupt"):
        check_image(bytes(data), **LIMITS)


def test_a_header_claiming_ten_billion_pixels_is_refused_before_decoding() -> None:
    bomb = png_claiming_size(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(APIError) as caught:
        check_image(bomb, **LIMITS)
    assert caught.value.status == 400
    assert "MAX_IMAGE_PIXELS=40000000" in caught.value.message


def test_pixel_limit_applies_below_pillows_own_limit() -> None:
    bomb = png_claiming_size(9000, 9000)  # 81 M pixels: under Pillow's bomb threshold
    with pytest.raises(APIError, match=r"9000x9000 \(81000000 pixels\), more than MAX_IMAGE_PIXELS=40000000"):
        check_image(bomb, **LIMITS)


@pytest.mark.parametrize(
    ("image_format", "size", "expected_size", "media_type"),
    [
        ("PNG", (4000, 1000), (2048, 512), "image/png"),
        ("JPEG", (3000, 4000), (1536, 2048), "image/jpeg"),
        ("WEBP", (2500, 2500), (2048, 2048), "image/webp"),
        ("GIF", (3000, 1500), (2048, 1024), "image/png"),
    ],
)
def test_large_images_are_downscaled_keeping_aspect(
    image_format: str, size: tuple[int, int], expected_size: tuple[int, int], media_type: str
) -> None:
    checked = check_image(sample_image(image_format, size, "P" if image_format == "GIF" else "RGB"), **LIMITS)
    assert checked.resized is not None
    assert (checked.width, checked.height) == expected_size
    assert checked.media_type == media_type
    with Image.open(BytesIO(checked.resized)) as resized:
        assert resized.size == expected_size
        assert Image.MIME[resized.format or ""] == media_type
        resized.load()


def test_downscaling_can_be_switched_off() -> None:
    checked = check_image(sample_image("PNG", (3000, 100)), max_pixels=40_000_000, max_side=0)
    assert checked.resized is None
    assert (checked.width, checked.height) == (3000, 100)


def test_an_image_at_the_limit_is_not_touched() -> None:
    assert check_image(sample_image("JPEG", (2048, 600)), **LIMITS).resized is None


def test_downscaling_turns_the_image_upright_like_the_engine() -> None:
    image = Image.linear_gradient("L").resize((3000, 1000)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buffer = BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    checked = check_image(buffer.getvalue(), **LIMITS)
    assert (checked.width, checked.height) == (683, 2048)
