"""What a route walker finds in one request body.

A walker (`app.media.parts`, `app.media.anthropic`, `app.media.walkers`)
reads a body the way the engine reads it and records in a `Walk`:

- every image and video as a `MediaRef`: the URL the engine would load, the
  JSON path of the field for error messages, and how to write the checked
  media back in the form the engine reads;
- the containers it read completely (`vouch`), which the fail-closed scan
  (`app.media.unchecked`) then skips: a media shape anywhere else in the
  body is refused, because nothing checked it;
- the containers inside a vouched one that it did not read (`leave`: a
  message's content that is an object, a list inside a list of parts, a part
  whose type is not a string), which the scan looks at all the same.

Walkers refuse a shape they recognise but cannot check themselves (an audio
URL, embeddings, a file id) with an `APIError` naming its path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.media.dataurl import DataUrl
from app.media.policy import MediaKind


@dataclass(slots=True)
class MediaRef:
    kind: MediaKind
    # The URL the engine would load: http(s), data:, anything else (refused), or
    # None for a part that names media the engine has cached (a uuid alone).
    url: str | None
    path: str
    # Puts checked media (a fetched or downscaled file) back where the engine reads it.
    write: Callable[[DataUrl], None]


@dataclass(slots=True)
class Walk:
    media: list[MediaRef] = field(default_factory=list)
    text: int = 0
    # The walker rewrote the body (a URL put in the object form the engine needs).
    changed: bool = False
    # Containers inside vouched ones that no walker read, with their JSON paths: the scan looks at them.
    unread: list[tuple[dict[str, Any] | list[Any], str]] = field(default_factory=list)
    _vouched: set[int] = field(default_factory=set)

    def vouch(self, container: dict[str, Any] | list[Any]) -> None:
        """`container` was read completely by a walker: the fail-closed scan skips it."""
        self._vouched.add(id(container))

    def leave(self, container: dict[str, Any] | list[Any], path: str) -> None:
        """`container`, at `path` inside a vouched container, was not read: the fail-closed scan looks at it."""
        self.unread.append((container, path))

    def vouched(self, container: dict[str, Any] | list[Any]) -> bool:
        return id(container) in self._vouched
