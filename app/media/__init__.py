"""Multimodal input: checks, limits and safe fetching of chat media (see `chat`)."""

from app.media.chat import MediaCounts, prepare_chat_media
from app.media.fetch import MediaFetcher
from app.media.modalities import detect_modalities
from app.media.policy import MediaPolicy
from app.media.url_rules import UrlPolicy

__all__ = ["MediaCounts", "MediaFetcher", "MediaPolicy", "UrlPolicy", "detect_modalities", "prepare_chat_media"]
