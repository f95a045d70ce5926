"""The media policy of every engine route the wrapper forwards: one entry point.

`prepare_media(route, payload, policy, fetcher)` is called for the JSON body
of every POST the wrapper forwards, with the route's canonical engine path.
In order, it:

1. walks the fields where the engine reads media on that route (`ROUTES`:
   route -> walker, see `app.media.walkers` and `app.media.anthropic`),
   refusing media shapes it cannot check;
2. scans the rest of the body and refuses any media-like object no walker
   read (`app.media.unchecked`): fail closed, also on routes without media
   fields;
3. counts the images and videos of the whole request against IMAGE_LIMIT
   and VIDEO_LIMIT and checks each one the same way, whatever the route
   (`app.media.checks`): bytes, Pillow verification and downscaling, video
   size and length, SSRF-safe fetching into inline data.

The body is changed in place; `MediaCounts.changed` says it must be
serialized again. A route not in `ROUTES` is refused (400): the front door
should never forward it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.errors import APIError
from app.media.anthropic import walk_anthropic
from app.media.checks import check_counts, prepare_all
from app.media.fetch import MediaFetcher
from app.media.policy import MediaPolicy
from app.media.unchecked import refuse_unchecked_media
from app.media.walk import Walk
from app.media.walkers import (
    walk_chat,
    walk_completions,
    walk_nothing,
    walk_pooling,
    walk_pooling_plugin,
    walk_responses,
    walk_scoring,
)

Walker = Callable[[dict[str, Any], Walk], None]

CHAT_HINT = "send images and videos as image_url / video_url parts of message content."
RESPONSES_HINT = "send images as input_image parts of message content (or of a function_call_output)."
ANTHROPIC_HINT = "send images as image blocks of user or assistant messages, or in a user message's tool_result."
SCORE_HINT = "send images and videos as image_url / video_url parts of a query's or document's content."
NO_MEDIA_HINT = "this route takes no media."


@dataclass(frozen=True, slots=True)
class Route:
    walker: Walker
    # Where media belongs on this route, for the fail-closed scan's refusals.
    hint: str


ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route(walk_chat, CHAT_HINT),
    "/v1/chat/completions/render": Route(walk_chat, CHAT_HINT),
    "/v1/chat/completions/batch": Route(walk_chat, CHAT_HINT),
    "/v1/completions": Route(walk_completions, "completions take text or token ids only."),
    "/v1/completions/render": Route(walk_completions, "completions take text or token ids only."),
    "/v1/responses": Route(walk_responses, RESPONSES_HINT),
    "/v1/messages": Route(walk_anthropic, ANTHROPIC_HINT),
    "/v1/messages/count_tokens": Route(walk_anthropic, ANTHROPIC_HINT),
    "/v1/embeddings": Route(walk_pooling, CHAT_HINT),
    "/pooling": Route(walk_pooling_plugin, CHAT_HINT),
    "/classify": Route(walk_pooling, CHAT_HINT),
    "/score": Route(walk_scoring, SCORE_HINT),
    "/v1/score": Route(walk_scoring, SCORE_HINT),
    "/rerank": Route(walk_scoring, SCORE_HINT),
    "/v1/rerank": Route(walk_scoring, SCORE_HINT),
    "/v2/rerank": Route(walk_scoring, SCORE_HINT),
    "/tokenize": Route(walk_chat, CHAT_HINT),
    "/detokenize": Route(walk_nothing, NO_MEDIA_HINT),
    "/v1/load_lora_adapter": Route(walk_nothing, NO_MEDIA_HINT),
    "/v1/unload_lora_adapter": Route(walk_nothing, NO_MEDIA_HINT),
}
MEDIA_ROUTES = frozenset(ROUTES)


@dataclass(frozen=True, slots=True)
class MediaCounts:
    """What one request carried, for the request log and metrics."""

    text: int = 0
    image: int = 0
    video: int = 0
    # The body was rewritten (media fetched or downscaled): serialize it again.
    changed: bool = False


async def prepare_media(route: str, payload: dict[str, Any], policy: MediaPolicy, fetcher: MediaFetcher) -> MediaCounts:
    """Check, count and inline every piece of media of a request to engine route `route`, in place."""
    spec = ROUTES.get(route)
    if spec is None:
        raise APIError(400, f"Requests to {route} are not accepted by this server.", code="unsupported_route")
    walk = Walk()
    spec.walker(payload, walk)
    refuse_unchecked_media(payload, walk, spec.hint)
    if not walk.media:
        return MediaCounts(text=walk.text, changed=walk.changed)
    check_counts(walk.media, policy)
    inlined = await prepare_all(walk.media, policy, fetcher)
    images = sum(1 for ref in walk.media if ref.kind == "image")
    return MediaCounts(text=walk.text, image=images, video=len(walk.media) - images, changed=walk.changed or inlined)
