"""Anthropic Messages bodies (/v1/messages, /v1/messages/count_tokens), read as the engine reads them.

The engine turns them into chat messages
(`vllm.entrypoints.anthropic.serving.AnthropicServingMessages`):

- an `image` block with a `source`, in a user or assistant message, becomes
  an image: `{"type": "url", "url": ...}` is fetched by URL, any other
  source is read as `data:<media_type, default image/jpeg>;base64,<data>`;
- inside a user message's `tool_result`, each `image` item of its content
  list becomes an image the same way (an empty URL is skipped);
- an assistant's `tool_result` is turned into text, and system messages and
  the top-level `system` keep only their text.

Each image is checked like any other. A URL source is replaced by the
fetched file as `{"type": "base64", "media_type": ..., "data": ...}`, the
form the engine turns back into the very data: URL that was checked; so is
a downscaled image. A source type other than `url` or `base64` (e.g. a
`file` id) is refused. Blocks of other types (`document`, ...) and images
where the engine ignores them (system) are left to the fail-closed scan,
which refuses media there.
"""

from __future__ import annotations

from typing import Any

from app.errors import APIError
from app.media.dataurl import DataUrl
from app.media.walk import MediaRef, Walk

# Block types of AnthropicContentBlock; a block of another type is left to the scan.
BLOCK_TYPES = frozenset(
    {"text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
     "tool_addition", "tool_removal"}
)  # fmt: skip


def walk_anthropic(payload: dict[str, Any], walk: Walk) -> None:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") != "system":
            _visit_message(message, f"messages[{i}]", walk)


def _visit_message(message: dict[str, Any], path: str, walk: Walk) -> None:
    content = message.get("content")
    if isinstance(content, str):
        walk.text += 1
    elif isinstance(content, list):
        for j, block in enumerate(content):
            if isinstance(block, dict) and isinstance(block.get("type"), str) and block["type"] in BLOCK_TYPES:
                _visit_block(block, message.get("role"), f"{path}.content[{j}]", walk)


def _visit_block(block: dict[str, Any], role: Any, path: str, walk: Walk) -> None:
    block_type = block.get("type")
    if block_type == "text":
        walk.text += 1
    elif block_type == "image" and block.get("source"):
        _image(block.get("source"), f"{path}.source", walk, skip_empty_url=False)
    elif block_type == "tool_result" and role == "user" and isinstance(block.get("content"), list):
        for k, item in enumerate(block["content"]):
            if isinstance(item, dict) and item.get("type") == "image":
                _image(item.get("source", {}), f"{path}.content[{k}].source", walk, skip_empty_url=True)
    walk.vouch(block)


def _image(source: Any, path: str, walk: Walk, *, skip_empty_url: bool) -> None:
    if not isinstance(source, dict):
        raise APIError(
            400, f"{path} must be an object: {{'type': 'base64', ...}} or {{'type': 'url', ...}}.", param=path
        )
    source_type = source.get("type")
    if source_type == "url":
        url = source.get("url", "")
        if skip_empty_url and not url:
            return  # the engine skips it
        if not isinstance(url, str):
            raise APIError(400, f"{path}.url must be a string: an http(s) URL.", param=f"{path}.url")
    elif source_type in (None, "base64"):
        # Exactly the data: URL the engine builds from this source.
        url = f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"
    else:
        raise APIError(
            400,
            f"Image source type '{source_type}' is not accepted; send {{'type': 'base64', 'media_type': ..., "
            "'data': ...}} or {'type': 'url', 'url': ...}.",
            param=f"{path}.type",
        )

    def write(inline: DataUrl) -> None:
        source.clear()
        source.update(type="base64", media_type=inline.media_type, data=inline.payload)

    walk.media.append(MediaRef("image", url, path, write))
