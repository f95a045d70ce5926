"""OpenAI-style content parts and chat messages, read the way the engine reads them.

Chat completions, Responses messages and tool outputs, the chat forms of
the pooling routes, /tokenize and the multimodal inputs of /score and
/rerank all end in the engine's one content-part parser
(`vllm.renderers.chat_utils._parse_chat_message_content_mm_part`). It picks
a part's media by `type`, or, when `type` is missing or a `uuid` is given,
by the first media key present in a fixed order. `visit_part` applies the
same rules, so no part the engine reads as media is skipped here:

- `image_url`, `input_image` (Responses: a plain URL string) and `video_url`
  are collected for checking; a typed part's plain-string URL is put in the
  object form the engine needs;
- audio: an audio URL is refused (the engine would fetch it); inline audio
  (`input_audio`, or a `data:` audio URL) passes: the engine bounds its
  decoding itself (VLLM_MAX_AUDIO_DECODE_DURATION_S / _BYTES), the request
  size bounds its bytes, and nothing is fetched;
- precomputed embeddings (`image_embeds`, `audio_embeds`, `video_embeds`,
  `prompt_embeds`), `image_pil` and Responses `input_file` / `file_id` are
  refused: the wrapper cannot check them;
- an unknown part type is refused (the engine would refuse it too);
- what is neither text nor a part (a content object instead of a list, a
  list inside the list of parts, a part whose `type` is not a string) is
  left to the fail-closed scan, which refuses it when it holds media.

Parts are counted as text or media; a message is read only through its
`content` (the engine reads nothing else of a message as media). An object
without a string `role` is no message to the engine: its content is read
all the same, and the fail-closed scan looks at the rest of it.
"""

from __future__ import annotations

from typing import Any

from app.errors import APIError
from app.media.dataurl import DataUrl, is_data_url
from app.media.policy import MediaKind
from app.media.walk import MediaRef, Walk

TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
# Typed media parts the wrapper checks: type -> (kind, key of the URL).
MEDIA_PART_TYPES: dict[str, tuple[MediaKind, str]] = {
    "image_url": ("image", "image_url"),
    "input_image": ("image", "image_url"),
    "video_url": ("video", "video_url"),
}
AUDIO_PART_TYPES = frozenset({"audio_url", "input_audio"})
EMBEDS_PART_TYPES = frozenset({"image_embeds", "audio_embeds", "video_embeds", "prompt_embeds"})
# Parts the engine knows that carry neither text nor media.
PLAIN_PART_TYPES = frozenset({"tool_reference"})
# Every part type of the engine's parser (MM_PARSER_MAP): a unit test holds the two equal.
ENGINE_PART_TYPES = (
    TEXT_PART_TYPES | set(MEDIA_PART_TYPES) | AUDIO_PART_TYPES | EMBEDS_PART_TYPES | PLAIN_PART_TYPES | {"image_pil"}
)
# Without `type` (or with a `uuid`), the engine takes the first of these keys present.
KEYS_IN_ENGINE_ORDER = (
    "image_url", "image_pil", "image_embeds", "audio_embeds", "video_embeds",
    "prompt_embeds", "audio_url", "input_audio", "video_url", "tool_reference",
)  # fmt: skip
KIND_OF_KEY: dict[str, MediaKind] = {"image_url": "image", "video_url": "video"}


def visit_conversations(value: Any, path: str, walk: Walk) -> None:
    """A list of chat messages, or a list of such lists (batched conversations)."""
    if not isinstance(value, list):
        return
    for i, item in enumerate(value):
        if isinstance(item, dict):
            if isinstance(item.get("content"), str):  # visit_message's first case, without formatting a path
                walk.text += 1
                walk.vouch(item)
            else:
                visit_message(item, f"{path}[{i}]", walk)
        elif isinstance(item, list):
            for j, message in enumerate(item):
                if isinstance(message, dict):
                    visit_message(message, f"{path}[{i}][{j}]", walk)


def visit_message(message: dict[str, Any], path: str, walk: Walk) -> None:
    content = message.get("content")
    if isinstance(content, str):
        walk.text += 1
    elif isinstance(content, list):
        found = len(walk.media)
        visit_parts(content, f"{path}.content", walk)
        role = message.get("role")
        if len(walk.media) > found and role in TEXT_ROLES:
            first = walk.media[found].path
            raise APIError(
                400, f"{first}: images and videos go in user messages, not in a {role} message.", param=first
            )
    elif isinstance(content, dict):
        walk.leave(content, f"{path}.content")  # not a form the engine takes: the scan refuses media in it
    if isinstance(message.get("role"), str):
        walk.vouch(message)  # the engine reads nothing else of a message as media
    elif isinstance(content, list):
        walk.vouch(content)  # without a role it is no message to the engine: the scan looks at the rest


# Roles whose messages carry no media, as in OpenAI's API: chat templates
# render their content as text. vLLM 0.32 answers an image in a developer
# message of Qwen2-VL with a 500, and its multimodal cache then fails the next
# request with that image too.
TEXT_ROLES = frozenset({"system", "developer"})


