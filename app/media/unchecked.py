"""The fail-closed scan: media anywhere a walker did not read is refused.

The route walkers read the fields where the engine takes media. Whatever
they did not read completely is scanned here: a JSON object that looks like
media to any of the engine's parsers (an OpenAI content part of a media
type, an Anthropic `image`/`document` block, an object with a media key
such as `image_url`, `input_audio`, `file_data` or `prompt_embeds`) is
refused with a 400 naming its path. So a field the walkers do not know (a
new engine field, a media part in an item type nobody checks) can never
carry media to the engine unchecked; a route with no media fields (e.g.
/detokenize) gets this scan alone. The same goes for what a walker left
unread inside a container it vouched for (`Walk.leave`), such as a message
whose content is a part object instead of a list of parts.

Top-level fields that hold schemas and settings, never media (`tools`,
`response_format`, `metadata`, ...), are not scanned: a tool whose JSON
schema has an `image_url` property is not an image.
"""

from __future__ import annotations

from typing import Any

from app.errors import APIError
from app.media.walk import Walk

MEDIA_TYPES = frozenset(
    {"image_url", "input_image", "video_url", "audio_url", "input_audio", "input_file", "image_embeds",
     "audio_embeds", "video_embeds", "prompt_embeds", "image_pil", "image", "document", "file",
     "computer_screenshot"}
)  # fmt: skip
MEDIA_KEYS = frozenset(
    {"image_url", "video_url", "audio_url", "input_audio", "image_embeds", "audio_embeds", "video_embeds",
     "prompt_embeds", "image_pil", "file_data", "file_id", "file_url", "multi_modal_data"}
)  # fmt: skip
SCHEMA_FIELDS = frozenset(
    {"tools", "tool_choice", "functions", "response_format", "structured_outputs", "text", "metadata",
     "chat_template_kwargs", "mm_processor_kwargs", "media_io_kwargs", "vllm_xargs", "kv_transfer_params",
     "ec_transfer_params", "output_config", "logit_bias"}
)  # fmt: skip

_CONTAINERS = (dict, list)
# A path as (parent, key) links, turned into a string only for an error.
Path = tuple[Any, str | int] | None


def refuse_unchecked_media(payload: dict[str, Any], walk: Walk, hint: str) -> None:
    """Raise a 400 for the first media-like object no walker read; `hint` says where media belongs."""
    _check_object(payload, None, hint)
    stack: list[tuple[Any, Path]] = [
        (value, (None, key)) for key, value in payload.items() if key not in SCHEMA_FIELDS and _container(value)
    ]
    stack.extend((container, (None, path)) for container, path in walk.unread)
    while stack:
        value, path = stack.pop()
        if walk.vouched(value):
            continue
        if isinstance(value, dict):
            _check_object(value, path, hint)
            stack.extend((child, (path, key)) for key, child in value.items() if _container(child))
        else:
            stack.extend((child, (path, index)) for index, child in enumerate(value) if _container(child))


def _container(value: Any) -> bool:
    return isinstance(value, _CONTAINERS)


def _check_object(value: dict[str, Any], path: Path, hint: str) -> None:
    part_type = value.get("type")
    if isinstance(part_type, str) and part_type in MEDIA_TYPES:
        found = f"type '{part_type}'"
    else:
        key = next((key for key in MEDIA_KEYS if key in value and value[key] not in (None, "", [], {})), None)
        if key is None:
            return
        found, path = f"field '{key}'", (path, key)
    where = _render(path) or "The request body"
    raise APIError(
        400, f"{where} holds media ({found}) in a place this server does not check; {hint}", param=_render(path)
    )


def _render(path: Path) -> str | None:
    keys: list[str | int] = []
    while path is not None:
        path, key = path
        keys.append(key)
    text = ""
    for key in reversed(keys):
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text or None
