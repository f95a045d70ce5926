"""The media limits of one server, resolved once at start.

Settings (IMAGE_LIMIT, MAX_IMAGE_BYTES, MAX_VIDEO_FRAMES, ...) and what the
served model can take (`detect_modalities`) are combined here into one
frozen object, so the per-request code in `app.media` reads plain
attributes and never re-derives anything on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.config import Settings
from app.media.url_rules import UrlPolicy
from app.media.videos import VideoLimits

MediaKind = Literal["image", "video"]


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    model_name: str
    modalities: frozenset[str]
    image_limit: int
    video_limit: int
    max_image_bytes: int
    max_video_bytes: int
    max_image_pixels: int
    max_image_side: int
    video: VideoLimits
    urls: UrlPolicy

    @classmethod
    def from_settings(cls, settings: Settings, modalities: frozenset[str]) -> MediaPolicy:
        return cls(
            model_name=settings.served_model_name,
            modalities=modalities,
            image_limit=settings.IMAGE_LIMIT,
            video_limit=settings.VIDEO_LIMIT,
            max_image_bytes=settings.MAX_IMAGE_BYTES,
            max_video_bytes=settings.MAX_VIDEO_BYTES,
            max_image_pixels=settings.MAX_IMAGE_PIXELS,
            max_image_side=settings.MAX_IMAGE_SIDE,
            video=VideoLimits(
                max_pixels=settings.MAX_VIDEO_PIXELS,
                max_frames=settings.MAX_VIDEO_FRAMES,
                max_seconds=settings.MAX_VIDEO_SECONDS,
            ),
            urls=UrlPolicy(
                allowed_domains=settings.allowed_media_domains,
                allow_private=settings.ALLOW_PRIVATE_MEDIA_URLS,
                fetch_timeout_s=settings.MEDIA_FETCH_TIMEOUT_S,
            ),
        )

    def limit(self, kind: MediaKind) -> int:
        return self.image_limit if kind == "image" else self.video_limit

    def max_bytes(self, kind: MediaKind) -> int:
        return self.max_image_bytes if kind == "image" else self.max_video_bytes

    def accepts(self, kind: MediaKind) -> bool:
        """The model takes this kind of media and the server has not turned it off."""
        return kind in self.modalities and self.limit(kind) > 0
