"""Multimodal input: checks, limits and safe fetching of the media of every engine route.

`prepare_media` (see `app.media.routes`) is the one entry point.

The names below are imported on first use (PEP 562): the supervisor needs
only `detect_modalities`, and the media checks' libraries (Pillow, PyAV)
would otherwise cost it a third of a second before it can start the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.media.fetch import MediaFetcher
    from app.media.modalities import detect_modalities
    from app.media.policy import MediaPolicy
    from app.media.routes import MEDIA_ROUTES, MediaCounts, prepare_media
    from app.media.url_rules import UrlPolicy

_MODULE_OF = {
    "MEDIA_ROUTES": "app.media.routes",
    "MediaCounts": "app.media.routes",
    "MediaFetcher": "app.media.fetch",
    "MediaPolicy": "app.media.policy",
    "UrlPolicy": "app.media.url_rules",
    "detect_modalities": "app.media.modalities",
    "prepare_media": "app.media.routes",
}

__all__ = [
    "MEDIA_ROUTES",
    "MediaCounts",
    "MediaFetcher",
    "MediaPolicy",
    "UrlPolicy",
    "detect_modalities",
    "prepare_media",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'app.media' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
