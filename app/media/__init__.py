"""Multimodal input: checks, limits and safe fetching of the media of every engine route.

`prepare_media` (see `app.media.routes`) is the one entry point.
"""

from app.media.fetch import MediaFetcher
from app.media.modalities import detect_modalities
from app.media.policy import MediaPolicy
from app.media.routes import MEDIA_ROUTES, MediaCounts, prepare_media
from app.media.url_rules import UrlPolicy

__all__ = [
    "MEDIA_ROUTES",
    "MediaCounts",
    "MediaFetcher",
    "MediaPolicy",
    "UrlPolicy",
    "detect_modalities",
    "prepare_media",
]