def visit_parts(parts: list[Any], path: str, walk: Walk) -> None:
    for j, part in enumerate(parts):
        if isinstance(part, str):
            walk.text += 1
        elif isinstance(part, dict):
            visit_part(part, f"{path}[{j}]", walk)
        elif isinstance(part, list):
            walk.leave(part, f"{path}[{j}]")  # parts are not nested: the scan refuses media in it


def visit_part(part: dict[str, Any], path: str, walk: Walk) -> None:
    part_type = part.get("type")
    if isinstance(part_type, str) and part.get("uuid") is None:
        _visit_typed(part, part_type, path, walk)
    elif part_type is None or part.get("uuid") is not None:
        key = next((key for key in KEYS_IN_ENGINE_ORDER if key in part), None)
        if key is not None:
            _visit_keyed(part, key, path, walk)
    else:
        walk.leave(part, path)  # a type that is not a string: the scan refuses the part if it holds media


def _visit_typed(part: dict[str, Any], part_type: str, path: str, walk: Walk) -> None:
    if part_type in TEXT_PART_TYPES:
        walk.text += 1
    elif part_type in MEDIA_PART_TYPES:
        kind, key = MEDIA_PART_TYPES[part_type]
        if part_type == "input_image":
            walk.media.append(_input_image(part, path))
        else:
            walk.changed |= _object_form(part, key)
            walk.media.append(_url_ref(kind, part, key, f"{path}.{key}"))
    elif part_type in AUDIO_PART_TYPES:
        _check_audio(part, part_type, f"{path}.{part_type}")
    elif part_type not in PLAIN_PART_TYPES:
        raise _refused_part(part_type, path)


def _visit_keyed(part: dict[str, Any], key: str, path: str, walk: Walk) -> None:
    if key in KIND_OF_KEY:
        walk.media.append(_url_ref(KIND_OF_KEY[key], part, key, f"{path}.{key}"))
    elif key in AUDIO_PART_TYPES:
        _check_audio(part, key, f"{path}.{key}")
    elif key not in PLAIN_PART_TYPES:
        raise _refused_part(key, f"{path}.{key}")


def _object_form(part: dict[str, Any], key: str) -> bool:
    """A typed image_url / video_url part's plain-string URL becomes {"url": ...}, the form the engine reads."""
    if isinstance(part.get(key), str):
        part[key] = {"url": part[key]}
        return True
    return False


def _url_ref(kind: MediaKind, part: dict[str, Any], key: str, path: str) -> MediaRef:
    value = part.get(key)
    if isinstance(value, dict):
        url = value.get("url")

        def write(inline: DataUrl) -> None:
            value["url"] = inline.url

    elif isinstance(value, str) or value is None:
        url = value

        def write(inline: DataUrl) -> None:
            part[key] = inline.url

    else:
        raise APIError(400, f"{path} must be an object with a 'url' string.", param=path)
    if url is not None and not isinstance(url, str):
        raise APIError(400, f"{path}.url must be a string: an http(s) URL or a base64 data: URL.", param=path)
    return MediaRef(kind, url, path, write)


def _input_image(part: dict[str, Any], path: str) -> MediaRef:
    """Responses `input_image`: `image_url` is the URL string itself."""
    url = part.get("image_url")
    if url is None and part.get("file_id") is not None:
        raise APIError(
            400,
            "input_image with a file_id is not accepted: this server has no file store. "
            "Send image_url as a base64 data: URL or an http(s) URL.",
            param=f"{path}.file_id",
        )
    if url is not None and not isinstance(url, str):
        message = f"{path}.image_url must be a string: an http(s) URL or a base64 data: URL."
        raise APIError(400, message, param=f"{path}.image_url")

    def write(inline: DataUrl) -> None:
        part["image_url"] = inline.url

    return MediaRef("image", url, f"{path}.image_url", write)


def _check_audio(part: dict[str, Any], key: str, path: str) -> None:
    if key != "audio_url":
        return  # input_audio is inline data
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str) and not is_data_url(url):
        raise APIError(
            400,
            "Audio URLs are not fetched by this server; send the audio inline as a base64 data: URL.",
            param=path,
        )


def _refused_part(part_type: str, path: str) -> APIError:
    if part_type in EMBEDS_PART_TYPES:
        message = (
            f"'{part_type}' is not accepted: this server cannot check precomputed embeddings. "
            "Send the image or video itself as an image_url or video_url part."
        )
    elif part_type == "image_pil":
        message = (
            "'image_pil' cannot be sent over HTTP; send the image as an image_url part with a data: or http(s) URL."
        )
    elif part_type == "input_file":
        message = (
            "input_file parts are not accepted: this server cannot check files. Send images as "
            "input_image parts (a base64 data: URL or an http(s) URL) and documents as text."
        )
    else:
        message = (
            f"Content part type '{part_type}' is not supported; use text, image_url or video_url "
            "(Responses: input_text or input_image)."
        )
    return APIError(400, message, param=path)
