"""One walker per family of engine routes: where each request body carries media.

Each reads the fields its route's request models have (vLLM 0.32.0,
`vllm/entrypoints/...`), and only those; anything else is left to the
fail-closed scan (`app.media.unchecked`). The fields:

- chat (`/v1/chat/completions`, `/render`, `/batch`, `/tokenize`): `messages`,
  one conversation or (batch) a list of them; /tokenize's `prompt` is text;
- Responses: `input`, a string or a list of items: messages (their content
  parts), and `function_call_output` / `custom_tool_call_output` items,
  whose `output` list the engine turns into a tool message's content parts
  (by the item's type, even when the item also has a `role`); reasoning and
  tool-call items carry text only;
- completions (`/v1/completions`, `/render`): `prompt` is text or token ids;
  `prompt_embeds` (tensors the engine would load) is refused;
- pooling (`/v1/embeddings`, `/pooling`, `/classify`): `messages` (one or
  several conversations) and `input` (text, token ids, or chat messages,
  one or several conversations); /pooling's IO-processor plugin requests
  (`data`, any shape a plugin reads, URLs included) are refused;
- scoring (`/score`, `/v1/score`, `/rerank`, `/v1/rerank`, `/v2/rerank`): every
  query/document field (`query`, `queries`, `documents`, `items`, `data_1`,
  `data_2`, `text_1`, `text_2`), each a string, `{"content": [parts]}` or a
  list of them.

Anthropic bodies have their own module, `app.media.anthropic`.
"""

from __future__ import annotations

from typing import Any

from app.errors import APIError
from app.media.parts import visit_conversations, visit_message, visit_parts
from app.media.walk import Walk

SCORE_FIELDS = ("query", "queries", "documents", "items", "data_1", "data_2", "text_1", "text_2")
# Responses input items whose `output` becomes a tool message's content.
TOOL_OUTPUT_ITEMS = frozenset({"function_call_output", "custom_tool_call_output"})
# Responses input items the engine reads as text or tool calls only.
TEXT_ITEMS = frozenset({"reasoning", "function_call", "custom_tool_call"})


def walk_chat(payload: dict[str, Any], walk: Walk) -> None:
    visit_conversations(payload.get("messages"), "messages", walk)


def walk_responses(payload: dict[str, Any], walk: Walk) -> None:
    items = payload.get("input")
    if isinstance(items, str):
        walk.text += 1
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        path = f"input[{i}]"
        item_type = item.get("type") if isinstance(item.get("type"), str) else None
        if item_type in TOOL_OUTPUT_ITEMS:
            # The engine reads a tool output's `output` by the item's type, whatever else it has (a role too).
            output = item.get("output")
            if isinstance(output, list):
                visit_parts(output, f"{path}.output", walk)
                walk.vouch(output)
        if "role" in item:
            if item.get("content") == []:
                # vLLM 0.32 fails such an item with a 500 (an IndexError in its converter).
                raise APIError(400, f"{path}.content is empty; a message needs content.", param=f"{path}.content")
            visit_message(item, path, walk)
        elif item_type in TEXT_ITEMS:
            walk.vouch(item)


def walk_completions(payload: dict[str, Any], walk: Walk) -> None:
    if payload.get("prompt_embeds"):
        raise APIError(
            400,
            "prompt_embeds is not accepted: this server cannot check precomputed embeddings. "
            "Send the prompt as text or token ids.",
            param="prompt_embeds",
        )
    if _token_ids_or_strings(payload.get("prompt")):
        walk.vouch(payload["prompt"])


def walk_pooling(payload: dict[str, Any], walk: Walk) -> None:
    visit_conversations(payload.get("messages"), "messages", walk)
    inputs = payload.get("input")
    if _token_ids_or_strings(inputs):
        walk.vouch(inputs)
    else:
        visit_conversations(inputs, "input", walk)


def walk_pooling_plugin(payload: dict[str, Any], walk: Walk) -> None:
    """/pooling: also an IO-processor plugin's request, `data`, which the wrapper cannot check."""
    if payload.get("data") is not None:
        raise APIError(
            400,
            "IO-processor plugin requests ('data') are not accepted: this server cannot check what a plugin "
            "loads. Send 'input' or 'messages'.",
            param="data",
        )
    walk_pooling(payload, walk)


def walk_scoring(payload: dict[str, Any], walk: Walk) -> None:
    for name in SCORE_FIELDS:
        value = payload.get(name)
        if isinstance(value, dict):
            _visit_score_input(value, name, walk)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _visit_score_input(item, f"{name}[{i}]", walk)


def walk_nothing(payload: dict[str, Any], walk: Walk) -> None:
    """Routes whose request has no media field: the fail-closed scan alone decides."""


def _token_ids_or_strings(value: Any) -> bool:
    """A prompt list of token ids, token-id lists or strings only: thousands of items the scan need not visit.

    A list with anything else in it (media after a first string) is left to the scan.
    """
    if not isinstance(value, list) or not value:
        return False
    if all(isinstance(item, int) for item in value) or all(isinstance(item, str) for item in value):
        return True
    return all(isinstance(ids, list) and all(isinstance(token, int) for token in ids) for ids in value)


def _visit_score_input(value: dict[str, Any], path: str, walk: Walk) -> None:
    content = value.get("content")
    if isinstance(content, list):
        visit_parts(content, f"{path}.content", walk)
        walk.vouch(value)
