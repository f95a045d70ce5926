"""Every image and video a walker found is counted, checked and made inline.

The same checks for every route:

1. the request is refused when the model takes no such media, the server
   turned it off, or the request carries more than IMAGE_LIMIT images or
   VIDEO_LIMIT videos in all (400);
2. a base64 `data:` URL over MAX_IMAGE_BYTES / MAX_VIDEO_BYTES is refused
   from its length alone (413); then the image is verified with Pillow and
   downscaled when too big (`app.media.images`), the video measured
   (`app.media.videos`);
3. an http(s) URL is fetched under the URL rules (`app.media.fetch`),
   verified the same way and written back as inline data, so the engine
   never fetches anything.

The media of one request are prepared concurrently, at most
FETCHES_PER_REQUEST fetches at a time; decoding runs in the bounded media
pool (`app.media.pool`). The first refusal answers the request and cancels
the rest. Every refusal's `param` is the JSON path of the media.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import APIError
from app.media.dataurl import DataUrl, decode_base64, is_data_url, parse_data_url
from app.media.fetch import MediaFetcher
from app.media.images import check_image
from app.media.policy import MediaKind, MediaPolicy
from app.media.pool import FETCHES_PER_REQUEST, run_blocking
from app.media.videos import JPEG_FRAMES_TYPE, check_jpeg_frames, check_video
from app.media.walk import MediaRef

LIMIT_SETTINGS = {"image": "IMAGE_LIMIT", "video": "VIDEO_LIMIT"}
SIZE_SETTINGS = {"image": "MAX_IMAGE_BYTES", "video": "MAX_VIDEO_BYTES"}
PLURALS = {"image": "images", "video": "videos"}


def check_counts(media: list[MediaRef], policy: MediaPolicy) -> None:
    for kind in ("image", "video"):
        found = [ref for ref in media if ref.kind == kind]
        if found:
            _check_count(kind, found, policy)


async def prepare_all(media: list[MediaRef], policy: MediaPolicy, fetcher: MediaFetcher) -> bool:
    """Verify and inline every piece of media; returns whether the body was rewritten."""
    fetch_slots = asyncio.Semaphore(FETCHES_PER_REQUEST)
    tasks = [asyncio.create_task(_prepare(ref, policy, fetcher, fetch_slots)) for ref in media if ref.url is not None]
    try:
        replaced = await asyncio.gather(*tasks)
    except Exception:
        # The first refusal answers the request; the other parts' work is dropped
        # (and their outcomes collected, so none is reported as never retrieved).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return any(replaced)


def _check_count(kind: MediaKind, found: list[MediaRef], policy: MediaPolicy) -> None:
    plural = PLURALS[kind]
    if kind not in policy.modalities:
        raise APIError(
            400,
            f"The model '{policy.model_name}' does not accept {plural}; send text only, "
            f"or serve a model that takes {plural}.",
            param=found[0].path,
        )
    limit = policy.limit(kind)
    if limit == 0:
        raise APIError(
            400, f"{plural.capitalize()} are turned off on this server ({LIMIT_SETTINGS[kind]}=0).", param=found[0].path
        )
    if len(found) > limit:
        raise APIError(
            400,
            f"The request has {len(found)} {plural}; this server allows at most {limit} per request "
            f"({LIMIT_SETTINGS[kind]}={limit}).",
            param=found[limit].path,
        )


async def _prepare(ref: MediaRef, policy: MediaPolicy, fetcher: MediaFetcher, fetch_slots: asyncio.Semaphore) -> bool:
    """Verify one piece of media; returns whether it was written back."""
    assert ref.url is not None
    with _located(ref.path):
        if is_data_url(ref.url):
            inline = parse_data_url(ref.url)
            _check_inline_size(ref.kind, inline, policy)
            checked = await run_blocking(_check_inline, ref.kind, inline, policy)
        else:
            async with fetch_slots:
                data = await fetcher.fetch(
                    ref.url, max_bytes=policy.max_bytes(ref.kind), limit_name=SIZE_SETTINGS[ref.kind]
                )
            checked = await run_blocking(_check_fetched, ref.kind, data, policy)
        if checked is None:
            return False
        ref.write(checked)
        return True


def _check_inline_size(kind: MediaKind, inline: DataUrl, policy: MediaPolicy) -> None:
    size, limit = inline.decoded_size, policy.max_bytes(kind)
    if size > limit:
        raise APIError(
            413, f"The {kind} is {size} bytes, more than {SIZE_SETTINGS[kind]}={limit} bytes; send a smaller {kind}."
        )


# --- Blocking work, run in the media pool ------------------------------------------


def _check_inline(kind: MediaKind, inline: DataUrl, policy: MediaPolicy) -> DataUrl | None:
    """Check inline media; returns its replacement (a downscaled image), or None to forward it unchanged."""
    if kind == "video":
        if inline.media_type == JPEG_FRAMES_TYPE:
            check_jpeg_frames(inline.payload, policy.video)
        else:
            check_video(decode_base64(inline.payload), policy.video)
        return None
    checked = check_image(
        decode_base64(inline.payload), max_pixels=policy.max_image_pixels, max_side=policy.max_image_side
    )
    return None if checked.resized is None else DataUrl.encode(checked.media_type, checked.resized)


def _check_fetched(kind: MediaKind, data: bytes, policy: MediaPolicy) -> DataUrl:
    """Check fetched media; returns it as inline data for the engine."""
    if kind == "video":
        return DataUrl.encode(check_video(data, policy.video), data)
    checked = check_image(data, max_pixels=policy.max_image_pixels, max_side=policy.max_image_side)
    return DataUrl.encode(checked.media_type, data if checked.resized is None else checked.resized)


@contextmanager
def _located(path: str) -> Iterator[None]:
    """Point errors raised below at the media's JSON path."""
    try:
        yield
    except APIError as error:
        if error.param is None:
            error.param = path
        raise
