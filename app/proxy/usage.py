"""Token accounting on relayed streams without changing what the client sees.

The wrapper logs and counts tokens for every request, and for streams the only
exact source is the engine's usage block. When a client did not ask for it
(`stream_options.include_usage`), the proxy asks on its behalf and this filter
takes that extra event back out of the byte stream before relaying, so the
client receives exactly the stream it asked for.

Per chunk this costs a suffix test and a substring search; only the events
that mention `"usage"` are cut out and parsed (the one with the usage block,
or each chunk's with per-chunk usage when the client asked for it). A JSON
reply's usage is parsed alone, from the last `"usage"` key on.
"""

from __future__ import annotations

import json

USAGE_KEY = b'"usage"'
EVENT_END = b"\n\n"
_DECODER = json.JSONDecoder()


class UsageFilter:
    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """Returns the complete events to relay now; a trailing partial event waits for its end."""
        if self._held:
            chunk, self._held = self._held + chunk, b""
        if not chunk.endswith(EVENT_END):
            boundary = chunk.rfind(EVENT_END)
            cut = 0 if boundary < 0 else boundary + len(EVENT_END)
            chunk, self._held = chunk[:cut], chunk[cut:]
        start = chunk.find(USAGE_KEY)
        if start < 0:
            return chunk
        kept: list[bytes] = []
        position = 0  # chunk[:position] is decided
        while start >= 0:
            begin = chunk.rfind(EVENT_END, 0, start)
            begin = 0 if begin < 0 else begin + len(EVENT_END)
            end = chunk.find(EVENT_END, start) + len(EVENT_END)  # the chunk ends with an event's end
            if self._read_usage(chunk[begin : end - len(EVENT_END)]) and self.strip:
                kept.append(chunk[position:begin])
                position = end
            start = chunk.find(USAGE_KEY, end)
        if not position:
            return chunk
        kept.append(chunk[position:])
        return b"".join(kept)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _read_usage(self, event: bytes) -> bool:
        """Read the token counts of an event that carries a usage block; False when it has none."""
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            try:
                data = json.loads(line[5:])
            except ValueError:
                return False
            usage = _usage_of(data)
            if usage is None:
                return False
            prompt, completion = _token_counts(usage)
            self.prompt_tokens = prompt if prompt is not None else self.prompt_tokens
            self.completion_tokens = completion if completion is not None else self.completion_tokens
            # Only a chat or completions usage event is the wrapper's to strip.
            return isinstance(data.get("usage"), dict)
        return False


def _usage_of(data: object) -> dict[str, object] | None:
    """The usage block of an event: top level (chat, completions, Anthropic's message_delta), or in the
    response of a Responses event, or in the message of Anthropic's message_start."""
    if not isinstance(data, dict):
        return None
    for holder in (data, data.get("response"), data.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            return holder["usage"]
    return None


def _token_counts(usage: dict[str, object]) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens, under OpenAI's names or those of Responses and Anthropic Messages."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if isinstance(prompt, int) else None), (completion if isinstance(completion, int) else None)


def read_json_usage(body: bytes) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of a JSON reply (embeddings and score replies have prompt tokens only).

    Replies end with their usage object: it is parsed alone, from the last
    `"usage":` on; the whole body only when that is not an object.
    """
    start = body.rfind(USAGE_KEY)
    if start < 0:
        return None, None
    value = body[start + len(USAGE_KEY) :].lstrip()
    if value.startswith(b":"):
        try:
            usage, _ = _DECODER.raw_decode(value[1:].lstrip().decode())
        except (ValueError, UnicodeDecodeError):
            usage = None
        if isinstance(usage, dict):
            return _token_counts(usage)
    try:
        usage = _usage_of(json.loads(body))
    except ValueError:
        return None, None
    return (None, None) if usage is None else _token_counts(usage)
